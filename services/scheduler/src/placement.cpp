#include "cvm/scheduler/placement.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <iterator>
#include <tuple>
#include <utility>

namespace cvm::scheduler {

namespace {

// Capability bits of HotNode::caps. Each is the "good" state, so a request compiles into one mask
// that a node must fully carry.
constexpr uint32_t kCapOccupied = 1U << 0;
constexpr uint32_t kCapRuntimeReady = 1U << 1;
constexpr uint32_t kCapSelinuxNotEnforcing = 1U << 2;
constexpr uint32_t kCapSelinuxOff = 1U << 3;
constexpr uint32_t kCapShiftfs = 1U << 4;  // shiftfs loaded or loadable, or ID-mapped mounts
constexpr uint32_t kCapKernelHeaders = 1U << 5;
constexpr uint32_t kCapBareMetal = 1U << 6;
// Only in a capability-index group's caps (derived from free resources, not from the host): at
// least one usable GPU, so GPU requests skip every GPU-less group.
constexpr uint32_t kCapGpu = 1U << 7;

// Capacity shapes are grouped 8 to an octave (about 9% apart), so a group's 1/capacity spans at
// most that much and the walk's bound stays tight, while a fleet's machine types (whose reported
// memory differs by a few MB between identical machines) still share a group.
constexpr double kShapeBucketsPerOctave = 8;

// The grid's cell edges on each axis: cell 0 holds shares below 2^-kGridOctaves (a full node
// among them), then kGridCellsPerOctave cells per octave up to 1. Geometric, because what a walk
// steps over is the members of the cell holding the request's share that have less than that
// share free: with geometric cells they are at most a 1 - 2^(-1/3) (21%) band below the share,
// where the nearly full nodes that bin-packing leaves behind sit far below it.
constexpr uint32_t kGridOctaves = 8;
constexpr uint32_t kGridCellsPerOctave = 3;
static_assert(NodeIndex::kGrid == 1 + kGridOctaves * kGridCellsPerOctave);
static_assert(NodeIndex::kGrid <= 32, "a row of cells is a 32-bit mask");

struct GridEdges {
  // lo[i] is the smallest share in cell i; hi[i] = lo[i + 1] bounds it from above (the last cell
  // also holds shares a rounding above 1).
  std::array<double, NodeIndex::kGrid> lo{};
  std::array<double, NodeIndex::kGrid> hi{};
  GridEdges() {
    lo[0] = 0;
    for (uint32_t i = 1; i < NodeIndex::kGrid; ++i) {
      lo[i] = std::exp2(static_cast<double>(i - 1) / kGridCellsPerOctave -
                        static_cast<double>(kGridOctaves));
    }
    for (uint32_t i = 0; i + 1 < NodeIndex::kGrid; ++i) hi[i] = lo[i + 1];
    hi[NodeIndex::kGrid - 1] = 1 + 1e-12;  // free <= capacity: at most 1, plus a rounding
  }
};
const GridEdges& grid_edges() {
  static const GridEdges edges;
  return edges;
}

// The cell of a share: the last cell whose lower edge is at or below it. Decided on the same
// table the search reads, so "x in cell i" means lo[i] <= x < hi[i] exactly, and a larger share
// never lands in a smaller cell.
uint32_t grid_cell(double share) {
  const auto& lo = grid_edges().lo;
  const auto it = std::upper_bound(lo.begin() + 1, lo.end(), share);
  return static_cast<uint32_t>(it - lo.begin()) - 1;
}

uint64_t shape_bucket(uint64_t capacity) {
  if (capacity == 0) return 0;
  return 1 +
         static_cast<uint64_t>(std::log2(static_cast<double>(capacity)) * kShapeBucketsPerOctave);
}

constexpr uint64_t saturating_sub(uint64_t a, uint64_t b) { return a > b ? a - b : 0; }

struct FilterInfo {
  std::string_view id;
  std::string_view text;
};

constexpr std::array<FilterInfo, kFilterCount> kFilters{{
    {"node-live", "node not live"},
    {"runtime-ready", "runtime not ready"},
    {"selinux-enforcing", "SELinux enforcing"},
    {"selinux-enabled", "SELinux enabled"},
    {"caching-shiftfs", "no shiftfs or ID-mapped mounts"},
    {"kernel-headers", "no kernel headers"},
    {"gpu-bare-metal", "GPU requires bare metal"},
    {"gpu-available", "insufficient GPUs"},
    {"cpu", "insufficient cpu"},
    {"memory", "insufficient memory"},
}};

PlacementDecision refuse(cvm::v1::Reason reason, std::string message) {
  PlacementDecision d;
  d.reason = reason;
  d.message = std::move(message);
  return d;
}

bool is_supported_vendor(cvm::v1::GpuVendor vendor) {
  return vendor == cvm::v1::NVIDIA || vendor == cvm::v1::GPU_VENDOR_UNSPECIFIED;
}

}  // namespace

EffectiveSettings effective_settings(const cvm::v1::InfrastructureSettings* settings) {
  EffectiveSettings out;
  if (settings == nullptr) return out;
  if (settings->has_cvm_enabled()) out.cvm_enabled = settings->cvm_enabled();
  if (settings->has_default_to_cvm()) out.default_to_cvm = settings->default_to_cvm();
  out.caching = settings->caching();
  out.auto_load_shiftfs = settings->auto_load_shiftfs();
  out.scoring = settings->scoring();
  return out;
}

PlacementRequest make_placement_request(const cvm::v1::BuildRequest& build,
                                        const EffectiveSettings& settings) {
  PlacementRequest r;
  const auto& res = build.resources();
  r.cpu_millicores = res.cpu_millicores();
  r.memory_bytes = res.memory_bytes();
  r.gpu_count = res.gpu().count();
  r.gpu_vendor = res.gpu().vendor();
  r.gpu_min_memory_bytes = res.gpu().min_memory_bytes();
  r.cvm = build.has_use_cvm() ? build.use_cvm() : (settings.cvm_enabled && settings.default_to_cvm);
  r.cvm_enabled = settings.cvm_enabled;
  r.caching = settings.caching;
  r.auto_load_shiftfs = settings.auto_load_shiftfs;
  return r;
}

std::string_view filter_id(Filter filter) { return kFilters[static_cast<size_t>(filter)].id; }
std::string_view filter_text(Filter filter) { return kFilters[static_cast<size_t>(filter)].text; }

bool is_capacity_filter(Filter filter) {
  return filter == Filter::kGpuAvailable || filter == Filter::kCpu || filter == Filter::kMemory;
}

Reservation reservation_for(const PlacementRequest& request) {
  return Reservation{effective_cpu(request.cpu_millicores), effective_memory(request.memory_bytes),
                     request.gpu_count};
}

// ---------------------------------------------------------------------------------------------
// NodeIndex

NodeSlot NodeIndex::upsert(const cvm::v1::NodeStatus& status, uint64_t revision,
                           bool* builds_changed) {
  NodeSlot slot;
  if (auto it = by_id_.find(status.node_id()); it != by_id_.end()) {
    slot = it->second;
  } else {
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      slot = static_cast<NodeSlot>(records_.size());
      records_.emplace_back();
      hot_.emplace_back();
      score_.emplace_back();
    }
    by_id_.emplace(status.node_id(), slot);
    // A fresh registration starts without reservations: remove() dropped any it had.
    records_[slot] = NodeRecord{};
    records_[slot].node_id = status.node_id();
  }

