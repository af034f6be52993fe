#pragma once
// Pure placement decisions: which node runs a workspace, or why none can. Knows nothing of NATS,
// files or clocks ("now" is a parameter) so every rule is unit-tested and benchmarked in-process.
//
// Shape (modelled on the Kubernetes scheduling framework): request-level rules first (they do not
// depend on any node), then the node filters in a fixed order, scoring the nodes that pass. Two
// searches give the same answer (see Search): a pass over every node, and for large fleets a walk
// of the capability index that only looks at nodes which can pass the request's capability filters
// and stops once no unvisited node can score better. When nothing fits, every node is counted under
// the FIRST filter that rejected it and the message reads like kube-scheduler's: "0/12 nodes fit:
// 5 SELinux enforcing, 4 GPU requires bare metal, 3 insufficient memory".

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm::scheduler {

// The one place the request defaults live: a resource of 0 on the wire means these.
inline constexpr uint64_t kDefaultCpuMillicores = 1000;
inline constexpr uint64_t kDefaultMemoryBytes = 512ULL * 1024 * 1024;
// A node whose last heartbeat is older than this is not live (default 15 s, a flag).
inline constexpr int64_t kDefaultLivenessTtlMs = 15'000;

// InfrastructureSettings with the documented defaults applied (a missing key means: CVMs enabled,
// default to CVM, Caching off, Auto-load shiftfs off, bin-packing).
struct EffectiveSettings {
  bool cvm_enabled = true;
  bool default_to_cvm = true;
  bool caching = false;
  bool auto_load_shiftfs = false;
  cvm::v1::ScoringStrategy scoring = cvm::v1::BINPACK;
};

// nullptr means the settings key does not exist yet.
EffectiveSettings effective_settings(const cvm::v1::InfrastructureSettings* settings);

// What placement needs to know about one request, with the settings in force folded in.
struct PlacementRequest {
  uint64_t cpu_millicores = 0;  // 0 means kDefaultCpuMillicores
  uint64_t memory_bytes = 0;    // 0 means kDefaultMemoryBytes
  uint32_t gpu_count = 0;
  cvm::v1::GpuVendor gpu_vendor = cvm::v1::GPU_VENDOR_UNSPECIFIED;  // unspecified means NVIDIA
  uint64_t gpu_min_memory_bytes = 0;
  bool cvm = true;          // runs as a CVM (supervising + inner container)
  bool cvm_enabled = true;  // the admin setting in force
  bool caching = false;     // the admin setting in force; only matters for CVMs
  bool auto_load_shiftfs = false;
};

// Resolves use_cvm against the settings: an explicit use_cvm wins (so asking for a CVM while CVMs
// are disabled is refused with CVM_DISABLED); otherwise a workspace is a CVM only when CVMs are
// enabled and the default says so.
PlacementRequest make_placement_request(const cvm::v1::BuildRequest& build,
                                        const EffectiveSettings& settings);

[[nodiscard]] constexpr uint64_t effective_cpu(uint64_t cpu_millicores) {
  return cpu_millicores == 0 ? kDefaultCpuMillicores : cpu_millicores;
}
[[nodiscard]] constexpr uint64_t effective_memory(uint64_t memory_bytes) {
  return memory_bytes == 0 ? kDefaultMemoryBytes : memory_bytes;
}

// Node filters, in the order they run. A node is counted under the first one that rejects it.
enum class Filter : uint8_t {
  kNodeLive,
  kRuntimeReady,
  kSelinuxEnforcing,
  kSelinuxEnabled,  // permissive: still ineligible, Sysbox does not run with SELinux enabled
  kCachingShiftfs,
  kKernelHeaders,
  kGpuBareMetal,
  kGpuAvailable,
  kCpu,
  kMemory,
};
inline constexpr size_t kFilterCount = 10;

// Stable machine id ("selinux-enforcing") for metrics and logs, and the human text used in the
// failure message ("SELinux enforcing").
std::string_view filter_id(Filter filter);
std::string_view filter_text(Filter filter);
// cpu, memory and GPUs available: the node could fit the request once something is released.
bool is_capacity_filter(Filter filter);

// What the scheduler holds on a node between its decision and the agent's next NodeStatus that
// accounts for it (NodeStatus.allocated).
struct Reservation {
  uint64_t cpu_millicores = 0;
  uint64_t memory_bytes = 0;
  uint32_t gpus = 0;
};
// The request's resources with defaults applied: what a successful placement should reserve.
Reservation reservation_for(const PlacementRequest& request);

struct NodeGpu {
  std::string uuid;
  uint64_t memory_bytes = 0;
  uint32_t minor = 0;
  bool healthy = false;
  bool nvidia = false;
  bool leased = false;
};

// One entry of NodeStatus.allocated_builds.
struct AllocatedBuild {
  std::string build_id;
  uint64_t cpu_millicores = 0;
  uint64_t memory_bytes = 0;
};

// The lean copy of a NodeStatus the index keeps (50,000 of them must stay well under 200 MiB).
struct NodeRecord {
  std::string node_id;
  uint64_t revision = 0;  // KV revision of the NodeStatus, for compare-and-set by the caller
  int64_t heartbeat_unix_ms = 0;
  uint64_t capacity_cpu_millicores = 0;
  uint64_t capacity_memory_bytes = 0;
  uint64_t allocated_cpu_millicores = 0;
  uint64_t allocated_memory_bytes = 0;
  uint64_t reserved_cpu_millicores = 0;  // sum of in-flight reservations
  uint64_t reserved_memory_bytes = 0;
  uint32_t reserved_gpus = 0;
  std::vector<NodeGpu> gpus;  // sorted by minor
  // What `allocated` counts, sorted by build id (empty for agents that do not say): holds for
  // these builds are not counted again (ledger.h, covered_by_node).
  std::vector<AllocatedBuild> allocated_builds;
};

using NodeSlot = uint32_t;

// The scheduler's in-memory view of KV cvm_nodes (fed by a KV watch), its in-flight reservations
// and the GPU leases it has seen. Nodes live in vectors with stable slots (a removed node's slot is
// reused), and the fields every filter reads sit in a compact array so a full pass is a single
// cache-friendly sweep with no allocation per node.
//
// Beside that array, a capability index: nodes grouped by what rarely changes (the capability
// bits, whether any GPU is usable, the capacity "shape" rounded to 1/8 octave), each group in a
// grid of cells by free cpu and free memory, each cell ordered by free fraction (free cpu /
// capacity + free memory / capacity). Every change of a node's free
// resources or class (upsert, reserve, release, a GPU lease) moves it in O(log n); a heartbeat that
// changes nothing else does not touch the index.
class NodeIndex {
 public:
  // Inserts or replaces the node (same slot on replace). Keeps its reservations and leases.
  // `builds_changed` (optional): set to whether allocated_builds differ from the node's last
  // status (which capacity holds it covers may have changed).
  NodeSlot upsert(const cvm::v1::NodeStatus& status, uint64_t revision = 0,
                  bool* builds_changed = nullptr);
  // Forgets the node and drops its reservations (its work is being re-placed). False if unknown.
  bool remove(std::string_view node_id);

  [[nodiscard]] size_t size() const { return by_id_.size(); }
  [[nodiscard]] const NodeRecord* find(std::string_view node_id) const;
  [[nodiscard]] std::optional<NodeSlot> slot_of(std::string_view node_id) const;

  // Holds resources on a node until release(); reservation_id is typically the build id.
  // False if the node is unknown or the id is already held.
  bool reserve(std::string_view reservation_id, std::string_view node_id,
               const Reservation& reservation);
  bool release(std::string_view reservation_id);
  [[nodiscard]] size_t reservations() const { return reservations_.size(); }

  // Mirrors KV cvm_gpu_leases. Leases are remembered even for nodes not (yet) registered.
  void set_gpu_leased(std::string_view node_id, std::string_view gpu_uuid, bool leased);

  // Cells per axis of the capability index's grid (see the private Group): one for shares below
  // 1/256, then 3 per octave up to 1.
  static constexpr uint32_t kGrid = 25;

 private:
  friend class PlacementPass;

  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  template <class V>
  using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

  // What the filters read for every node: 32 bytes, two nodes per cache line, so 50,000 nodes
  // (1.6 MB) stay in a core's L2 and the pass is not bound by memory bandwidth.
  struct HotNode {
    int64_t heartbeat_unix_ms = 0;
    uint64_t free_memory = 0;  // capacity - allocated - reserved, saturating at 0
    uint32_t free_cpu = 0;     // millicores, likewise (clamped: 4 million cores is plenty)
    uint16_t caps = 0;         // kCap* bits
    uint16_t gpu_free = 0;     // healthy, NVIDIA, unleased, minus reserved
    // MiB of the smallest and largest such GPU (rounded down): a minimum memory at or below the
    // smallest, or above the largest, is decided here without a look at the cold record.
    uint32_t gpu_smallest_free_mib = 0;
    uint32_t gpu_largest_free_mib = 0;
  };
  // What scoring reads, only for nodes that passed: 1/capacity, so it multiplies, never divides.
  struct ScoreNode {
    double inv_capacity_cpu = 0;
    double inv_capacity_memory = 0;
  };

  struct HeldReservation {
    std::string node_id;
    Reservation amount;
  };

  // One group of the capability index (see the class comment).
  struct IndexEntry {
    double free_fraction = 0;  // free_cpu * inv_capacity_cpu + free_memory * inv_capacity_memory
    std::string node_id;       // ties in free_fraction go to the smaller id, as scoring does
    NodeSlot slot = 0;
  };
  struct IndexOrder {
    using is_transparent = void;
    bool operator()(const IndexEntry& a, const IndexEntry& b) const {
      if (a.free_fraction != b.free_fraction) return a.free_fraction < b.free_fraction;
      return a.node_id < b.node_id;
    }
    bool operator()(const IndexEntry& a, double b) const { return a.free_fraction < b; }
    bool operator()(double a, const IndexEntry& b) const { return a < b.free_fraction; }
  };
  using Cell = std::set<IndexEntry, IndexOrder>;
  // A group's members sit in a kGrid x kGrid grid of cells by (free cpu / capacity, free memory /
  // capacity), geometric (3 cells an octave), each cell ordered by free fraction. A walk in one
  // order alone would step over every node that is rich in one resource and short of the other
  // (their free fraction is as good as a fitting node's); in the grid only the cells holding the
  // request's cpu or memory share hold such nodes, and only those within 21% below the share.
  struct Group {
    uint32_t caps = 0;  // kCap* bits every member carries
    uint32_t members = 0;
    // Range of 1/capacity over the members since the group was last empty (only ever widened
    // while it has members: a wider range is still a valid bound, it only prunes less).
    double min_inv_cpu = 0;
    double max_inv_cpu = 0;
    double min_inv_memory = 0;
    double max_inv_memory = 0;
    std::vector<Cell> cells = std::vector<Cell>(kGrid * kGrid);  // [cpu cell * kGrid + mem cell]
    // Bit j of rows[i]: cell (i, j) has members. Searches skip empty cells without touching them.
    std::array<uint32_t, kGrid> rows{};
  };
  static constexpr uint32_t kNotIndexed = UINT32_MAX;
  struct Indexed {
    uint32_t group = kNotIndexed;
    uint32_t cell = 0;
    double free_fraction = 0;
    bool parked = false;  // out of the index because a decision found it dead (see park())
  };

  void refresh(NodeSlot slot);
  // The index is a cache of the records: const members may move nodes in it.
  void reindex(NodeSlot slot) const;
  void unindex(NodeSlot slot) const;
  // Dead nodes stay registered until their KV entry goes, and bin-packing leaves them at the best
  // end of their cells, where every walk would step over them again. A decision that found nodes
  // dead parks them out of the index; any change of the node (its next heartbeat first of all)
  // puts it back, and a decision whose liveness cut-off would count a parked node live (an older
  // "now" or a longer TTL) puts them all back first, so the walk's answer never changes.
  void park(const std::vector<NodeSlot>& dead) const;
  void unpark_all() const;

  std::vector<HotNode> hot_;
  std::vector<ScoreNode> score_;
  std::vector<NodeRecord> records_;
  std::vector<NodeSlot> free_slots_;
  StringMap<NodeSlot> by_id_;
  StringMap<HeldReservation> reservations_;
  StringMap<std::vector<std::string>> leases_;  // node id -> leased GPU uuids
  mutable std::vector<Indexed> indexed_;        // by slot: where the node sits in the index
  mutable std::vector<Group> groups_;           // never shrinks; empty groups are skipped
  mutable std::unordered_map<uint64_t, uint32_t> group_by_key_;
  mutable std::vector<NodeSlot> parked_;  // may hold slots since put back (Indexed::parked says)
  mutable int64_t parked_newest_heartbeat_ = INT64_MIN;
};

// Nomad scores ⌈log₂ n⌉ feasible nodes (at least 2); kube-scheduler a percentage of the fleet.
// Either way the pass stops once that many feasible nodes were found, so a failure is still a full
// scan and its message counts every node.
enum class Sampling : uint8_t { kNone, kLog2, kPercent };

// How the nodes are searched. Both searches choose the same node up to kScoreEpsilon: a node the
// index search returns is never worse than the full scan's best by more than kScoreEpsilon in
// utilization, and when the full scan's best beats every other feasible node by more than that,
// both return it. Failures always come from the full scan, so the message counts every node.
//   kScan   one pass over every node (the reference; sampling applies to it)
//   kIndex  the capability index: groups whose capabilities pass, walked from the best end and
//           stopped once no unvisited member can beat the candidates found (ignores sampling)
//   kAuto   kIndex without sampling when the fleet has at least kIndexMinNodes nodes, else kScan
enum class Search : uint8_t { kAuto, kScan, kIndex };
inline constexpr size_t kIndexMinNodes = 1024;
inline constexpr double kScoreEpsilon = 1e-12;

struct PlacementOptions {
  int64_t now_unix_ms = 0;
  int64_t liveness_ttl_ms = kDefaultLivenessTtlMs;
  cvm::v1::ScoringStrategy strategy = cvm::v1::BINPACK;
  Sampling sampling = Sampling::kNone;
  uint32_t sample_percent = 100;  // for Sampling::kPercent, 1..100
  // Where the pass starts (slot order, wrapping). A rotating value spreads sampled decisions over
  // the fleet as kube-scheduler's nextStartNodeIndex does; 0 is fine without sampling.
  uint64_t start_offset = 0;
  // How many ranked candidates to return, best first, so the caller can move on to the next when
  // a compare-and-set or a GPU reservation on the first is refused.
  uint32_t max_candidates = 1;
  Search search = Search::kAuto;
};

struct Candidate {
  NodeSlot slot = 0;
  std::string node_id;
  double utilization = 0;  // (cpu + memory fraction used after placement) / 2
};

struct PlacementStats {
  uint32_t nodes = 0;  // registered
  // Filtered: every node on a full scan; with sampling, up to the stopping point rounded up to a
  // small block; with the index, the nodes its walk looked at (and the rejection counts cover the
  // same nodes).
  uint32_t evaluated = 0;
  uint32_t feasible = 0;
  std::array<uint32_t, kFilterCount> rejected{};  // by Filter
};

struct PlacementDecision {
  cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED;  // UNSPECIFIED on success
  std::string message;                                   // empty on success
  std::vector<Candidate> candidates;                     // best first; empty on failure
  PlacementStats stats;

  [[nodiscard]] bool ok() const { return reason == cvm::v1::REASON_UNSPECIFIED; }
  [[nodiscard]] const Candidate& best() const { return candidates.front(); }
};

// Rules that do not depend on any node (CVMs disabled, AMD GPUs, GPUs with cached CVMs).
std::optional<PlacementDecision> check_request(const PlacementRequest& request);

// The whole decision: check_request, then filter and score the nodes (options.search says how).
// The index search may park the dead nodes it met (NodeIndex keeps that cache behind const), so
// decisions on one NodeIndex must not run concurrently (the scheduler decides on one thread).
PlacementDecision place(const NodeIndex& nodes, const PlacementRequest& request,
                        const PlacementOptions& options);

// "0/12 nodes fit: 5 SELinux enforcing, 3 insufficient memory" from the per-filter counts.
std::string rejection_message(const PlacementStats& stats);

}  // namespace cvm::scheduler
