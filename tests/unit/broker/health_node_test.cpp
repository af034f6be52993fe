// Quarantine and recovery, node choice (packed / spread, policy refusals), the gauges' counts and
// the health notices: pure functions over plain data.
#include <gtest/gtest.h>

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "cvm/broker/allocator.h"
#include "dgx_fixture.h"

namespace cvm::broker {
namespace {

using fixture::dgx;
using fixture::gpu_uuid;
using fixture::kGiB;

constexpr int64_t kNow = 1'700'000'000'000;
constexpr int64_t kPeriod = 600'000;

HealthOptions at(int64_t now) { return {.now_unix_ms = now, .healthy_period_ms = kPeriod}; }

// --- quarantine ----------------------------------------------------------------------------------

TEST(Quarantine, HealthyWithoutEventsIsInService) {
  const auto g = dgx().gpus[0];
  EXPECT_FALSE(is_quarantined(g, at(kNow)));
  EXPECT_EQ(quarantined_until(g, at(kNow)), 0);
}

TEST(Quarantine, UnhealthyStaysOutWhateverTheTime) {
  auto g = dgx().gpus[0];
  g.set_healthy(false);
  EXPECT_TRUE(is_quarantined(g, at(kNow)));
  EXPECT_EQ(quarantined_until(g, at(kNow + 10 * kPeriod)), std::numeric_limits<int64_t>::max());
}

TEST(Quarantine, ReturnsAfterTheHealthyPeriod) {
  auto g = dgx().gpus[0];
  g.set_last_health_event_unix_ms(kNow);
  g.set_last_xid(79);
  EXPECT_TRUE(is_quarantined(g, at(kNow)));
  EXPECT_TRUE(is_quarantined(g, at(kNow + kPeriod - 1)));
  EXPECT_EQ(quarantined_until(g, at(kNow + 1)), kNow + kPeriod);
  EXPECT_FALSE(is_quarantined(g, at(kNow + kPeriod)));
  // A new event restarts the period.
  g.set_last_health_event_unix_ms(kNow + kPeriod + 5);
  EXPECT_TRUE(is_quarantined(g, at(kNow + kPeriod + 10)));
}

TEST(Quarantine, ZeroPeriodOnlyHonoursTheHealthyFlag) {
  auto g = dgx().gpus[0];
  g.set_last_health_event_unix_ms(kNow);
  EXPECT_FALSE(is_quarantined(g, {.now_unix_ms = kNow, .healthy_period_ms = 0}));
}

TEST(Quarantine, ChoiceSkipsAndRecovers) {
  auto n = dgx();
  n.gpus[0].set_last_health_event_unix_ms(kNow);
  auto c = choose_gpus(n, {}, 1, 0, at(kNow + 1000));
  ASSERT_TRUE(c.ok());
  EXPECT_NE(c.gpus[0].uuid(), gpu_uuid(0));
  EXPECT_FALSE(choose_gpus(n, {}, 8, 0, at(kNow + 1000)).ok());
  EXPECT_EQ(choose_gpus(n, {}, 8, 0, at(kNow + 1000)).refusal->message,
            "node dgx has 7 free GPUs, 8 requested (1 more quarantined)");
  c = choose_gpus(n, {}, 1, 0, at(kNow + kPeriod));
  EXPECT_EQ(c.gpus[0].uuid(), gpu_uuid(0));
}

// --- node choice ---------------------------------------------------------------------------------

struct Fleet {
  std::vector<NodeGpuInventory> nodes;
  std::map<std::string, GpuLeases> leases;

