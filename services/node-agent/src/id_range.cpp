#include "cvm/agent/id_range.h"

#include <charconv>
#include <limits>

#include <nlohmann/json.hpp>

#include "file_util.h"

namespace cvm::agent {
namespace {

constexpr uint64_t kIdSpace = uint64_t{1} << 32;

std::optional<uint32_t> parse_u32(std::string_view s) {
  s = detail::trim(s);
  uint32_t value = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  return value;
}

Status validate_pool(IdPool pool, uint32_t width) {
  if (width == 0) return make_error(ErrorDomain::kInvalid, "ID range width must be positive");
  if (pool.count < width) {
    return make_error(ErrorDomain::kInvalid, "ID pool of " + std::to_string(pool.count) +
                                                 " IDs is narrower than one range of " +
                                                 std::to_string(width));
  }
  if (uint64_t{pool.start} + pool.count > kIdSpace) {
    return make_error(ErrorDomain::kInvalid, "ID pool runs past 2^32");
  }
  // Mapping container root onto host root would undo the isolation the ranges exist for.
  if (pool.start == 0) return make_error(ErrorDomain::kInvalid, "ID pool must not include ID 0");
  return {};
}

}  // namespace

Result<IdPool> parse_subid_pool(std::string_view content, std::string_view owner) {
  std::optional<IdPool> best;
  for (const std::string_view line : detail::trimmed_lines(content)) {
    if (line.empty() || line.front() == '#') continue;
    const size_t c1 = line.find(':');
    if (c1 == std::string_view::npos || line.substr(0, c1) != owner) continue;
    const size_t c2 = line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) {
      return make_error(ErrorDomain::kInvalid,
                        "malformed subordinate ID line: " + std::string(line));
    }
    const auto start = parse_u32(line.substr(c1 + 1, c2 - c1 - 1));
    const auto count = parse_u32(line.substr(c2 + 1));
    if (!start || !count || uint64_t{*start} + *count > kIdSpace) {
      return make_error(ErrorDomain::kInvalid,
                        "malformed subordinate ID line: " + std::string(line));
    }
    if (!best || *count > best->count) best = IdPool{*start, *count};
  }
  if (!best) {
    return make_error(ErrorDomain::kNotFound,
                      "no subordinate ID range for '" + std::string(owner) + "'");
  }
  return *best;
}

Result<IdRangeAllocator> IdRangeAllocator::create(IdPool pool, uint32_t width) {
  if (auto st = validate_pool(pool, width); !st) return st.error();
  return IdRangeAllocator(pool, width);
}

bool IdRangeAllocator::overlaps_in_use(uint64_t base, uint64_t count) const {
  // The only candidates are the range starting at or before `base` and those starting inside.
  auto it = by_base_.upper_bound(static_cast<uint32_t>(base));
  if (it != by_base_.begin()) {
    auto prev = std::prev(it);
    if (uint64_t{prev->first} + prev->second > base) return true;
  }
  return it != by_base_.end() && it->first < base + count;
}

void IdRangeAllocator::insert(const std::string& workspace_id, IdRange range) {
  by_workspace_[workspace_id] = range;
  by_base_[range.base] = range.count;
}

Result<IdRange> IdRangeAllocator::allocate(const std::string& workspace_id) {
  if (auto it = by_workspace_.find(workspace_id); it != by_workspace_.end()) return it->second;
  const uint64_t slots = pool_.count / width_;
  for (uint64_t i = 0; i < slots; ++i) {
    const uint64_t base = uint64_t{pool_.start} + i * width_;
    if (overlaps_in_use(base, width_)) continue;
    const IdRange range{static_cast<uint32_t>(base), width_};
    insert(workspace_id, range);
    return range;
  }
  return make_error(ErrorDomain::kConflict, "ID pool exhausted: all " + std::to_string(slots) +
                                                " ranges of " + std::to_string(width_) +
                                                " IDs in use");
}

bool IdRangeAllocator::release(const std::string& workspace_id) {
  auto it = by_workspace_.find(workspace_id);
  if (it == by_workspace_.end()) return false;
  by_base_.erase(it->second.base);
  by_workspace_.erase(it);
  return true;
}

std::optional<IdRange> IdRangeAllocator::find(const std::string& workspace_id) const {
  auto it = by_workspace_.find(workspace_id);
  if (it == by_workspace_.end()) return std::nullopt;
  return it->second;
}

nlohmann::json IdRangeAllocator::to_json() const {
  nlohmann::json ranges = nlohmann::json::object();
  for (const auto& [ws, range] : by_workspace_) {
    ranges[ws] = {{"base", range.base}, {"count", range.count}};
  }
  return {{"version", 1},
          {"pool", {{"start", pool_.start}, {"count", pool_.count}}},
          {"width", width_},
          {"ranges", std::move(ranges)}};
}

Result<IdRangeAllocator> IdRangeAllocator::from_json(const nlohmann::json& state, IdPool pool,
                                                     uint32_t width) {
  auto created = create(pool, width);
  if (!created) return created.error();
  IdRangeAllocator allocator = std::move(created).value();
  const auto invalid = [](const std::string& why) {
    return make_error(ErrorDomain::kInvalid, "ID range state: " + why);
  };
  if (!state.is_object()) return invalid("not an object");
  // Checked by type first: json::value() throws when the stored type differs, and a corrupt
  // file must give the agent an error at start, not std::terminate.
  const auto version = state.find("version");
  if (version == state.end() || !version->is_number_integer() || *version != 1) {
    return invalid("unknown version");
  }
  const auto ranges = state.find("ranges");
  if (ranges == state.end() || !ranges->is_object()) return invalid("no ranges object");
  for (const auto& [ws, value] : ranges->items()) {
    if (!value.is_object()) return invalid("range of '" + ws + "' is not an object");
    const auto base = value.find("base");
    const auto count = value.find("count");
    if (base == value.end() || count == value.end() || !base->is_number_unsigned() ||
        !count->is_number_unsigned()) {
      return invalid("range of '" + ws + "' lacks base/count");
    }
    const uint64_t b = base->get<uint64_t>();
    const uint64_t c = count->get<uint64_t>();
    if (b == 0 || c == 0 || b + c > kIdSpace)
      return invalid("range of '" + ws + "' is out of bounds");
    if (allocator.overlaps_in_use(b, c)) return invalid("range of '" + ws + "' overlaps another");
    allocator.insert(ws, IdRange{static_cast<uint32_t>(b), static_cast<uint32_t>(c)});
  }
  return allocator;
}

}  // namespace cvm::agent
