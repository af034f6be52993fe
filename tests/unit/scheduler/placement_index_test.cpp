// Property tests of the capability index search (Search::kIndex) against the full scan
// (Search::kScan, the reference) and against an independent model of the filters: random fleets,
// random requests, and random reserve/release/upsert/remove/lease sequences between decisions.
//
// The guarantee under test (placement.h, Search):
//   - both searches agree on success or failure; a failure is the full scan's (same message);
//   - every candidate the index returns is feasible by the model (live, capabilities, GPUs, cpu
//     and memory after reservations), and the candidates are distinct;
//   - the i-th candidate's utilization is within kScoreEpsilon of the full scan's i-th;
//   - when the full scan's best beats its runner-up by more than kScoreEpsilon (or is the only
//     feasible node), the index returns the same node.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cvm/scheduler/placement.h"

namespace cvm::scheduler {
namespace {

constexpr int64_t kNow = 1'700'000'000'000;
constexpr uint64_t kGiB = 1ULL << 30;
constexpr uint64_t kMiB = 1ULL << 20;

// A ready node without GPUs: `cpu` millicores and `memory` bytes, `used_cpu` and `used_memory` of
// them allocated, last heartbeat at `heartbeat`.
cvm::v1::NodeStatus plain_node(const std::string& id, uint64_t cpu, uint64_t memory,
                               uint64_t used_cpu = 0, uint64_t used_memory = 0,
                               int64_t heartbeat = kNow) {
  cvm::v1::NodeStatus s;
  s.set_node_id(id);
  s.set_heartbeat_unix_ms(heartbeat);
  s.mutable_runtime()->set_ready(true);
  s.mutable_capacity()->set_cpu_millicores(cpu);
  s.mutable_capacity()->set_memory_bytes(memory);
  s.mutable_allocated()->set_cpu_millicores(used_cpu);
  s.mutable_allocated()->set_memory_bytes(used_memory);
  return s;
}

// A plain container (no CVM rules) of the default size.
PlacementRequest plain_request() {
  PlacementRequest r;
  r.cvm = false;
  return r;
}

PlacementOptions at_now(Search search) {
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.search = search;
  return o;
}

// The model: what the index was told, kept independently of it.
struct Model {
  std::map<std::string, cvm::v1::NodeStatus> nodes;
  std::map<std::string, std::pair<std::string, Reservation>> reservations;  // id -> node, amount
  std::map<std::string, std::set<std::string>> leases;                      // node -> uuids

  Reservation reserved_on(const std::string& node) const {
    Reservation sum;
    for (const auto& [id, held] : reservations) {
      if (held.first != node) continue;
      sum.cpu_millicores += held.second.cpu_millicores;
      sum.memory_bytes += held.second.memory_bytes;
      sum.gpus += held.second.gpus;
    }
    return sum;
  }

  // The filters, written plainly from the rules (docs/architecture.md), not from the index.
  bool feasible(const std::string& node, const PlacementRequest& r, int64_t now,
                int64_t ttl) const {
    const auto& s = nodes.at(node);
    const auto& h = s.host();
    if (s.heartbeat_unix_ms() < now - ttl) return false;
    if (!s.runtime().ready()) return false;
    if (r.cvm) {
      if (h.selinux_enforcing() || h.selinux_enabled()) return false;
      if (r.caching) {
        if (!h.shiftfs_loaded() && !h.shiftfs_module_available() && !h.idmapped_mounts())
          return false;
        if (r.auto_load_shiftfs && !h.kernel_headers()) return false;
      }
    }
    const Reservation held = reserved_on(node);
    if (r.gpu_count > 0) {
      if (!h.bare_metal()) return false;
      const auto leased = leases.find(node);
      uint32_t fit = 0;
      for (const auto& g : s.gpus()) {
        const bool is_leased = leased != leases.end() && leased->second.contains(g.uuid());
        if (g.healthy() && g.vendor() == cvm::v1::NVIDIA && !is_leased &&
            g.memory_bytes() >= r.gpu_min_memory_bytes)
          ++fit;
      }
      if (fit < r.gpu_count + held.gpus) return false;
    }
    const auto left = [](uint64_t cap, uint64_t used) { return cap > used ? cap - used : 0; };
    if (left(s.capacity().cpu_millicores(), s.allocated().cpu_millicores() + held.cpu_millicores) <
        effective_cpu(r.cpu_millicores))
      return false;
    if (left(s.capacity().memory_bytes(), s.allocated().memory_bytes() + held.memory_bytes) <
        effective_memory(r.memory_bytes))
      return false;
    return true;
  }
};

class Fuzz {
 public:
  explicit Fuzz(uint64_t seed) : rng_(seed) {}

