#include "cvm/telemetry/logging.h"

#include <chrono>
#include <ctime>
#include <memory>
#include <string>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

namespace cvm::telemetry {
namespace {

// spdlog's pattern language cannot escape a message for JSON, so JSON lines get a formatter of
// their own.
class JsonFormatter final : public spdlog::formatter {
 public:
  explicit JsonFormatter(std::string service) : service_(std::move(service)) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const auto tp = msg.time;
    const std::time_t secs = std::chrono::system_clock::to_time_t(tp);
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(tp.time_since_epoch()).count() % 1000;
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[40];
    const size_t n = std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
    std::string time(buf, n);
    char frac[8];
    std::snprintf(frac, sizeof(frac), ".%03dZ", static_cast<int>(ms));
    time += frac;
    const auto level = spdlog::level::to_string_view(msg.level);
    const std::string line =
        format_json_line(time, std::string_view(level.data(), level.size()), service_,
                         std::string_view(msg.payload.data(), msg.payload.size()));
    dest.append(line.data(), line.data() + line.size());
  }

  [[nodiscard]] std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>(service_);
  }

 private:
  std::string service_;
};

}  // namespace

Result<LogFormat> parse_log_format(std::string_view text) {
  if (text == "text") return LogFormat::kText;
  if (text == "json") return LogFormat::kJson;
  return make_error(ErrorDomain::kInvalid,
                    "unknown log format '" + std::string(text) + "' (use text or json)");
}

std::string format_json_line(std::string_view time_iso, std::string_view level,
                             std::string_view service, std::string_view message) {
  nlohmann::json j;
  j["ts"] = time_iso;
  j["level"] = level;
  j["service"] = service;
  // Replace invalid UTF-8 rather than throw: a log line must never take the service down.
  j["msg"] = message;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

void init_logging(std::string_view service, LogFormat format, std::string_view level) {
  auto logger = spdlog::stderr_color_mt(std::string(service));
  if (format == LogFormat::kJson) {
    logger->set_formatter(std::make_unique<JsonFormatter>(std::string(service)));
  } else {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%-5l%$ [%n] %v");
  }
  logger->set_level(spdlog::level::from_str(std::string(level)));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(std::move(logger));
}

}  // namespace cvm::telemetry