  NodeRecord& rec = records_[slot];
  rec.revision = revision;
  rec.heartbeat_unix_ms = status.heartbeat_unix_ms();
  rec.capacity_cpu_millicores = status.capacity().cpu_millicores();
  rec.capacity_memory_bytes = status.capacity().memory_bytes();
  rec.allocated_cpu_millicores = status.allocated().cpu_millicores();
  rec.allocated_memory_bytes = status.allocated().memory_bytes();
  // Heartbeats mostly repeat the list: compare before replacing, so that the caller re-counts the
  // node's holds only when it changed.
  std::vector<AllocatedBuild> builds;
  builds.reserve(static_cast<size_t>(status.allocated_builds_size()));
  for (const auto& b : status.allocated_builds()) {
    builds.push_back(AllocatedBuild{b.build_id(), b.cpu_millicores(), b.memory_bytes()});
  }
  std::sort(builds.begin(), builds.end(), [](const AllocatedBuild& a, const AllocatedBuild& b) {
    return a.build_id < b.build_id;
  });
  const auto same = [](const AllocatedBuild& a, const AllocatedBuild& b) {
    return a.build_id == b.build_id && a.cpu_millicores == b.cpu_millicores &&
           a.memory_bytes == b.memory_bytes;
  };
  if (builds_changed != nullptr) {
    *builds_changed = !std::equal(builds.begin(), builds.end(), rec.allocated_builds.begin(),
                                  rec.allocated_builds.end(), same);
  }
  rec.allocated_builds = std::move(builds);

  const auto leased_it = leases_.find(status.node_id());
  rec.gpus.clear();
  rec.gpus.reserve(static_cast<size_t>(status.gpus_size()));
  for (const auto& g : status.gpus()) {
    NodeGpu gpu;
    gpu.uuid = g.uuid();
    gpu.memory_bytes = g.memory_bytes();
    gpu.minor = g.minor();
    gpu.healthy = g.healthy();
    gpu.nvidia = g.vendor() == cvm::v1::NVIDIA;
    if (leased_it != leases_.end()) {
      const auto& uuids = leased_it->second;
      gpu.leased = std::find(uuids.begin(), uuids.end(), gpu.uuid) != uuids.end();
    }
    rec.gpus.push_back(std::move(gpu));
  }
  std::sort(rec.gpus.begin(), rec.gpus.end(), [](const NodeGpu& a, const NodeGpu& b) {
    return std::tie(a.minor, a.uuid) < std::tie(b.minor, b.uuid);
  });

