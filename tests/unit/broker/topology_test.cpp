// Topology-aware choice on the 8-GPU DGX-like fixture (two NVLink islands of 4), the NVSwitch and
// PCIe-only variants, MIG instances, and an exhaustive check of the set search against brute force.
#include "cvm/broker/topology.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cvm/broker/allocator.h"
#include "dgx_fixture.h"

namespace cvm::broker {
namespace {

using fixture::dgx;
using fixture::gpu_uuid;
using fixture::kGiB;

std::set<int> minors(const GpuChoice& c) {
  std::set<int> out;
  for (const auto& g : c.gpus) out.insert(static_cast<int>(g.minor()));
  return out;
}

GpuLeases leased(std::initializer_list<int> gpus) {
  GpuLeases l;
  for (int i : gpus) l.add(gpu_uuid(i), "ws-" + std::to_string(i));
  return l;
}

cvm::v1::GpuDevice dev(const std::string& uuid, const std::string& path = {},
                       std::optional<int> numa = std::nullopt) {
  cvm::v1::GpuDevice g;
  g.set_uuid(uuid);
  g.set_pci_path(path);
  if (numa) g.set_numa_node(*numa);
  return g;
}

// --- pair relations ------------------------------------------------------------------------------

TEST(PcieLink, FromTheFixturePaths) {
  const auto n = dgx();
  EXPECT_EQ(pcie_link(n.gpus[0], n.gpus[1]), PcieLink::kSingleSwitch);
  EXPECT_EQ(pcie_link(n.gpus[0], n.gpus[2]), PcieLink::kHostBridge);
  EXPECT_EQ(pcie_link(n.gpus[0], n.gpus[4]), PcieLink::kCrossNuma);
  EXPECT_EQ(pcie_link(n.gpus[6], n.gpus[7]), PcieLink::kSingleSwitch);
  EXPECT_EQ(pcie_link(n.gpus[5], n.gpus[6]), PcieLink::kHostBridge);
}

TEST(PcieLink, SwitchHierarchies) {
  // Root port 00:01.0, top switch 01:00.0 with downstream ports 02:00.0 and 02:01.0, each with
  // a second-level switch.
  const std::string top = "pci0000:00/0000:00:01.0/0000:01:00.0";
  const auto a = dev("a", top + "/0000:02:00.0/0000:03:00.0/0000:04:00.0/0000:05:00.0");
  const auto b = dev("b", top + "/0000:02:00.0/0000:03:00.0/0000:04:01.0/0000:06:00.0");
  const auto c = dev("c", top + "/0000:02:01.0/0000:07:00.0/0000:08:00.0/0000:09:00.0");
  EXPECT_EQ(pcie_link(a, b), PcieLink::kSingleSwitch);
  EXPECT_EQ(pcie_link(a, c), PcieLink::kMultiSwitch);
  // Directly on two ports of one root complex.
  EXPECT_EQ(pcie_link(dev("x", "pci0000:00/0000:00:01.0/0000:01:00.0"),
                      dev("y", "pci0000:00/0000:00:02.0/0000:02:00.0")),
            PcieLink::kHostBridge);
}

TEST(PcieLink, NumaOnlyAndUnknown) {
  EXPECT_EQ(pcie_link(dev("a"), dev("b")), PcieLink::kUnknown);
  EXPECT_EQ(pcie_link(dev("a", "", 0), dev("b", "", 0)), PcieLink::kSameNuma);
  EXPECT_EQ(pcie_link(dev("a", "", 0), dev("b", "", 1)), PcieLink::kCrossNuma);
  EXPECT_EQ(pcie_link(dev("a", "", 0), dev("b")), PcieLink::kUnknown);
  // Different root complexes: the NUMA node tells near from far; unknown is taken as far.
  EXPECT_EQ(
      pcie_link(dev("a", "pci0000:00/0000:00:01.0", 0), dev("b", "pci0000:40/0000:40:01.0", 0)),
      PcieLink::kSameNuma);
  EXPECT_EQ(pcie_link(dev("a", "pci0000:00/0000:00:01.0"), dev("b", "pci0000:40/0000:40:01.0")),
            PcieLink::kCrossNuma);
  // A malformed path (no device part) counts as none.
  EXPECT_EQ(pcie_link(dev("a", "pci0000:00"), dev("b", "pci0000:00")), PcieLink::kUnknown);
}

TEST(PcieLink, MigInstancesOfOneGpuShareTheBoard) {
  const auto m = fixture::mig_gpu("GPU-m", 0, 2);
  EXPECT_EQ(pcie_link(m[1], m[2]), PcieLink::kSameBoard);
  EXPECT_EQ(nvlink_links(m[1], m[2]), 0u);
  EXPECT_EQ(pcie_link_name(PcieLink::kSameBoard), "same board");
}

TEST(PairScore, NvidiaWeights) {
  const auto n = dgx();
  EXPECT_EQ(pair_score(n.gpus[0], n.gpus[1]), 250);
  EXPECT_EQ(pair_score(n.gpus[0], n.gpus[3]), 230);
  EXPECT_EQ(pair_score(n.gpus[3], n.gpus[4]), 10);
  EXPECT_EQ(pair_score(n.gpus[0], n.gpus[0]), 0);
  const auto sw = dgx("a100", true, true);
  EXPECT_EQ(pair_score(sw.gpus[0], sw.gpus[7]), 1210);  // 12 NVSwitch links + cross-NUMA
  const auto pcie = dgx("pcie", false);
  EXPECT_EQ(pair_score(pcie.gpus[0], pcie.gpus[1]), 50);
}

TEST(NvlinkLinks, OneSidedReportsCount) {
  auto a = dev("a");
  auto b = dev("b");
  auto* p = a.add_nvlink_peers();
  p->set_uuid("b");
  p->set_links(4);
  EXPECT_EQ(nvlink_links(a, b), 4u);
  EXPECT_EQ(nvlink_links(b, a), 4u);
  a.set_nvswitch_links(6);
  b.set_nvswitch_links(2);
  EXPECT_EQ(nvlink_links(a, b), 4u);  // the direct links are more
  b.set_nvswitch_links(6);
  EXPECT_EQ(nvlink_links(a, b), 6u);
}

// --- choice on the DGX-like node -----------------------------------------------------------------

TEST(TopologyChoice, FourGetsAWholeIsland) {
  EXPECT_EQ(minors(choose_gpus(dgx(), {}, 4, 0)), (std::set<int>{0, 1, 2, 3}));
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({0}), 4, 0)), (std::set<int>{4, 5, 6, 7}));
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({5}), 4, 0)), (std::set<int>{0, 1, 2, 3}));
}

