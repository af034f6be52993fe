#include "cvm/cli/quantity.h"

#include <cmath>
#include <limits>
#include <string>

namespace cvm::cli {
namespace {

// Parses "123" or "1.5" without locale surprises; rejects signs, exponents and junk.
bool parse_decimal(std::string_view s, double& out) {
  if (s.empty()) return false;
  double value = 0;
  double scale = 0;  // 0 while before the decimal point
  bool digits = false;
  for (char c : s) {
    if (c >= '0' && c <= '9') {
      digits = true;
      if (scale == 0) {
        value = value * 10 + (c - '0');
      } else {
        value += (c - '0') * scale;
        scale /= 10;
      }
    } else if (c == '.' && scale == 0) {
      scale = 0.1;
    } else {
      return false;
    }
  }
  out = value;
  return digits;
}

Error bad(std::string_view what, std::string_view text, std::string_view example) {
  return make_error(ErrorDomain::kInvalid, "invalid " + std::string(what) + " '" +
                                               std::string(text) + "' (e.g. " +
                                               std::string(example) + ")");
}

}  // namespace

Result<uint64_t> parse_bytes(std::string_view text) {
  struct Suffix {
    std::string_view name;
    double factor;
  };
  static constexpr Suffix kSuffixes[] = {{"Ki", 1024.0},
                                         {"Mi", 1024.0 * 1024},
                                         {"Gi", 1024.0 * 1024 * 1024},
                                         {"Ti", 1024.0 * 1024 * 1024 * 1024},
                                         {"K", 1e3},
                                         {"M", 1e6},
                                         {"G", 1e9},
                                         {"T", 1e12}};
  double factor = 1;
  std::string_view number = text;
  for (const auto& s : kSuffixes) {
    if (text.size() > s.name.size() && text.ends_with(s.name)) {
      factor = s.factor;
      number = text.substr(0, text.size() - s.name.size());
      break;
    }
  }
  double value = 0;
  if (!parse_decimal(number, value)) return bad("size", text, "512Mi, 2Gi, 1073741824");
  const double bytes = std::floor(value * factor);
  if (bytes >= static_cast<double>(std::numeric_limits<uint64_t>::max())) {
    return bad("size", text, "512Mi");
  }
  return static_cast<uint64_t>(bytes);
}

Result<uint64_t> parse_cpu(std::string_view text) {
  if (text.size() > 1 && text.back() == 'm') {
    double milli = 0;
    if (!parse_decimal(text.substr(0, text.size() - 1), milli) || milli != std::floor(milli) ||
        milli > 1e9) {
      return bad("cpu", text, "250m, 1, 1.5");
    }
    return static_cast<uint64_t>(milli);
  }
  double cores = 0;
  if (!parse_decimal(text, cores) || cores > 1e6) return bad("cpu", text, "250m, 1, 1.5");
  return static_cast<uint64_t>(std::llround(cores * 1000));
}

}  // namespace cvm::cli