  uint32_t caps = kCapOccupied;
  const auto& host = status.host();
  if (status.runtime().ready()) caps |= kCapRuntimeReady;
  if (!host.selinux_enforcing()) caps |= kCapSelinuxNotEnforcing;
  if (!host.selinux_enabled() && !host.selinux_enforcing()) caps |= kCapSelinuxOff;
  if (host.shiftfs_loaded() || host.shiftfs_module_available() || host.idmapped_mounts()) {
    caps |= kCapShiftfs;
  }
  if (host.kernel_headers()) caps |= kCapKernelHeaders;
  if (host.bare_metal()) caps |= kCapBareMetal;
  hot_[slot].caps = static_cast<uint16_t>(caps);
  hot_[slot].heartbeat_unix_ms = rec.heartbeat_unix_ms;
  refresh(slot);
  return slot;
}

void NodeIndex::reindex(NodeSlot slot) const {
  if (indexed_.size() < hot_.size()) indexed_.resize(hot_.size());
  const HotNode& h = hot_[slot];
  if ((h.caps & kCapOccupied) == 0) return unindex(slot);  // a removed node's slot
  const ScoreNode& sc = score_[slot];
  const NodeRecord& rec = records_[slot];
  const uint32_t caps = (h.caps & 0x7FU) | (h.gpu_free > 0 ? kCapGpu : 0U);
  const uint64_t key = uint64_t{caps} | (shape_bucket(rec.capacity_cpu_millicores) << 8) |
                       (shape_bucket(rec.capacity_memory_bytes) << 24);
  auto [it, created] = group_by_key_.try_emplace(key, static_cast<uint32_t>(groups_.size()));
  if (created) {
    groups_.emplace_back();
    groups_.back().caps = caps;
  }
  const uint32_t group = it->second;
  const double cpu_fraction = static_cast<double>(h.free_cpu) * sc.inv_capacity_cpu;
  const double memory_fraction = static_cast<double>(h.free_memory) * sc.inv_capacity_memory;
  const double free_fraction = cpu_fraction + memory_fraction;
  const uint32_t cell = grid_cell(cpu_fraction) * kGrid + grid_cell(memory_fraction);
  const auto widen = [&](Group& g) {
    g.min_inv_cpu = std::min(g.min_inv_cpu, sc.inv_capacity_cpu);
    g.max_inv_cpu = std::max(g.max_inv_cpu, sc.inv_capacity_cpu);
    g.min_inv_memory = std::min(g.min_inv_memory, sc.inv_capacity_memory);
    g.max_inv_memory = std::max(g.max_inv_memory, sc.inv_capacity_memory);
  };
  Indexed& at = indexed_[slot];
  if (at.group == group && at.cell == cell && at.free_fraction == free_fraction) {
    // A plain heartbeat, or a capacity change within the shape bucket that kept the free shares:
    // the node stays where it is, but the group's bounds must cover its capacity.
    widen(groups_[group]);
    return;
  }
  unindex(slot);
  Group& g = groups_[group];
  if (g.members == 0) {
    g.min_inv_cpu = g.max_inv_cpu = sc.inv_capacity_cpu;
    g.min_inv_memory = g.max_inv_memory = sc.inv_capacity_memory;
  } else {
    widen(g);
  }
  g.cells[cell].insert(IndexEntry{free_fraction, rec.node_id, slot});
  g.rows[cell / kGrid] |= 1U << (cell % kGrid);
  ++g.members;
  at = Indexed{group, cell, free_fraction};
}

void NodeIndex::unindex(NodeSlot slot) const {
  if (slot >= indexed_.size()) return;
  Indexed& at = indexed_[slot];
  if (at.group != kNotIndexed) {
    Group& g = groups_[at.group];
    auto& cell = g.cells[at.cell];
    auto it = cell.find(IndexEntry{at.free_fraction, records_[slot].node_id, slot});
    if (it != cell.end()) {
      cell.erase(it);
      --g.members;
      if (cell.empty()) g.rows[at.cell / kGrid] &= ~(1U << (at.cell % kGrid));
    }
  }
  at = Indexed{};  // not parked either
}

void NodeIndex::park(const std::vector<NodeSlot>& dead) const {
  for (NodeSlot slot : dead) {
    if (slot >= indexed_.size() || indexed_[slot].group == kNotIndexed) continue;
    unindex(slot);
    indexed_[slot].parked = true;
    parked_.push_back(slot);
    parked_newest_heartbeat_ = std::max(parked_newest_heartbeat_, hot_[slot].heartbeat_unix_ms);
  }
  // Slots put back since (or parked again) leave stale entries; keep the list bounded.
  if (parked_.size() > 2 * hot_.size() + 64) {
    std::erase_if(parked_, [&](NodeSlot slot) { return !indexed_[slot].parked; });
    std::sort(parked_.begin(), parked_.end());
    parked_.erase(std::unique(parked_.begin(), parked_.end()), parked_.end());
  }
}

void NodeIndex::unpark_all() const {
  for (NodeSlot slot : parked_) {
    if (slot < indexed_.size() && indexed_[slot].parked) reindex(slot);
  }
  parked_.clear();
  parked_newest_heartbeat_ = INT64_MIN;
}