  uint64_t below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  bool pct(int p) { return static_cast<int>(below(100)) < p; }

  // A few machine types (one of them with a memory that differs by some MB from node to node, as
  // MemTotal does), some one-off capacities, and now and then a zero one.
  std::pair<uint64_t, uint64_t> capacity() {
    switch (below(8)) {
      case 0:
      case 1:
        return {8'000, 32 * kGiB};
      case 2:
      case 3:
        return {16'000, 64 * kGiB};
      case 4:
        return {64'000, 256 * kGiB};
      case 5:
        return {32'000, 128 * kGiB - below(64) * kMiB};
      case 6:
        return {1'000 + below(128'000), kGiB + below(512) * kGiB};
      default:
        return pct(10) ? std::pair<uint64_t, uint64_t>{0, 0}
                       : std::pair<uint64_t, uint64_t>{4'000, 16 * kGiB};
    }
  }

  // Quantized (many exact ties in free fraction) or arbitrary, sometimes full or over-committed.
  uint64_t used(uint64_t cap) {
    if (cap == 0) return 0;
    switch (below(5)) {
      case 0:
        return 0;
      case 1:
        return cap * below(11) / 10;
      case 2:
        return pct(20) ? cap + below(1000) : cap;
      default:
        return below(cap);
    }
  }

  cvm::v1::NodeStatus node(const std::string& id) {
    cvm::v1::NodeStatus s;
    s.set_node_id(id);
    s.set_heartbeat_unix_ms(pct(10) ? kNow - 20'000 - static_cast<int64_t>(below(60'000))
                                    : kNow - static_cast<int64_t>(below(15'000)));
    s.mutable_runtime()->set_ready(!pct(8));
    auto* h = s.mutable_host();
    const bool enforcing = pct(10);
    h->set_selinux_enforcing(enforcing);
    h->set_selinux_enabled(enforcing || pct(8));
    h->set_shiftfs_loaded(pct(40));
    h->set_shiftfs_module_available(pct(20));
    h->set_idmapped_mounts(pct(30));
    h->set_kernel_headers(pct(70));
    const bool bare_metal = pct(50);
    h->set_bare_metal(bare_metal);
    const auto [cpu, mem] = capacity();
    s.mutable_capacity()->set_cpu_millicores(cpu);
    s.mutable_capacity()->set_memory_bytes(mem);
    s.mutable_allocated()->set_cpu_millicores(used(cpu));
    s.mutable_allocated()->set_memory_bytes(used(mem));
    if (pct(bare_metal ? 40 : 10)) {
      const uint64_t gpus = 1 + below(8);
      for (uint32_t g = 0; g < gpus; ++g) {
        auto* gpu = s.add_gpus();
        gpu->set_uuid(id + "-gpu" + std::to_string(g));
        gpu->set_minor(g);
        gpu->set_memory_bytes(pct(50) ? 40 * kGiB : 80 * kGiB);
        gpu->set_healthy(!pct(10));
        gpu->set_vendor(pct(90) ? cvm::v1::NVIDIA : cvm::v1::AMD);
      }
    }
    return s;
  }

  PlacementRequest request() {
    PlacementRequest r;
    r.cpu_millicores = pct(10) ? 0 : 250 * (1 + below(32));
    r.memory_bytes = pct(10) ? 0 : 256 * kMiB * (1 + below(64));
    r.cvm = !pct(15);
    r.caching = pct(50);
    r.auto_load_shiftfs = pct(50);
    if (pct(20)) {
      r.gpu_count = 1 + static_cast<uint32_t>(below(4));
      r.gpu_vendor = cvm::v1::NVIDIA;
      r.caching = false;  // GPUs with Caching are refused before any node (check_request)
      r.gpu_min_memory_bytes = pct(50) ? 0 : (pct(50) ? 40 * kGiB : 60 * kGiB);
    }
    return r;
  }

  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
};

struct Tally {
  uint64_t decisions = 0;
  uint64_t identical = 0;
  uint64_t strict_winner = 0;
  uint64_t failures = 0;
};

void check_one(const NodeIndex& index, const Model& model, const PlacementRequest& r,
               const PlacementOptions& base, Tally& tally) {
  PlacementOptions scan = base;
  scan.search = Search::kScan;
  PlacementOptions indexed = base;
  indexed.search = Search::kIndex;
  // The runner-up tells whether the scan's best is a strict winner.
  PlacementOptions scan2 = scan;
  scan2.max_candidates = std::max<uint32_t>(base.max_candidates, 2);

  const auto want = place(index, r, scan);
  const auto want2 = place(index, r, scan2);
  const auto got = place(index, r, indexed);
  ++tally.decisions;

  ASSERT_EQ(got.ok(), want.ok()) << want.message << " / " << got.message;
  if (!want.ok()) {
    ++tally.failures;
    EXPECT_EQ(got.reason, want.reason);
    EXPECT_EQ(got.message, want.message);
    EXPECT_EQ(got.stats.rejected, want.stats.rejected);
    return;
  }
  ASSERT_EQ(got.candidates.size(), want.candidates.size());
  std::set<std::string> seen;
  for (size_t i = 0; i < got.candidates.size(); ++i) {
    const auto& c = got.candidates[i];
    EXPECT_TRUE(seen.insert(c.node_id).second) << "duplicate candidate " << c.node_id;
    EXPECT_TRUE(model.feasible(c.node_id, r, base.now_unix_ms, base.liveness_ttl_ms))
        << "candidate " << c.node_id << " does not fit";
    EXPECT_EQ(index.slot_of(c.node_id), c.slot);
    EXPECT_NEAR(c.utilization, want.candidates[i].utilization, kScoreEpsilon + 1e-12)
        << "rank " << i;
  }
  for (const auto& c : want.candidates) {
    EXPECT_TRUE(model.feasible(c.node_id, r, base.now_unix_ms, base.liveness_ttl_ms))
        << "the reference scan chose " << c.node_id << " which the model says does not fit";
  }
  const bool strict =
      want2.candidates.size() == 1 ||
      std::abs(want2.candidates[0].utilization - want2.candidates[1].utilization) > kScoreEpsilon;
  if (strict) {
    ++tally.strict_winner;
    EXPECT_EQ(got.best().node_id, want.best().node_id);
  }
  if (got.best().node_id == want.best().node_id) ++tally.identical;
}

// One random life of an index: build, decide, mutate, decide...
Tally run_life(uint64_t seed, int nodes, int rounds, int requests_per_round) {
  Fuzz fz(seed);
  NodeIndex index;
  Model model;
  std::vector<std::string> ids;
  int next_id = 0;
  auto add = [&] {
    // Ids in random order of value so that slot order and id order differ.
    const std::string id =
        "n" + std::to_string(fz.below(1'000'000)) + "-" + std::to_string(next_id++);
    auto s = fz.node(id);
    index.upsert(s, 1);
    model.nodes[id] = s;
    ids.push_back(id);
  };
  for (int i = 0; i < nodes; ++i) add();
  // Some identical nodes (exact ties everywhere).
  for (int i = 0; i < nodes / 10; ++i) {
    cvm::v1::NodeStatus s = model.nodes.begin()->second;
    const std::string id = "twin" + std::to_string(next_id++);
    s.set_node_id(id);
    index.upsert(s, 1);
    model.nodes[id] = s;
    ids.push_back(id);
  }

  Tally tally;
  int reservation = 0;
  for (int round = 0; round < rounds; ++round) {
    for (int q = 0; q < requests_per_round; ++q) {
      PlacementOptions o;
      // Now and then an older "now" or a longer TTL: nodes parked as dead must come back.
      o.now_unix_ms = fz.pct(10) ? kNow - static_cast<int64_t>(fz.below(40'000)) : kNow;
      if (fz.pct(10)) o.liveness_ttl_ms = 60'000;
      o.strategy = fz.pct(50) ? cvm::v1::BINPACK : cvm::v1::SPREAD;
      o.max_candidates = static_cast<uint32_t>(fz.below(5));  // 0 means 1
      const auto r = fz.request();
      check_one(index, model, r, o, tally);
      if (::testing::Test::HasFatalFailure()) return tally;
      // Commit some decisions, as the scheduler does, so the fleet fills up.
      if (fz.pct(50)) {
        PlacementOptions commit = o;
        commit.search = Search::kIndex;
        const auto d = place(index, r, commit);
        if (d.ok()) {
          const std::string id = "r" + std::to_string(reservation++);
          const auto amount = reservation_for(r);
          EXPECT_TRUE(index.reserve(id, d.best().node_id, amount));
          model.reservations[id] = {d.best().node_id, amount};
        }
      }
    }
    // Mutations between rounds.
    const int mutations = 1 + static_cast<int>(fz.below(static_cast<uint64_t>(nodes) / 4 + 1));
    for (int k = 0; k < mutations && !ids.empty(); ++k) {
      const std::string id = ids[fz.below(ids.size())];
      switch (fz.below(8)) {
        case 0: {  // a heartbeat that changes the load
          auto& s = model.nodes.at(id);
          s.mutable_allocated()->set_cpu_millicores(fz.used(s.capacity().cpu_millicores()));
          s.mutable_allocated()->set_memory_bytes(fz.used(s.capacity().memory_bytes()));
          s.set_heartbeat_unix_ms(kNow - static_cast<int64_t>(fz.below(20'000)));
          index.upsert(s, 2);
          break;
        }
        case 1: {  // a node that changes everything (capabilities, capacity, GPUs)
          auto s = fz.node(id);
          index.upsert(s, 3);
          model.nodes[id] = s;
          break;
        }
        case 2: {  // removed (and its reservations dropped)
          EXPECT_TRUE(index.remove(id));
          model.nodes.erase(id);
          std::erase_if(model.reservations, [&](const auto& kv) { return kv.second.first == id; });
          std::erase(ids, id);
          break;
        }
        case 3: {  // a release
          if (model.reservations.empty()) break;
          auto it = model.reservations.begin();
          std::advance(it, static_cast<long>(fz.below(model.reservations.size())));
          EXPECT_TRUE(index.release(it->first));
          model.reservations.erase(it);
          break;
        }
        case 4: {  // a GPU lease taken or returned
          const auto& s = model.nodes.at(id);
          if (s.gpus_size() == 0) break;
          const auto& uuid =
              s.gpus(static_cast<int>(fz.below(static_cast<uint64_t>(s.gpus_size())))).uuid();
          const bool leased = fz.pct(60);
          index.set_gpu_leased(id, uuid, leased);
          if (leased) {
            model.leases[id].insert(uuid);
          } else {
            model.leases[id].erase(uuid);
          }
          break;
        }
        case 5: {  // a reservation made by hand on any node (may over-commit it)
          const std::string rid = "h" + std::to_string(reservation++);
          const Reservation amount{fz.below(8'000), fz.below(32) * kGiB,
                                   static_cast<uint32_t>(fz.below(2))};
          EXPECT_TRUE(index.reserve(rid, id, amount));
          model.reservations[rid] = {id, amount};
          break;
        }
        case 6: {  // capacity and load scaled alike: free shares (nearly) kept, same bucket
          auto& s = model.nodes.at(id);
          const uint64_t pct = 100 + fz.below(5);
          s.mutable_capacity()->set_cpu_millicores(s.capacity().cpu_millicores() * pct / 100);
          s.mutable_allocated()->set_cpu_millicores(s.allocated().cpu_millicores() * pct / 100);
          s.mutable_capacity()->set_memory_bytes(s.capacity().memory_bytes() / 100 * pct);
          s.mutable_allocated()->set_memory_bytes(s.allocated().memory_bytes() / 100 * pct);
          index.upsert(s, 4);
          break;
        }
        default:
          add();
          break;
      }
    }
    EXPECT_EQ(index.size(), model.nodes.size());
    EXPECT_EQ(index.reservations(), model.reservations.size());
  }
  return tally;
}

TEST(IndexSearch, AgreesWithTheFullScanOnRandomFleetsAndHistories) {
  Tally total;
  for (uint64_t seed = 1; seed <= 24; ++seed) {
    const int nodes = 20 + static_cast<int>(seed * 17 % 300);
    const Tally t = run_life(seed, nodes, 6, 40);
    if (HasFatalFailure()) return;
    total.decisions += t.decisions;
    total.identical += t.identical;
    total.strict_winner += t.strict_winner;
    total.failures += t.failures;
  }
  // The test must exercise both outcomes and real ties, or it proves little.
  EXPECT_GT(total.failures, total.decisions / 50);
  EXPECT_GT(total.decisions - total.failures, total.decisions / 2);
  EXPECT_LT(total.strict_winner, total.decisions - total.failures);
  std::printf("decisions %llu, placed %llu, strict winners %llu, identical %llu\n",
              static_cast<unsigned long long>(total.decisions),
              static_cast<unsigned long long>(total.decisions - total.failures),
              static_cast<unsigned long long>(total.strict_winner),
              static_cast<unsigned long long>(total.identical));
}

// A larger fleet, fewer decisions: groups with many members, long walks, deep trees.
TEST(IndexSearch, AgreesOnALargerFleet) { run_life(99, 3000, 3, 60); }

// Auto picks the index from kIndexMinNodes on (and it looks at far fewer nodes than exist).
TEST(IndexSearch, AutoUsesTheIndexOnLargeFleets) {
  NodeIndex index;
  for (size_t i = 0; i < kIndexMinNodes; ++i) {
    index.upsert(
        plain_node("n" + std::to_string(i), 16'000, 64 * kGiB, i % 16 * 1000, i % 16 * 4 * kGiB));
  }
  const auto r = plain_request();
  auto o = at_now(Search::kAuto);
  const auto d = place(index, r, o);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.stats.nodes, kIndexMinNodes);
  EXPECT_LT(d.stats.evaluated, 8u);
  // The fullest nodes (15 of 16 cores used) tie; the smallest id wins, as in the scan.
  EXPECT_EQ(d.best().node_id, "n1007");
  o.search = Search::kScan;
  EXPECT_EQ(place(index, r, o).best().node_id, "n1007");
  EXPECT_EQ(place(index, r, o).stats.evaluated, kIndexMinNodes);

  // Sampling is a scan option: with it, auto scans.
  o.search = Search::kAuto;
  o.sampling = Sampling::kLog2;
  EXPECT_EQ(place(index, r, o).stats.feasible, 10u);  // ⌈log₂ 1024⌉
}

// Spread on a fleet of identical empty nodes: one step, smallest id.
TEST(IndexSearch, SpreadOverIdenticalNodesTakesTheSmallestIdInOneStep) {
  NodeIndex index;
  for (int i = 0; i < 2000; ++i) {
    // Inserted out of order.
    index.upsert(plain_node("n" + std::to_string(1000 + (i * 7919) % 2000), 16'000, 64 * kGiB));
  }
  const auto r = plain_request();
  auto o = at_now(Search::kIndex);
  for (auto strategy : {cvm::v1::SPREAD, cvm::v1::BINPACK}) {
    o.strategy = strategy;
    const auto d = place(index, r, o);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d.best().node_id, "n1000");
    EXPECT_EQ(d.stats.evaluated, 1u);
  }
}

// Dead nodes stay in the index until removed; the walk skips them, however many.
TEST(IndexSearch, NeverChoosesADeadOrFullNode) {
  NodeIndex index;
  auto node = [&](const std::string& id, int64_t heartbeat, uint64_t used_cpu) {
    index.upsert(plain_node(id, 16'000, 64 * kGiB, used_cpu, 0, heartbeat));
  };
  for (int i = 0; i < 500; ++i) node("dead" + std::to_string(i), kNow - 16'000, 15'000);
  for (int i = 0; i < 500; ++i) node("full" + std::to_string(i), kNow, 15'500);
  node("ok", kNow, 0);
  const auto r = plain_request();
  auto o = at_now(Search::kIndex);
  o.max_candidates = 3;
  const auto d = place(index, r, o);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(d.candidates.size(), 1u);
  EXPECT_EQ(d.best().node_id, "ok");
  // A reservation that fills it: now nothing fits and the message counts every node.
  ASSERT_TRUE(index.reserve("b", "ok", Reservation{16'000, 0, 0}));
  const auto f = place(index, r, o);
  EXPECT_FALSE(f.ok());
  EXPECT_EQ(f.message, "0/1001 nodes fit: 501 insufficient cpu, 500 node not live");
}

// A copy of the index is independent of the original and decides the same.
TEST(IndexSearch, CopiesDecideTheSameAndIndependently) {
  Fuzz fz(7);
  NodeIndex index;
  for (int i = 0; i < 300; ++i) index.upsert(fz.node("n" + std::to_string(i)));
  const NodeIndex copy = index;
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.search = Search::kIndex;
  for (int q = 0; q < 50; ++q) {
    const auto r = fz.request();
    const auto a = place(index, r, o);
    const auto b = place(copy, r, o);
    ASSERT_EQ(a.ok(), b.ok());
    if (a.ok()) {
      EXPECT_EQ(a.best().node_id, b.best().node_id);
    }
  }
  for (int i = 0; i < 300; ++i) index.remove("n" + std::to_string(i));
  EXPECT_EQ(copy.size(), 300u);
  PlacementRequest any;
  any.cvm = false;
  any.cpu_millicores = 1;
  any.memory_bytes = 1;
  EXPECT_FALSE(place(index, any, o).ok());
}

}  // namespace
}  // namespace cvm::scheduler

namespace cvm::scheduler {
namespace {

// A capacity change inside one shape bucket that leaves the free shares as they were must still
// widen the group's bounds: with stale bounds the walk would start past the node.
TEST(IndexSearch, CapacityChangeWithinAShapeBucketKeepsTheNodeReachable) {
  NodeIndex index;
  auto node = [&](const std::string& id, uint64_t cpu, uint64_t used_cpu) {
    // Half the memory used: on a cell's lower edge.
    index.upsert(plain_node(id, cpu, 64 * kGiB, used_cpu, 32 * kGiB));
  };
  node("a", 17'000, 8'500);  // half free
  node("a", 17'500, 8'750);  // still half free, same bucket: 8,750 millicores free now
  node("z", 64'000, 0);      // fits too, but emptier
  auto r = plain_request();
  r.cpu_millicores = 8'750;
  r.memory_bytes = kGiB;
  auto o = at_now(Search::kScan);
  ASSERT_EQ(place(index, r, o).best().node_id, "a");
  o.search = Search::kIndex;
  EXPECT_EQ(place(index, r, o).best().node_id, "a");
}

}  // namespace
}  // namespace cvm::scheduler

namespace cvm::scheduler {
namespace {

// A node found dead leaves the walk until it changes; an older cut-off brings it back first.
TEST(IndexSearch, DeadNodesAreParkedAndComeBack) {
  NodeIndex index;
  auto node = [&](const std::string& id, int64_t heartbeat, uint64_t used_cpu) {
    index.upsert(plain_node(id, 16'000, 64 * kGiB, used_cpu, 0, heartbeat));
  };
  node("old", kNow - 20'000, 12'000);  // the fuller one: bin-packing's first look
  node("fresh", kNow, 0);
  const auto r = plain_request();
  const auto o = at_now(Search::kIndex);
  auto d = place(index, r, o);
  EXPECT_EQ(d.best().node_id, "fresh");
  EXPECT_EQ(d.stats.evaluated, 2u);
  d = place(index, r, o);
  EXPECT_EQ(d.best().node_id, "fresh");
  EXPECT_EQ(d.stats.evaluated, 1u);  // parked
  PlacementOptions earlier = o;
  earlier.now_unix_ms = kNow - 10'000;  // "old" was live then
  EXPECT_EQ(place(index, r, earlier).best().node_id, "old");
  PlacementOptions longer = o;
  longer.liveness_ttl_ms = 30'000;
  EXPECT_EQ(place(index, r, o).best().node_id, "fresh");  // parked again
  EXPECT_EQ(place(index, r, longer).best().node_id, "old");
  EXPECT_EQ(place(index, r, o).best().node_id, "fresh");
  node("old", kNow, 12'000);  // its heartbeat is back
  EXPECT_EQ(place(index, r, o).best().node_id, "old");
  // Removed while parked: gone for good, and its slot is reused cleanly.
  node("old", kNow - 20'000, 12'000);
  EXPECT_EQ(place(index, r, o).best().node_id, "fresh");
  EXPECT_TRUE(index.remove("old"));
  EXPECT_EQ(place(index, r, earlier).best().node_id, "fresh");
  EXPECT_EQ(place(index, r, earlier).stats.evaluated, 1u);
  node("new", kNow, 8'000);
  EXPECT_EQ(place(index, r, o).best().node_id, "new");
}

}  // namespace
}  // namespace cvm::scheduler
