#include "cvm/broker/allocator.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace cvm::broker {
namespace {

constexpr uint64_t kGiB = 1ULL << 30;

cvm::v1::GpuDevice gpu(std::string uuid, uint32_t minor, uint64_t mem, bool healthy = true,
                       cvm::v1::GpuVendor vendor = cvm::v1::NVIDIA) {
  cvm::v1::GpuDevice g;
  g.set_uuid(std::move(uuid));
  g.set_minor(minor);
  g.set_memory_bytes(mem);
  g.set_healthy(healthy);
  g.set_vendor(vendor);
  g.set_name("NVIDIA H100");
  return g;
}

NodeGpuInventory node(std::vector<cvm::v1::GpuDevice> gpus, std::string id = "n1") {
  return NodeGpuInventory{std::move(id), true, std::move(gpus)};
}

std::vector<std::string> uuids(const GpuChoice& c) {
  std::vector<std::string> out;
  for (const auto& g : c.gpus) out.push_back(g.uuid());
  return out;
}

using Uuids = std::vector<std::string>;

// --- choose_gpus -------------------------------------------------------------------------------

TEST(ChooseGpus, FirstFitByMinorWhateverTheReportOrder) {
  const auto n = node({gpu("GPU-3", 3, 16 * kGiB), gpu("GPU-1", 1, 16 * kGiB),
                       gpu("GPU-0", 0, 16 * kGiB), gpu("GPU-2", 2, 16 * kGiB)});
  const auto c = choose_gpus(n, GpuLeases{}, 2, 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(uuids(c), (Uuids{"GPU-0", "GPU-1"}));
  EXPECT_EQ(c.gpus[0].minor(), 0u);
  EXPECT_EQ(c.gpus[0].name(), "NVIDIA H100");  // the whole device travels to the agent
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 4, 0)), (Uuids{"GPU-0", "GPU-1", "GPU-2", "GPU-3"}));
}

TEST(ChooseGpus, SkipsLeasedDevices) {
  const auto n = node({gpu("GPU-0", 0, kGiB), gpu("GPU-1", 1, kGiB), gpu("GPU-2", 2, kGiB)});
  GpuLeases leased;
  leased.add("GPU-0", "ws-a");
  EXPECT_EQ(uuids(choose_gpus(n, leased, 1, 0)), (Uuids{"GPU-1"}));
  leased.add("GPU-1", "ws-b");
  EXPECT_EQ(uuids(choose_gpus(n, leased, 1, 0)), (Uuids{"GPU-2"}));
}

TEST(ChooseGpus, SkipsUnhealthyDevices) {
  const auto n = node({gpu("GPU-0", 0, kGiB, false), gpu("GPU-1", 1, kGiB)});
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 1, 0)), (Uuids{"GPU-1"}));
  EXPECT_FALSE(choose_gpus(n, GpuLeases{}, 2, 0).ok());
}

TEST(ChooseGpus, SkipsNonNvidiaDevices) {
  const auto n = node({gpu("AMD-0", 0, 64 * kGiB, true, cvm::v1::AMD),
                       gpu("X-1", 1, 64 * kGiB, true, cvm::v1::GPU_VENDOR_UNSPECIFIED),
                       gpu("GPU-2", 2, 16 * kGiB)});
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 1, 0)), (Uuids{"GPU-2"}));
  EXPECT_FALSE(choose_gpus(n, GpuLeases{}, 2, 0).ok());
}

TEST(ChooseGpus, MinMemoryIsInclusive) {
  const auto n = node(
      {gpu("GPU-small", 0, 8 * kGiB), gpu("GPU-big", 1, 40 * kGiB), gpu("GPU-mid", 2, 16 * kGiB)});
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 1, 16 * kGiB)), (Uuids{"GPU-big"}));
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 2, 16 * kGiB)), (Uuids{"GPU-big", "GPU-mid"}));
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 1, 40 * kGiB)), (Uuids{"GPU-big"}));
  EXPECT_FALSE(choose_gpus(n, GpuLeases{}, 1, 40 * kGiB + 1).ok());
}