void NodeIndex::refresh(NodeSlot slot) {
  const NodeRecord& rec = records_[slot];
  HotNode& h = hot_[slot];
  ScoreNode& sc = score_[slot];
  const uint64_t cap_cpu = rec.capacity_cpu_millicores;
  const uint64_t cap_mem = rec.capacity_memory_bytes;
  sc.inv_capacity_cpu = cap_cpu == 0 ? 0.0 : 1.0 / static_cast<double>(cap_cpu);
  sc.inv_capacity_memory = cap_mem == 0 ? 0.0 : 1.0 / static_cast<double>(cap_mem);
  const uint64_t free_cpu =
      saturating_sub(cap_cpu, rec.allocated_cpu_millicores + rec.reserved_cpu_millicores);
  h.free_cpu = static_cast<uint32_t>(std::min<uint64_t>(free_cpu, UINT32_MAX));
  h.free_memory = saturating_sub(cap_mem, rec.allocated_memory_bytes + rec.reserved_memory_bytes);
  uint32_t usable = 0;
  uint64_t smallest = UINT64_MAX;
  uint64_t largest = 0;
  for (const auto& g : rec.gpus) {
    if (g.healthy && g.nvidia && !g.leased) {
      ++usable;
      smallest = std::min(smallest, g.memory_bytes);
      largest = std::max(largest, g.memory_bytes);
    }
  }
  const auto mib = [](uint64_t bytes) {
    return static_cast<uint32_t>(std::min<uint64_t>(bytes >> 20, UINT32_MAX));
  };
  h.gpu_smallest_free_mib = mib(smallest);
  h.gpu_largest_free_mib = mib(largest);
  h.gpu_free = static_cast<uint16_t>(
      std::min<uint32_t>(usable > rec.reserved_gpus ? usable - rec.reserved_gpus : 0, UINT16_MAX));
  reindex(slot);
}

bool NodeIndex::remove(std::string_view node_id) {
  auto it = by_id_.find(node_id);
  if (it == by_id_.end()) return false;
  const NodeSlot slot = it->second;
  by_id_.erase(it);
  std::erase_if(reservations_, [&](const auto& kv) { return kv.second.node_id == node_id; });
  unindex(slot);
  records_[slot] = NodeRecord{};
  hot_[slot] = HotNode{};  // caps without kCapOccupied: the pass skips the slot
  score_[slot] = ScoreNode{};
  free_slots_.push_back(slot);
  return true;
}

const NodeRecord* NodeIndex::find(std::string_view node_id) const {
  auto it = by_id_.find(node_id);
  return it == by_id_.end() ? nullptr : &records_[it->second];
}

std::optional<NodeSlot> NodeIndex::slot_of(std::string_view node_id) const {
  auto it = by_id_.find(node_id);
  if (it == by_id_.end()) return std::nullopt;
  return it->second;
}

bool NodeIndex::reserve(std::string_view reservation_id, std::string_view node_id,
                        const Reservation& reservation) {
  auto node = by_id_.find(node_id);
  if (node == by_id_.end() || reservations_.contains(reservation_id)) return false;
  reservations_.emplace(std::string(reservation_id),
                        HeldReservation{std::string(node_id), reservation});
  NodeRecord& rec = records_[node->second];
  rec.reserved_cpu_millicores += reservation.cpu_millicores;
  rec.reserved_memory_bytes += reservation.memory_bytes;
  rec.reserved_gpus += reservation.gpus;
  refresh(node->second);
  return true;
}

bool NodeIndex::release(std::string_view reservation_id) {
  auto it = reservations_.find(reservation_id);
  if (it == reservations_.end()) return false;
  if (auto node = by_id_.find(it->second.node_id); node != by_id_.end()) {
    NodeRecord& rec = records_[node->second];
    const Reservation& r = it->second.amount;
    rec.reserved_cpu_millicores = saturating_sub(rec.reserved_cpu_millicores, r.cpu_millicores);
    rec.reserved_memory_bytes = saturating_sub(rec.reserved_memory_bytes, r.memory_bytes);
    rec.reserved_gpus = rec.reserved_gpus > r.gpus ? rec.reserved_gpus - r.gpus : 0;
    refresh(node->second);
  }
  reservations_.erase(it);
  return true;
}

void NodeIndex::set_gpu_leased(std::string_view node_id, std::string_view gpu_uuid, bool leased) {
  auto it = leases_.find(node_id);
  if (leased) {
    if (it == leases_.end())
      it = leases_.emplace(std::string(node_id), std::vector<std::string>{}).first;
    auto& uuids = it->second;
    if (std::find(uuids.begin(), uuids.end(), gpu_uuid) == uuids.end()) {
      uuids.emplace_back(gpu_uuid);
    }
  } else if (it != leases_.end()) {
    std::erase(it->second, gpu_uuid);
    if (it->second.empty()) leases_.erase(it);
  }

  auto node = by_id_.find(node_id);
  if (node == by_id_.end()) return;
  for (auto& g : records_[node->second].gpus) {
    if (g.uuid == gpu_uuid) g.leased = leased;
  }
  refresh(node->second);
}