TEST(TopologyChoice, TwoGetAnNvlinkPairUnderOneSwitch) {
  const auto c = choose_gpus(dgx(), {}, 2, 0);
  EXPECT_EQ(minors(c), (std::set<int>{0, 1}));
  EXPECT_EQ(c.score, 250);
  // GPU 1's switch partner is taken: the pair comes from the broken island, not from island B.
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({0}), 2, 0)), (std::set<int>{2, 3}));
}

TEST(TopologyChoice, ThePairScoreComesBeforeKeepingIslandsWhole) {
  // Island A has 0 and 3 free (NVLink, different switches: 230); island B has a same-switch
  // NVLink pair (250): the better pair wins, as in NVIDIA's allocator.
  auto c = choose_gpus(dgx(), leased({1, 2}), 2, 0);
  EXPECT_EQ(minors(c), (std::set<int>{4, 5}));
  EXPECT_EQ(c.score, 250);
  // Never across islands while an NVLink pair is left.
  c = choose_gpus(dgx(), leased({1, 2, 4, 5, 6}), 2, 0);
  EXPECT_EQ(minors(c), (std::set<int>{0, 3}));
  EXPECT_EQ(c.score, 230);
}

TEST(TopologyChoice, OneGpuGoesToTheBrokenIsland) {
  EXPECT_EQ(minors(choose_gpus(dgx(), {}, 1, 0)), (std::set<int>{0}));
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({0}), 1, 0)), (std::set<int>{1}));
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({4}), 1, 0)), (std::set<int>{5}));
  // With 0-2 taken, the last GPU of island A is the one to use.
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({0, 1, 2}), 1, 0)), (std::set<int>{3}));
}