TEST(ChooseGpus, EqualMinorsBreakTiesByUuid) {
  const auto n = node({gpu("GPU-b", 0, kGiB), gpu("GPU-a", 0, kGiB)});
  EXPECT_EQ(uuids(choose_gpus(n, GpuLeases{}, 1, 0)), (Uuids{"GPU-a"}));
}

TEST(ChooseGpus, ExactlyEnough) {
  const auto n = node({gpu("GPU-0", 0, kGiB), gpu("GPU-1", 1, kGiB)});
  EXPECT_EQ(choose_gpus(n, GpuLeases{}, 2, 0).gpus.size(), 2u);
}

TEST(ChooseGpus, InsufficientWithMinMemory) {
  const auto n = node({gpu("GPU-0", 0, 16 * kGiB), gpu("GPU-1", 1, 24 * kGiB),
                       gpu("GPU-2", 2, 8 * kGiB), gpu("GPU-3", 3, 16 * kGiB)});
  GpuLeases leased;
  leased.add("GPU-3", "ws");
  const auto c = choose_gpus(n, leased, 4, 16 * kGiB);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->reason, cvm::v1::INSUFFICIENT_CAPACITY);
  EXPECT_EQ(c.refusal->message, "node n1 has 2 free GPUs with \u2265 16 GiB, 4 requested");
  EXPECT_TRUE(c.gpus.empty());
}

TEST(ChooseGpus, InsufficientWithoutMinMemory) {
  const auto c = choose_gpus(node({gpu("GPU-0", 0, kGiB)}, "gpu-7"), GpuLeases{}, 2, 0);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->message, "node gpu-7 has 1 free GPU, 2 requested");
}

TEST(ChooseGpus, NoGpusAtAll) {
  const auto c = choose_gpus(node({}), GpuLeases{}, 1, 0);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->reason, cvm::v1::INSUFFICIENT_CAPACITY);
  EXPECT_EQ(c.refusal->message, "node n1 has 0 free GPUs, 1 requested");
}

TEST(ChooseGpus, FractionalMinMemoryInMessage) {
  const auto c = choose_gpus(node({gpu("GPU-0", 0, kGiB)}), GpuLeases{}, 1, 3 * kGiB / 2);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->message, "node n1 has 0 free GPUs with \u2265 1.5 GiB, 1 requested");
}

TEST(ChooseGpus, ZeroCountIsInvalid) {
  const auto c = choose_gpus(node({gpu("GPU-0", 0, kGiB)}), GpuLeases{}, 0, 0);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->reason, cvm::v1::INVALID_REQUEST);
}

TEST(ChooseGpus, LeasesOfOtherUuidsDoNotInterfere) {
  GpuLeases leased;
  leased.add("GPU-on-another-node", "ws");
  EXPECT_TRUE(choose_gpus(node({gpu("GPU-0", 0, kGiB)}), leased, 1, 0).ok());
}

// --- policy ------------------------------------------------------------------------------------

TEST(Policy, NvidiaOnBareMetalWithoutCachingIsAllowed) {
  EXPECT_FALSE(check_gpu_policy({cvm::v1::NVIDIA, true, false}).has_value());
  EXPECT_FALSE(check_gpu_policy({cvm::v1::GPU_VENDOR_UNSPECIFIED, true, false}).has_value());
}

TEST(Policy, AmdIsUnsupported) {
  const auto r = check_gpu_policy({cvm::v1::AMD, true, false});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  EXPECT_EQ(r->message, "only NVIDIA GPUs are supported; AMD was requested");
}

TEST(Policy, UnknownVendorIsUnsupported) {
  const auto r = check_gpu_policy({static_cast<cvm::v1::GpuVendor>(42), true, false});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  EXPECT_EQ(r->message, "only NVIDIA GPUs are supported; unknown was requested");
}