// ---------------------------------------------------------------------------------------------
// Decisions

std::optional<PlacementDecision> check_request(const PlacementRequest& request) {
  if (request.cvm && !request.cvm_enabled) {
    return refuse(cvm::v1::CVM_DISABLED,
                  "the workspace asks for a CVM but CVMs are disabled in the infrastructure "
                  "settings");
  }
  if (request.gpu_count > 0) {
    if (!is_supported_vendor(request.gpu_vendor)) {
      return refuse(cvm::v1::GPU_VENDOR_UNSUPPORTED,
                    "only NVIDIA GPUs are supported; " +
                        cvm::v1::GpuVendor_Name(request.gpu_vendor) + " was requested");
    }
    if (request.cvm && request.caching) {
      return refuse(cvm::v1::GPU_WITH_CACHING_UNSUPPORTED,
                    "GPUs are not supported with cached CVMs (Caching is on)");
    }
  }
  return std::nullopt;
}

std::string rejection_message(const PlacementStats& stats) {
  std::string out = "0/" + std::to_string(stats.nodes) + " nodes fit: ";
  if (stats.nodes == 0) return out + "no nodes registered";

  std::array<size_t, kFilterCount> order{};
  for (size_t i = 0; i < kFilterCount; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (stats.rejected[a] != stats.rejected[b]) return stats.rejected[a] > stats.rejected[b];
    return kFilters[a].text < kFilters[b].text;
  });
  bool first = true;
  for (size_t i : order) {
    if (stats.rejected[i] == 0) break;
    if (!first) out += ", ";
    first = false;
    out += std::to_string(stats.rejected[i]);
    out += ' ';
    out += kFilters[i].text;
  }
  return out;
}

// The single pass. A friend of NodeIndex so it can read the compact hot array directly.
class PlacementPass {
 public:
  PlacementPass(const NodeIndex& nodes, const PlacementRequest& request,
                const PlacementOptions& options)
      : nodes_(nodes),
        options_(options),
        cpu_(effective_cpu(request.cpu_millicores)),
        memory_(effective_memory(request.memory_bytes)),
        gpus_(request.gpu_count),
        gpu_min_memory_(request.gpu_count > 0 ? request.gpu_min_memory_bytes : 0),
        live_after_(options.now_unix_ms - options.liveness_ttl_ms),
        binpack_(options.strategy != cvm::v1::SPREAD),
        max_candidates_(std::max<uint32_t>(options.max_candidates, 1)) {
    required_ = kCapOccupied | kCapRuntimeReady;
    if (request.cvm) {
      required_ |= kCapSelinuxNotEnforcing | kCapSelinuxOff;
      if (request.caching) {
        required_ |= kCapShiftfs;
        // Auto-load only matters with Caching (the mount table marks it n/a otherwise).
        if (request.auto_load_shiftfs) required_ |= kCapKernelHeaders;
      }
    }
    if (gpus_ > 0) required_ |= kCapBareMetal;
  }

  PlacementDecision run() {
    PlacementDecision d;
    const size_t slots = nodes_.hot_.size();
    d.stats.nodes = static_cast<uint32_t>(nodes_.size());
    stats_ = &d.stats;
    top_.reserve(max_candidates_ + 1);

    if (use_index()) {
      search_index();
      if (!top_.empty()) {
        finish(d);
        return d;
      }
      // Nothing fits: the full scan below counts every node for the message (and, should the
      // index ever disagree with the scan, still finds the node).
      d.stats = PlacementStats{};
      d.stats.nodes = static_cast<uint32_t>(nodes_.size());
      counts_ = {};
    }

    limit_ = feasible_limit(d.stats.nodes);

    const size_t start = slots == 0 ? 0 : static_cast<size_t>(options_.start_offset % slots);
    if (visit(start, slots)) visit(0, start);
    if (top_.empty()) {
      std::copy_n(counts_.begin(), kFilterCount, d.stats.rejected.begin());
      d.message = rejection_message(d.stats);
      d.reason = failure_reason(d.stats);
      return d;
    }
    finish(d);
    return d;
  }

 private:
  struct Scored {
    NodeSlot slot;
    double utilization;
  };

  void finish(PlacementDecision& d) const {
    std::copy_n(counts_.begin(), kFilterCount, d.stats.rejected.begin());
    d.candidates.reserve(top_.size());
    for (const auto& t : top_) {
      d.candidates.push_back(Candidate{t.slot, nodes_.records_[t.slot].node_id, t.utilization});
    }
  }

  bool use_index() const {
    switch (options_.search) {
      case Search::kScan:
        return false;
      case Search::kIndex:
        return true;
      case Search::kAuto:
        return options_.sampling == Sampling::kNone && nodes_.size() >= kIndexMinNodes;
    }
    return false;
  }