TEST(TopologyChoice, ThreeStayInTheIslandThatIsAlreadyBroken) {
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({0}), 3, 0)), (std::set<int>{1, 2, 3}));
  EXPECT_EQ(minors(choose_gpus(dgx(), leased({7}), 3, 0)), (std::set<int>{4, 5, 6}));
}

TEST(TopologyChoice, FiveTakeAWholeIslandPlusOne) {
  const auto c = minors(choose_gpus(dgx(), {}, 5, 0));
  ASSERT_EQ(c.size(), 5u);
  const bool island_a = c.contains(0) && c.contains(1) && c.contains(2) && c.contains(3);
  const bool island_b = c.contains(4) && c.contains(5) && c.contains(6) && c.contains(7);
  EXPECT_TRUE(island_a || island_b);
}

TEST(TopologyChoice, EightTakeEverything) {
  EXPECT_EQ(choose_gpus(dgx(), {}, 8, 0).gpus.size(), 8u);
  EXPECT_FALSE(choose_gpus(dgx(), leased({3}), 8, 0).ok());
}

TEST(TopologyChoice, ReportOrderDoesNotMatter) {
  auto n = dgx();
  std::mt19937 rng(7);
  for (int round = 0; round < 20; ++round) {
    std::shuffle(n.gpus.begin(), n.gpus.end(), rng);
    EXPECT_EQ(minors(choose_gpus(n, leased({0}), 2, 0)), (std::set<int>{2, 3}));
    EXPECT_EQ(minors(choose_gpus(n, leased({0}), 4, 0)), (std::set<int>{4, 5, 6, 7}));
  }
}

TEST(TopologyChoice, NvswitchMakesPcieDecide) {
  const auto n = dgx("a100", true, true);
  EXPECT_EQ(minors(choose_gpus(n, {}, 2, 0)), (std::set<int>{0, 1}));
  EXPECT_EQ(minors(choose_gpus(n, leased({0}), 2, 0)), (std::set<int>{2, 3}));
  EXPECT_EQ(minors(choose_gpus(n, {}, 4, 0)), (std::set<int>{0, 1, 2, 3}));  // same socket
}

TEST(TopologyChoice, PcieOnlyPrefersOneSwitchThenOneSocket) {
  const auto n = dgx("pcie", false);
  EXPECT_EQ(minors(choose_gpus(n, {}, 2, 0)), (std::set<int>{0, 1}));
  EXPECT_EQ(minors(choose_gpus(n, leased({0, 2}), 2, 0)), (std::set<int>{4, 5}));
  EXPECT_EQ(minors(choose_gpus(n, leased({0}), 3, 0)), (std::set<int>{1, 2, 3}));
}

TEST(TopologyChoice, QuarantinedAndLowMemoryDevicesAreNotCandidates) {
  auto n = dgx();
  n.gpus[1].set_healthy(false);
  EXPECT_EQ(minors(choose_gpus(n, {}, 2, 0)), (std::set<int>{2, 3}));
  n.gpus[2].set_memory_bytes(16 * kGiB);
  EXPECT_EQ(minors(choose_gpus(n, {}, 2, 40 * kGiB)), (std::set<int>{4, 5}));
}

// --- the set search ----------------------------------------------------------------------------

TEST(ChooseBestSet, Combinations) {
  EXPECT_EQ(combinations(8, 4), 70u);
  EXPECT_EQ(combinations(8, 0), 1u);
  EXPECT_EQ(combinations(3, 4), 0u);
  EXPECT_EQ(combinations(56, 28), 7648690600760440ULL);
  EXPECT_EQ(combinations(200, 100), UINT64_MAX);
}

TEST(ChooseBestSet, GreedyFindsTheIslandsToo) {
  const auto n = dgx();
  std::vector<const cvm::v1::GpuDevice*> devs;
  for (const auto& g : n.gpus) devs.push_back(&g);
  const ScoreMatrix m(devs);
  for (size_t k = 1; k <= 8; ++k) {
    const auto exhaustive = choose_best_set(m, k);
    const auto greedy = choose_best_set(m, k, 0);
    EXPECT_EQ(greedy.score, exhaustive.score) << k;
  }
  EXPECT_EQ(choose_best_set(m, 4, 0).indices, (std::vector<size_t>{0, 1, 2, 3}));
  EXPECT_TRUE(choose_best_set(m, 0).indices.empty());
  EXPECT_TRUE(choose_best_set(m, 9).indices.empty());
}