  NodeChoice choose(NodeChoiceInput in) {
    std::vector<const NodeGpuInventory*> ptrs;
    for (const auto& n : nodes) ptrs.push_back(&n);
    if (in.health.now_unix_ms == 0) in.health = at(kNow);
    return choose_node(
        ptrs, [&](const std::string& id) { return leases[id]; }, in);
  }
  void lease(const std::string& node, std::initializer_list<int> gpus) {
    for (int i : gpus) leases[node].add(gpu_uuid(i), "ws");
  }
};

Fleet three_nodes() {
  Fleet f;
  for (const char* id : {"a", "b", "c"}) {
    f.nodes.push_back(dgx(id));
    f.nodes.back().heartbeat_unix_ms = kNow;
  }
  f.lease("a", {0, 1, 2, 3, 4});  // 3 free
  f.lease("b", {0});              // 7 free
  return f;                       // c: 8 free
}

TEST(ChooseNode, PackedTakesTheFullestNodeThatFits) {
  auto f = three_nodes();
  auto c = f.choose({.count = 2, .placement = NodePlacement::kPacked});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c.node_id, "a");
  EXPECT_EQ(c.choice.gpus.size(), 2u);
  c = f.choose({.count = 4, .placement = NodePlacement::kPacked});
  EXPECT_EQ(c.node_id, "b");
}

TEST(ChooseNode, SpreadTakesTheEmptiestNode) {
  auto f = three_nodes();
  auto c = f.choose({.count = 2, .placement = NodePlacement::kSpread});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c.node_id, "c");
}

TEST(ChooseNode, TiesGoToTopologyThenNodeId) {
  Fleet f;
  f.nodes = {dgx("z"), dgx("y", false)};
  for (auto& n : f.nodes) n.heartbeat_unix_ms = kNow;
  // Same free count: the NVLink node gives the better pair.
  EXPECT_EQ(f.choose({.count = 2}).node_id, "z");
  f.nodes = {dgx("z"), dgx("y")};
  for (auto& n : f.nodes) n.heartbeat_unix_ms = kNow;
  EXPECT_EQ(f.choose({.count = 2}).node_id, "y");
}