  // The capability index search. Within a group every member carries the request's capability
  // bits, so only liveness, GPUs, cpu and memory remain to check on the walk. A member with free
  // fraction k = free_cpu/cap_cpu + free_memory/cap_memory scores
  //   utilization = 1 - (k - d)/2,   d = cpu/cap_cpu + memory/cap_memory  (the request's share),
  // and d lies in [d_lo, d_hi] for the group (from its 1/capacity range). So walking a group in
  // order of k from the end that scores best, the best utilization any later member could reach
  // is known, and the walk stops as soon as that cannot beat the worst of the candidates held
  // (by more than kScoreEpsilon). A member that fits has free cpu >= cpu and free memory >=
  // memory, so k >= d >= d_lo: bin-packing starts its walk there (lower_bound), spreading stops
  // there.
  void search_index() {
    // A parked node is as old as parked_newest_heartbeat_ at most: dead for this decision too
    // unless its cut-off is that old.
    if (live_after_ <= nodes_.parked_newest_heartbeat_) nodes_.unpark_all();
    const uint32_t need = required_ | (gpus_ > 0 ? kCapGpu : 0U);
    for (const auto& g : nodes_.groups_) {
      if ((g.caps & need) != need || g.members == 0) continue;
      search_group(g);
    }
    if (!dead_.empty()) nodes_.park(dead_);
  }

  bool full() const { return top_.size() == max_candidates_; }
  // Whether a node that can at best reach this utilization may still beat the worst candidate
  // held (by more than kScoreEpsilon, the guarantee's slack), or with tie, equal it: an exact tie
  // goes to the smaller node id, which only a visit can tell. Each cell's walk admits ties until
  // it found a feasible member; after that, a tie from the same cell has a larger id (cells order
  // equal free fractions by id), so only a better member is worth the walk.
  bool may_beat(double best_possible, bool tie = false) const {
    if (!full()) return true;
    const double worst = top_.back().utilization;
    if (binpack_) {
      return tie ? best_possible >= worst - kScoreEpsilon : best_possible > worst + kScoreEpsilon;
    }
    return tie ? best_possible <= worst + kScoreEpsilon : best_possible < worst - kScoreEpsilon;
  }

  // The group's cells from the corner that scores best: bin-packing from the request's own
  // shares upward, spreading from the emptiest cell down. A cell's members have free fractions
  // within [lo_cpu + lo_memory, hi_cpu + hi_memory), which bounds what any of them can score, so
  // whole rows and cells drop out by the same rule as single members.
  void search_group(const NodeIndex::Group& g) {
    constexpr uint32_t kGrid = NodeIndex::kGrid;
    const auto& edges = grid_edges();
    const auto c = static_cast<double>(cpu_);
    const auto m = static_cast<double>(memory_);
    // The smallest share of a member's capacity the request can take, per resource: a member
    // with less free than that does not fit. No slack needed: rounding is monotone, so free >=
    // request implies fl(free * inv) >= fl(request * inv) >= fl(request * min_inv), and the same
    // holds for the cell (decided on the same edges) and the sum of both shares.
    const double cpu_share = c * g.min_inv_cpu;
    const double memory_share = m * g.min_inv_memory;
    const double d_lo = cpu_share + memory_share;
    const double d_hi = c * g.max_inv_cpu + m * g.max_inv_memory;
    const uint32_t ic = grid_cell(cpu_share);
    const uint32_t jm = grid_cell(memory_share);
    const auto cell_at = [&](uint32_t i, uint32_t j) -> const NodeIndex::Cell& {
      return g.cells[i * kGrid + j];
    };
    const uint32_t columns = ~0U << jm;  // memory cells at or above the request's share
    if (binpack_) {
      for (uint32_t i = ic; i < kGrid; ++i) {
        const double x_lo = std::max(edges.lo[i], cpu_share);
        // Every later row starts higher.
        if (!may_beat(1.0 - (x_lo + std::max(edges.lo[jm], memory_share) - d_hi) * 0.5, true)) {
          return;
        }
        for (uint32_t mask = g.rows[i] & columns; mask != 0; mask &= mask - 1) {
          const auto j = static_cast<uint32_t>(std::countr_zero(mask));
          const double k_lo = x_lo + std::max(edges.lo[j], memory_share);
          if (!may_beat(1.0 - (k_lo - d_hi) * 0.5, true)) break;  // later cells are higher
          walk_binpack(cell_at(i, j), k_lo, d_hi);
        }
      }
    } else {
      for (uint32_t i = kGrid; i-- > ic;) {
        // Every later row ends lower.
        if (!may_beat(1.0 - (edges.hi[i] + edges.hi[kGrid - 1] - d_lo) * 0.5, true)) return;
        for (uint32_t mask = g.rows[i] & columns; mask != 0;) {
          const auto j = static_cast<uint32_t>(std::bit_width(mask)) - 1;
          mask &= ~(1U << j);
          const double k_hi = edges.hi[i] + edges.hi[j];
          if (!may_beat(1.0 - (k_hi - d_lo) * 0.5, true)) break;  // later cells are lower
          walk_spread(cell_at(i, j), d_lo);
        }
      }
    }
  }