// Brute force over every subset of random small topologies: the search finds the highest score.
TEST(ChooseBestSet, MatchesBruteForceOnRandomTopologies) {
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t n = 1 + rng() % 8;
    std::vector<cvm::v1::GpuDevice> gpus(n);
    for (size_t i = 0; i < n; ++i) {
      gpus[i].set_uuid("g" + std::to_string(i));
      gpus[i].set_pci_path("pci0000:0" + std::to_string(rng() % 2) + "/0000:00:0" +
                           std::to_string(rng() % 3) + ".0/0000:0" + std::to_string(i) + ":00.0");
      if (rng() % 2) gpus[i].set_numa_node(static_cast<int>(rng() % 2));
    }
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = i + 1; j < n; ++j) {
        if (rng() % 3 == 0) {
          auto* p = gpus[i].add_nvlink_peers();
          p->set_uuid(gpus[j].uuid());
          p->set_links(1 + rng() % 4);
        }
      }
    }
    std::vector<const cvm::v1::GpuDevice*> devs;
    for (const auto& g : gpus) devs.push_back(&g);
    const ScoreMatrix m(devs);
    const size_t k = 1 + rng() % n;
    int best = -1;
    for (uint32_t mask = 0; mask < (1u << n); ++mask) {
      if (static_cast<size_t>(__builtin_popcount(mask)) != k) continue;
      int s = 0;
      for (size_t a = 0; a < n; ++a) {
        for (size_t b = a + 1; b < n; ++b) {
          if ((mask >> a & 1) && (mask >> b & 1)) s += m.at(a, b);
        }
      }
      best = std::max(best, s);
    }
    const auto got = choose_best_set(m, k);
    ASSERT_EQ(got.indices.size(), k);
    EXPECT_EQ(got.score, best) << "trial " << trial;
  }
}

// --- MIG -----------------------------------------------------------------------------------------

TEST(Mig, InstancesAreDevicesAndTheParentIsNot) {
  NodeGpuInventory n{"mig", true, fixture::mig_gpu("GPU-a", 0, 3)};
  for (const auto& g : fixture::mig_gpu("GPU-b", 1, 2)) n.gpus.push_back(g);
  EXPECT_FALSE(is_allocatable(n.gpus[0]));
  EXPECT_TRUE(is_allocatable(n.gpus[1]));
  auto c = choose_gpus(n, {}, 5, 0);
  ASSERT_TRUE(c.ok());
  for (const auto& g : c.gpus) EXPECT_FALSE(g.mig_parent_uuid().empty());
  EXPECT_FALSE(choose_gpus(n, {}, 6, 0).ok());
  // Two instances go to the same GPU; one goes to the GPU already in use.
  c = choose_gpus(n, {}, 2, 0);
  EXPECT_EQ(c.gpus[0].mig_parent_uuid(), c.gpus[1].mig_parent_uuid());
  GpuLeases l;
  l.add("MIG-GPU-a-0", "ws");
  l.add("MIG-GPU-a-1", "ws");
  c = choose_gpus(n, l, 1, 0);
  EXPECT_EQ(c.gpus[0].uuid(), "MIG-GPU-a-2");
  // Memory is the instance's slice.
  EXPECT_FALSE(choose_gpus(n, {}, 1, 11 * kGiB).ok());
}

TEST(Mig, AnUnhealthyParentQuarantinesItsInstances) {
  NodeGpuInventory n{"mig", true, fixture::mig_gpu("GPU-a", 0, 2)};
  n.gpus[0].set_healthy(false);
  const auto c = choose_gpus(n, {}, 1, 0);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.refusal->message, "node mig has 0 free GPUs, 1 requested (2 more quarantined)");
}

}  // namespace
}  // namespace cvm::broker