TEST(ChooseNode, MinMemoryAndStaleNodes) {
  auto f = three_nodes();
  f.nodes[0] = dgx("a", true, false, 16 * kGiB);
  f.nodes[0].heartbeat_unix_ms = kNow;
  EXPECT_EQ(f.choose({.count = 1, .min_memory_bytes = 40 * kGiB}).node_id, "b");
  f.nodes[1].heartbeat_unix_ms = kNow - 120'000;
  EXPECT_EQ(f.choose({.count = 1, .min_memory_bytes = 40 * kGiB, .node_ttl_ms = 60'000}).node_id,
            "c");
}

TEST(ChooseNode, EveryPolicyRefusal) {
  auto f = three_nodes();
  auto c = f.choose({.count = 1, .vendor = cvm::v1::AMD});
  EXPECT_EQ(c.refusal->reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  c = f.choose({.count = 1, .cached_cvm = true});
  EXPECT_EQ(c.refusal->reason, cvm::v1::GPU_WITH_CACHING_UNSUPPORTED);
  c = f.choose({.count = 0});
  EXPECT_EQ(c.refusal->reason, cvm::v1::INVALID_REQUEST);
  for (auto& n : f.nodes) n.bare_metal = false;
  c = f.choose({.count = 1});
  EXPECT_EQ(c.refusal->reason, cvm::v1::GPU_REQUIRES_BARE_METAL);
  // One bare-metal node that is full: capacity, not policy, is the reason.
  f.nodes[0].bare_metal = true;
  c = f.choose({.count = 4});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->reason, cvm::v1::INSUFFICIENT_CAPACITY);
  EXPECT_EQ(c.refusal->message,
            "no node has 4 free GPUs (3 nodes checked, 2 not bare metal, at most 3 free on one "
            "node)");
}

TEST(ChooseNode, NothingToChooseFrom) {
  Fleet f;
  const auto c = f.choose({.count = 1, .min_memory_bytes = 16 * kGiB});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->reason, cvm::v1::INSUFFICIENT_CAPACITY);
  EXPECT_EQ(c.refusal->message,
            "no node has 1 free GPU with \u2265 16 GiB (0 nodes checked, at most 0 free on one "
            "node)");
}

// --- counts --------------------------------------------------------------------------------------

TEST(CountGpus, ByModelAndState) {
  auto n = dgx();
  n.gpus[7].set_healthy(false);
  n.gpus[6].set_last_health_event_unix_ms(kNow);
  cvm::v1::GpuDevice amd;
  amd.set_uuid("AMD-0");
  amd.set_name("AMD Instinct MI210");
  amd.set_vendor(cvm::v1::AMD);
  n.gpus.push_back(amd);
  for (const auto& g : fixture::mig_gpu("GPU-m", 9, 3)) n.gpus.push_back(g);
  GpuLeases l;
  l.add(gpu_uuid(0), "ws");
  l.add(gpu_uuid(7), "ws2");  // leased and unhealthy
  l.add("MIG-GPU-m-1", "ws3");
  const auto c = count_gpus(n, l, at(kNow + 1));
  const auto& h100 = c.at("NVIDIA H100 80GB HBM3");
  EXPECT_EQ(h100.total, 8u);
  EXPECT_EQ(h100.leased, 2u);
  EXPECT_EQ(h100.unhealthy, 2u);
  EXPECT_EQ(h100.free, 5u);
  EXPECT_EQ(c.at("AMD Instinct MI210").unsupported, 1u);
  EXPECT_EQ(c.at("AMD Instinct MI210").total, 0u);
  const auto& mig = c.at("NVIDIA A100-SXM4-80GB MIG 1g.10gb");
  EXPECT_EQ(mig.total, 3u);
  EXPECT_EQ(mig.free, 2u);
  EXPECT_FALSE(c.contains("NVIDIA A100-SXM4-80GB"));  // the MIG parent is not a device
}

// --- notices -------------------------------------------------------------------------------------

TEST(HealthNotices, ALeasedGpuWithANewEvent) {
  const auto before = dgx();
  auto now = dgx();
  now.gpus[2].set_last_health_event_unix_ms(kNow);
  now.gpus[2].set_health_reason("XID 79: GPU has fallen off the bus");
  now.gpus[3].set_last_health_event_unix_ms(kNow);  // not leased: nobody to tell
  GpuLeases l;
  l.add(gpu_uuid(2), "ws-a");
  auto n = health_notices(&before, now, l, at(kNow + 5));
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].gpu_uuid, gpu_uuid(2));
  EXPECT_EQ(n[0].workspace_id, "ws-a");
  EXPECT_EQ(n[0].event_unix_ms, kNow);
  EXPECT_EQ(n[0].message,
            "GPU GPU-dgx-2 (NVIDIA H100 80GB HBM3) on node dgx is unhealthy: XID 79: GPU has "
            "fallen off the bus; it is quarantined (no new leases) until it has been healthy for "
            "600 s");
  // The same report again: nothing new.
  EXPECT_TRUE(health_notices(&now, now, l, at(kNow + 10)).empty());
  // First sight (a broker that just started) of a GPU still in quarantine: tell (the stream
  // drops the duplicate if another replica already did).
  EXPECT_EQ(health_notices(nullptr, now, l, at(kNow + 10)).size(), 1u);
  // Past the period: nothing.
  EXPECT_TRUE(health_notices(nullptr, now, l, at(kNow + kPeriod)).empty());
}

TEST(HealthNotices, HealthyFlagDropping) {
  const auto before = dgx();
  auto now = dgx();
  now.gpus[0].set_healthy(false);
  GpuLeases l;
  l.add(gpu_uuid(0), "ws");
  EXPECT_EQ(health_notices(&before, now, l, at(kNow)).size(), 1u);
  EXPECT_TRUE(health_notices(&now, now, l, at(kNow)).empty());
}

TEST(HealthNotices, MigInstanceOfASickParent) {
  NodeGpuInventory before{"m", true, fixture::mig_gpu("GPU-m", 0, 2)};
  auto now = before;
  now.gpus[0].set_last_health_event_unix_ms(kNow);
  now.gpus[0].set_health_reason("XID 48: double-bit ECC error");
  GpuLeases l;
  l.add("MIG-GPU-m-1", "ws");
  const auto n = health_notices(&before, now, l, at(kNow));
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].gpu_uuid, "MIG-GPU-m-1");
  EXPECT_NE(n[0].message.find("double-bit ECC"), std::string::npos);
}

}  // namespace
}  // namespace cvm::broker