  // Bin-packing: the fullest first, i.e. ascending k from the smallest k that can fit.
  void walk_binpack(const NodeIndex::Cell& cell, double k_from, double d_hi) {
    bool found = false;
    for (auto it = cell.lower_bound(k_from); it != cell.end(); ++it) {
      if (!may_beat(1.0 - (it->free_fraction - d_hi) * 0.5, !found)) return;
      found |= visit_indexed(it->slot);
    }
  }

  // Spreading: the emptiest first, i.e. descending k. Members with equal k are walked by
  // ascending node id (the index orders ties that way), so a fleet of identical empty nodes costs
  // one step, and the tie goes to the smaller id as in the full scan.
  void walk_spread(const NodeIndex::Cell& cell, double d_lo) {
    bool found = false;
    auto block_end = cell.end();
    while (block_end != cell.begin()) {
      const auto last = std::prev(block_end);
      const double k = last->free_fraction;
      if (k < d_lo) return;  // nothing from here down fits
      const double best_possible = 1.0 - (k - d_lo) * 0.5;
      if (!may_beat(best_possible, !found)) return;
      const bool single = last == cell.begin() || std::prev(last)->free_fraction != k;
      const auto block_begin = single ? last : cell.lower_bound(k);
      for (auto it = block_begin; it != block_end && may_beat(best_possible, !found); ++it) {
        found |= visit_indexed(it->slot);
      }
      block_end = block_begin;
    }
  }

  // True when the node fits.
  bool visit_indexed(NodeSlot slot) {
    const NodeIndex::HotNode& h = nodes_.hot_[slot];
    const uint32_t fails = failed_filters(slot, h);
    ++counts_[static_cast<size_t>(std::countr_zero(fails | kPassedBit))];
    ++stats_->evaluated;
    if (fails & bit(Filter::kNodeLive, 1)) dead_.push_back(slot);
    if (fails != 0) return false;
    ++stats_->feasible;
    score(slot, h);
    return true;
  }

  // A full scan filters 256 nodes between scoring rounds; a sampled one stops soon, so it works in
  // smaller blocks to filter few nodes past the stopping point.
  static constexpr size_t kBlock = 256;
  static constexpr size_t kSampledBlock = 32;
  static constexpr uint32_t kPassedBit = 1U << kFilterCount;
  // Filters up to and including kGpuAvailable.
  static constexpr uint32_t kThroughGpuAvailable =
      (1U << (static_cast<uint32_t>(Filter::kGpuAvailable) + 1)) - 1;

  uint32_t feasible_limit(uint32_t n) const {
    switch (options_.sampling) {
      case Sampling::kNone:
        return UINT32_MAX;
      case Sampling::kLog2: {
        // ⌈log₂ n⌉ with Nomad's floor of 2.
        const uint32_t log2 = n <= 1 ? 0 : static_cast<uint32_t>(std::bit_width(n - 1));
        return std::max<uint32_t>(log2, 2);
      }
      case Sampling::kPercent: {
        const uint64_t pct = std::clamp<uint32_t>(options_.sample_percent, 1, 100);
        return static_cast<uint32_t>(std::max<uint64_t>((uint64_t{n} * pct + 99) / 100, 1));
      }
    }
    return UINT32_MAX;
  }

  // Filters a block of slots without branching on node data (fleet profiles are mixed, so
  // per-node branches mispredict), then scores the block's survivors. Returns false once
  // sampling found enough feasible nodes.
  bool visit(size_t begin, size_t end) {
    const auto& hot = nodes_.hot_;
    std::array<NodeSlot, kBlock> passed;
    const size_t block = limit_ == UINT32_MAX ? kBlock : kSampledBlock;
    for (size_t first = begin; first < end; first += block) {
      const size_t last = std::min(end, first + block);
      size_t n = 0;
      for (size_t slot = first; slot < last; ++slot) {
        const NodeIndex::HotNode& h = hot[slot];
        const uint32_t occupied = h.caps & kCapOccupied;
        const uint32_t fails = failed_filters(static_cast<NodeSlot>(slot), h);
        // The lowest set bit is the first filter in pipeline order; a passing node lands in the
        // extra "passed" counter. Empty slots add 0.
        const auto first_failed = static_cast<size_t>(std::countr_zero(fails | kPassedBit));
        counts_[first_failed] += occupied;
        stats_->evaluated += occupied;
        passed[n] = static_cast<NodeSlot>(slot);
        n += occupied & static_cast<uint32_t>(fails == 0);
      }
      for (size_t i = 0; i < n; ++i) {
        ++stats_->feasible;
        score(passed[i], hot[passed[i]]);
        if (stats_->feasible >= limit_) return false;
      }
    }
    return true;
  }