TEST(Policy, CloudVmRequiresBareMetal) {
  const auto r = check_gpu_policy({cvm::v1::NVIDIA, false, false});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->reason, cvm::v1::GPU_REQUIRES_BARE_METAL);
}

TEST(Policy, CachedCvmIsUnsupported) {
  const auto r = check_gpu_policy({cvm::v1::NVIDIA, true, true});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->reason, cvm::v1::GPU_WITH_CACHING_UNSUPPORTED);
}

TEST(Policy, RequestPropertiesBeforeNodeProperties) {
  EXPECT_EQ(check_gpu_policy({cvm::v1::AMD, false, true})->reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  EXPECT_EQ(check_gpu_policy({cvm::v1::NVIDIA, false, true})->reason,
            cvm::v1::GPU_WITH_CACHING_UNSUPPORTED);
  EXPECT_EQ(check_gpu_policy({cvm::v1::NVIDIA, false, false})->reason,
            cvm::v1::GPU_REQUIRES_BARE_METAL);
}

// --- inventory and leases ----------------------------------------------------------------------

TEST(Inventory, FromNodeStatus) {
  cvm::v1::NodeStatus s;
  s.set_node_id("n9");
  s.mutable_host()->set_bare_metal(true);
  *s.add_gpus() = gpu("GPU-1", 1, kGiB);
  *s.add_gpus() = gpu("GPU-0", 0, kGiB);
  const auto inv = inventory_from(s);
  EXPECT_EQ(inv.node_id, "n9");
  EXPECT_TRUE(inv.bare_metal);
  ASSERT_EQ(inv.gpus.size(), 2u);
  EXPECT_EQ(inv.gpus[0].uuid(), "GPU-1");  // as reported; choose_gpus orders
  s.mutable_host()->set_bare_metal(false);
  EXPECT_FALSE(inventory_from(s).bare_metal);
}

TEST(Inventory, SameDevicesIgnoresTheHeartbeatOnly) {
  cvm::v1::NodeStatus s;
  s.set_node_id("n9");
  s.mutable_host()->set_bare_metal(true);
  *s.add_gpus() = gpu("GPU-0", 0, kGiB);
  *s.add_gpus() = gpu("GPU-1", 1, kGiB);
  const auto before = inventory_from(s);
  s.set_heartbeat_unix_ms(12345);
  EXPECT_TRUE(same_devices(before, inventory_from(s)));
  auto changed = s;
  changed.mutable_gpus(1)->set_healthy(false);
  EXPECT_FALSE(same_devices(before, inventory_from(changed)));
  changed = s;
  changed.mutable_gpus(0)->set_last_health_event_unix_ms(7);
  EXPECT_FALSE(same_devices(before, inventory_from(changed)));
  changed = s;
  changed.mutable_host()->set_bare_metal(false);
  EXPECT_FALSE(same_devices(before, inventory_from(changed)));
  changed = s;
  changed.mutable_gpus()->RemoveLast();
  EXPECT_FALSE(same_devices(before, inventory_from(changed)));
  changed = s;
  changed.set_node_id("n8");
  EXPECT_FALSE(same_devices(before, inventory_from(changed)));
}

TEST(Leases, AddRemoveHolder) {
  GpuLeases l;
  EXPECT_FALSE(l.contains("GPU-0"));
  EXPECT_FALSE(l.holder("GPU-0").has_value());
  l.add("GPU-0", "ws-a");
  EXPECT_TRUE(l.contains("GPU-0"));
  EXPECT_EQ(l.holder("GPU-0"), "ws-a");
  l.add("GPU-0", "ws-b");  // the KV value is the truth: the latest write wins
  EXPECT_EQ(l.holder("GPU-0"), "ws-b");
  EXPECT_EQ(l.size(), 1u);
  EXPECT_TRUE(l.remove("GPU-0"));
  EXPECT_FALSE(l.remove("GPU-0"));
  EXPECT_EQ(l.size(), 0u);
}

TEST(Leases, OnNodeFiltersByNode) {
  std::vector<cvm::v1::GpuLease> all(3);
  all[0].set_node_id("n1");
  all[0].set_gpu_uuid("GPU-0");
  all[0].set_workspace_id("ws-a");
  all[1].set_node_id("n2");
  all[1].set_gpu_uuid("GPU-9");
  all[1].set_workspace_id("ws-b");
  all[2].set_node_id("n1");
  all[2].set_gpu_uuid("GPU-1");
  all[2].set_workspace_id("ws-c");
  const auto l = leases_on_node("n1", all);
  EXPECT_EQ(l.size(), 2u);
  EXPECT_EQ(l.holder("GPU-1"), "ws-c");
  EXPECT_FALSE(l.contains("GPU-9"));
  EXPECT_EQ(leases_on_node("n3", all).size(), 0u);
}

// --- lease keys --------------------------------------------------------------------------------

TEST(LeaseKey, NodeDotUuid) {
  EXPECT_EQ(lease_key("n1", "GPU-8a3c1f2e-1b2c-4d5e-9f00-123456789abc"),
            "n1.GPU-8a3c1f2e-1b2c-4d5e-9f00-123456789abc");
  EXPECT_EQ(lease_key("gpu_node-01", "GPU-0"), "gpu_node-01.GPU-0");
}

TEST(LeaseKey, KeepsEveryValidKeyCharacter) {
  EXPECT_EQ(lease_key("a-b_c", "x/y=z"), "a-b_c.x/y=z");
}

TEST(LeaseKey, SanitizesInvalidCharacters) {
  EXPECT_EQ(lease_key("node 1", "GPU:0"), "node_1.GPU_0");
  EXPECT_EQ(lease_key("n*", "g>"), "n_.g_");
  EXPECT_EQ(lease_key("n\u00e9", "g"), "n__.g");  // each byte of a multi-byte character
}

TEST(LeaseKey, DotsInsideAPartBecomeUnderscores) {
  // So the key always splits back into exactly <node>.<uuid>, and never has an empty token.
  EXPECT_EQ(lease_key("host.example.com", "GPU.0"), "host_example_com.GPU_0");
  EXPECT_EQ(lease_key(".n.", "."), "_n_._");
}

TEST(LeaseKey, EmptyPartsAreFilled) { EXPECT_EQ(lease_key("", ""), "_._"); }

TEST(LeaseKey, OnlyValidNatsKvKeyCharacters) {
  std::string all;
  for (int c = 1; c < 256; ++c) all.push_back(static_cast<char>(c));
  const std::string key = lease_key(all, all);
  for (char c : key) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '/' || c == '=' || c == '.';
    EXPECT_TRUE(ok) << static_cast<int>(static_cast<unsigned char>(c));
  }
  EXPECT_EQ(std::count(key.begin(), key.end(), '.'), 1);
}

TEST(LeaseKey, NodeFilter) {
  EXPECT_EQ(node_leases_filter("n1"), "n1.>");
  EXPECT_EQ(node_leases_filter("a.b"), "a_b.>");
}

TEST(FormatBytes, Units) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(100), "100 B");
  EXPECT_EQ(format_bytes(1024), "1 KiB");
  EXPECT_EQ(format_bytes(512ULL << 20), "512 MiB");
  EXPECT_EQ(format_bytes(16 * kGiB), "16 GiB");
  EXPECT_EQ(format_bytes(3 * kGiB / 2), "1.5 GiB");
  EXPECT_EQ(format_bytes(80 * kGiB), "80 GiB");
  EXPECT_EQ(format_bytes(2ULL << 40), "2 TiB");
}

}  // namespace
}  // namespace cvm::broker
