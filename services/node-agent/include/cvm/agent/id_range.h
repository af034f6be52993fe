#pragma once
// Exclusive host UID/GID ranges for workspaces. Container root maps to the first ID of its
// workspace's range, so no two workspaces share host IDs and none maps to host root.
//
// Pure: the allocator knows nothing of files. The agent persists to_json() in its state dir after
// every change and restores it with from_json() at start, so a restarted agent never hands out a
// range that a running container still uses.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "cvm/base/result.h"

namespace cvm::agent {

inline constexpr uint32_t kDefaultIdRangeWidth = 65536;

struct IdRange {
  uint32_t base = 0;
  uint32_t count = 0;
  bool operator==(const IdRange&) const = default;
};

// The host IDs the allocator may hand out, [start, start + count).
struct IdPool {
  uint32_t start = 0;
  uint32_t count = 0;
  bool operator==(const IdPool&) const = default;
};

// The largest range of `owner` in /etc/subuid or /etc/subgid text ("name:start:count" lines, '#'
// comments). Errors: kNotFound when `owner` has no line, kInvalid when its line is malformed.
[[nodiscard]] Result<IdPool> parse_subid_pool(std::string_view content, std::string_view owner);

class IdRangeAllocator {
 public:
  // Rejects pools that are empty, narrower than one range, overflow 32 bits, or include host ID 0.
  [[nodiscard]] static Result<IdRangeAllocator> create(IdPool pool,
                                                       uint32_t width = kDefaultIdRangeWidth);

  // The workspace's range: the one it already holds, else the lowest free slot of the pool.
  // kConflict when the pool is exhausted.
  [[nodiscard]] Result<IdRange> allocate(const std::string& workspace_id);
  // Returns whether the workspace held a range.
  bool release(const std::string& workspace_id);
  [[nodiscard]] std::optional<IdRange> find(const std::string& workspace_id) const;

  [[nodiscard]] size_t in_use() const { return by_workspace_.size(); }
  // How many ranges the pool holds in all.
  [[nodiscard]] size_t slots() const { return pool_.count / width_; }
  [[nodiscard]] IdPool pool() const { return pool_; }
  [[nodiscard]] uint32_t width() const { return width_; }

  // {"version":1,"pool":{"start":..,"count":..},"width":..,"ranges":{"<ws>":{"base":..,"count":..}}}
  [[nodiscard]] nlohmann::json to_json() const;
  // Restores saved ranges on top of `pool` and `width` (today's configuration, which may differ
  // from the saved one). Saved ranges are kept even when they no longer fit the pool grid: new
  // ranges avoid them until released. kInvalid on malformed state or overlapping saved ranges.
  [[nodiscard]] static Result<IdRangeAllocator> from_json(const nlohmann::json& state, IdPool pool,
                                                          uint32_t width = kDefaultIdRangeWidth);

 private:
  IdRangeAllocator(IdPool pool, uint32_t width) : pool_(pool), width_(width) {}
  [[nodiscard]] bool overlaps_in_use(uint64_t base, uint64_t count) const;
  void insert(const std::string& workspace_id, IdRange range);

  IdPool pool_;
  uint32_t width_;
  std::map<std::string, IdRange> by_workspace_;
  std::map<uint32_t, uint32_t> by_base_;  // base -> count, for overlap checks
};

}  // namespace cvm::agent