  // One bit per failed filter (bit = Filter value), computed without branches except for the
  // per-GPU memory check, which only GPU requests with a minimum memory pay.
  uint32_t failed_filters(NodeSlot slot, const NodeIndex::HotNode& h) const {
    const uint32_t missing = required_ & ~uint32_t{h.caps};
    uint32_t fails = bit(Filter::kNodeLive, h.heartbeat_unix_ms < live_after_) |
                     bit(Filter::kRuntimeReady, missing & kCapRuntimeReady) |
                     bit(Filter::kSelinuxEnforcing, missing & kCapSelinuxNotEnforcing) |
                     bit(Filter::kSelinuxEnabled, missing & kCapSelinuxOff) |
                     bit(Filter::kCachingShiftfs, missing & kCapShiftfs) |
                     bit(Filter::kKernelHeaders, missing & kCapKernelHeaders) |
                     bit(Filter::kGpuBareMetal, missing & kCapBareMetal) |
                     bit(Filter::kGpuAvailable, h.gpu_free < gpus_) |
                     bit(Filter::kCpu, h.free_cpu < cpu_) |
                     bit(Filter::kMemory, h.free_memory < memory_);
    // Only when no earlier filter already decided, so the count lands under the right filter.
    if (gpu_min_memory_ > 0 && (fails & kThroughGpuAvailable) == 0 && (h.caps & kCapOccupied) &&
        gpu_min_memory_ > (uint64_t{h.gpu_smallest_free_mib} << 20)) {
      // Above the largest free GPU (plus the MiB rounding): none fits. In between: count.
      const bool none = gpu_min_memory_ >= (uint64_t{h.gpu_largest_free_mib} + 1) << 20;
      if (none || !enough_gpu_memory(slot)) fails |= bit(Filter::kGpuAvailable, true);
    }
    return fails;
  }

  static constexpr uint32_t bit(Filter f, uint32_t failed) {
    return static_cast<uint32_t>(failed != 0) << static_cast<uint32_t>(f);
  }

  bool enough_gpu_memory(NodeSlot slot) const {
    const NodeRecord& rec = nodes_.records_[slot];
    uint32_t fit = 0;
    for (const auto& g : rec.gpus) {
      if (g.healthy && g.nvidia && !g.leased && g.memory_bytes >= gpu_min_memory_) ++fit;
    }
    // In-flight GPU reservations are counted against the fitting GPUs: conservative, the broker
    // has the final word.
    return fit >= gpus_ + rec.reserved_gpus;
  }

  void score(NodeSlot slot, const NodeIndex::HotNode& h) {
    // Fraction used after placement = 1 - (free - request) / capacity, for cpu and memory.
    const NodeIndex::ScoreNode& sc = nodes_.score_[slot];
    const double cpu_left = static_cast<double>(h.free_cpu - cpu_) * sc.inv_capacity_cpu;
    const double mem_left = static_cast<double>(h.free_memory - memory_) * sc.inv_capacity_memory;
    const double u = 1.0 - (cpu_left + mem_left) * 0.5;
    const Scored s{slot, u};
    if (top_.size() == max_candidates_ && !better(s, top_.back())) return;
    auto pos = std::upper_bound(top_.begin(), top_.end(), s,
                                [&](const Scored& a, const Scored& b) { return better(a, b); });
    top_.insert(pos, s);
    if (top_.size() > max_candidates_) top_.pop_back();
  }

  bool better(const Scored& a, const Scored& b) const {
    if (a.utilization != b.utilization) {
      return binpack_ ? a.utilization > b.utilization : a.utilization < b.utilization;
    }
    // Ties go to the smaller node id so replicas and reruns agree.
    return nodes_.records_[a.slot].node_id < nodes_.records_[b.slot].node_id;
  }

  static cvm::v1::Reason failure_reason(const PlacementStats& stats) {
    if (stats.nodes == 0) return cvm::v1::NO_ELIGIBLE_NODE;
    // The wire contract: a request that fits no node is NO_ELIGIBLE_NODE, the message saying why
    // per filter, capacity included. Only the documented GPU rule gets a reason of its own, when
    // it alone turned every node away.
    uint32_t bare_metal = 0, total = 0;
    for (size_t i = 0; i < kFilterCount; ++i) {
      total += stats.rejected[i];
      if (static_cast<Filter>(i) == Filter::kGpuBareMetal) bare_metal += stats.rejected[i];
    }
    if (bare_metal == total) return cvm::v1::GPU_REQUIRES_BARE_METAL;
    return cvm::v1::NO_ELIGIBLE_NODE;
  }

  const NodeIndex& nodes_;
  const PlacementOptions& options_;
  const uint64_t cpu_;
  const uint64_t memory_;
  const uint32_t gpus_;
  const uint64_t gpu_min_memory_;
  const int64_t live_after_;
  const bool binpack_;
  const uint32_t max_candidates_;
  uint32_t required_ = 0;
  uint32_t limit_ = UINT32_MAX;
  PlacementStats* stats_ = nullptr;
  std::array<uint32_t, kFilterCount + 1> counts_{};  // by Filter, then "passed"
  std::vector<Scored> top_;
  std::vector<NodeSlot> dead_;  // met by the index search, parked after it
};

PlacementDecision place(const NodeIndex& nodes, const PlacementRequest& request,
                        const PlacementOptions& options) {
  if (auto refused = check_request(request)) {
    refused->stats.nodes = static_cast<uint32_t>(nodes.size());
    return std::move(*refused);
  }
  return PlacementPass(nodes, request, options).run();
}

}  // namespace cvm::scheduler
