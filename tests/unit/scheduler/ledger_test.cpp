// Capacity holds (KV cvm_capacity): the arithmetic every replica runs before its compare-and-set.
#include <algorithm>
#include <vector>

#include <gtest/gtest.h>

#include "cvm/scheduler/ledger.h"

namespace cvm::scheduler {
namespace {

constexpr int64_t kNow = 1'700'000'000'000;
constexpr uint64_t kGiB = 1ULL << 30;

NodeRecord node(uint64_t cpu, uint64_t mem, uint64_t alloc_cpu = 0, uint64_t alloc_mem = 0) {
  NodeRecord n;
  n.node_id = "n1";
  n.capacity_cpu_millicores = cpu;
  n.capacity_memory_bytes = mem;
  n.allocated_cpu_millicores = alloc_cpu;
  n.allocated_memory_bytes = alloc_mem;
  return n;
}

cvm::v1::CapacityHold hold(const std::string& build, uint64_t cpu, uint64_t mem,
                           int64_t expires = kNow + 30'000) {
  cvm::v1::CapacityHold h;
  h.set_build_id(build);
  h.set_cpu_millicores(cpu);
  h.set_memory_bytes(mem);
  h.set_expires_unix_ms(expires);
  return h;
}

TEST(Ledger, EmptyLedgerHoldsNothing) {
  cvm::v1::CapacityLedger l;
  const auto r = held(l, kNow);
  EXPECT_EQ(r.cpu_millicores, 0u);
  EXPECT_EQ(r.memory_bytes, 0u);
  EXPECT_FALSE(next_expiry(l, kNow).has_value());
}

TEST(Ledger, SumsOnlyHoldsInForce) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("a", 1000, kGiB, kNow + 10);
  *l.add_holds() = hold("b", 500, 2 * kGiB, kNow + 20);
  *l.add_holds() = hold("c", 700, kGiB, kNow);  // expires exactly now: no longer counts
  const auto r = held(l, kNow);
  EXPECT_EQ(r.cpu_millicores, 1500u);
  EXPECT_EQ(r.memory_bytes, 3 * kGiB);
  EXPECT_EQ(next_expiry(l, kNow), kNow + 10);
  EXPECT_EQ(next_expiry(l, kNow + 10), kNow + 20);
  EXPECT_FALSE(next_expiry(l, kNow + 20).has_value());
}

TEST(Ledger, PruneDropsExpiredOnly) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("old", 1, 1, kNow - 1);
  *l.add_holds() = hold("new", 1, 1, kNow + 1);
  EXPECT_EQ(prune_expired(l, kNow), 1u);
  ASSERT_EQ(l.holds_size(), 1);
  EXPECT_EQ(l.holds(0).build_id(), "new");
  EXPECT_EQ(prune_expired(l, kNow), 0u);
}

TEST(Ledger, AddsWhenThereIsRoom) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 2000, 4 * kGiB), kNow), HoldResult::kAdded);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("b", 2000, 4 * kGiB), kNow), HoldResult::kAdded);
  EXPECT_EQ(l.holds_size(), 2);
}

TEST(Ledger, ExactFitIsRoomOneMoreIsNot) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB, 1000, kGiB), hold("a", 3000, 7 * kGiB), kNow),
            HoldResult::kAdded);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB, 1000, kGiB), hold("b", 1, 0), kNow),
            HoldResult::kNoRoom);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB, 1000, kGiB), hold("c", 0, 1), kNow),
            HoldResult::kNoRoom);
  EXPECT_EQ(l.holds_size(), 1) << "a refused hold leaves the ledger as it was";
}

TEST(Ledger, OtherHoldsCountAgainstRoom) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("x", 3000, kGiB);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 2000, kGiB), kNow), HoldResult::kNoRoom);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 1000, kGiB), kNow), HoldResult::kAdded);
}

TEST(Ledger, CpuAndMemoryAreEachChecked) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("cpu", 5000, kGiB), kNow), HoldResult::kNoRoom);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("mem", 1000, 9 * kGiB), kNow),
            HoldResult::kNoRoom);
  EXPECT_EQ(l.holds_size(), 0);
}

TEST(Ledger, ExpiredHoldsFreeTheirRoomAndArePruned) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("x", 4000, 8 * kGiB, kNow - 1);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB), kNow), HoldResult::kAdded);
  ASSERT_EQ(l.holds_size(), 1);
  EXPECT_EQ(l.holds(0).build_id(), "a");
}

TEST(Ledger, SameBuildIsAlreadyHeldAndNotCountedTwice) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB), kNow), HoldResult::kAdded);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB), kNow),
            HoldResult::kAlreadyHeld);
  EXPECT_EQ(l.holds_size(), 1);
}

// A redelivery re-holds room when the first hold is about to lapse (docs/reliability.md, "Expired
// hold at redelivery"): the hold lasts from the re-hold on, never shorter than it was, and is still
// counted once.
TEST(Ledger, SameBuildRenewsAnExpiringHold) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB, kNow + 5), kNow),
            HoldResult::kAdded);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB, kNow + 30'000), kNow),
            HoldResult::kRenewed);
  ASSERT_EQ(l.holds_size(), 1);
  EXPECT_EQ(l.holds(0).expires_unix_ms(), kNow + 30'000);
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", 4000, 8 * kGiB, kNow + 10), kNow),
            HoldResult::kAlreadyHeld)
      << "a later hold is never shortened";
  EXPECT_EQ(l.holds(0).expires_unix_ms(), kNow + 30'000);
  // Still in force after the first expiry: another build finds no room.
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("b", 1, 1), kNow + 6), HoldResult::kNoRoom);
}

TEST(Ledger, OverCommittedNodeNeverWrapsAround) {
  // An agent reporting more allocated than its capacity must not look like a node with room.
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB, 6000, 10 * kGiB), hold("a", 1, 1), kNow),
            HoldResult::kNoRoom);
  EXPECT_EQ(add_hold(l, node(0, 0), hold("a", 1, 1), kNow), HoldResult::kNoRoom);
}

TEST(Ledger, HugeRequestDoesNotOverflow) {
  cvm::v1::CapacityLedger l;
  EXPECT_EQ(add_hold(l, node(4000, 8 * kGiB), hold("a", UINT64_MAX / 2, UINT64_MAX / 2), kNow),
            HoldResult::kNoRoom);
}

TEST(Ledger, CorruptHoldsNearTwoToThe64DoNotWrapIntoRoom) {
  // A ledger read from KV with a hold of 2^64 - 1000 (a corrupt or hostile write): summed with
  // the node's allocation it used to wrap to a small number and admit the next hold
  // (fuzz/findings/capacity_ledger_wrap*).
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("huge", UINT64_MAX - 1000, UINT64_MAX - 1000);
  EXPECT_EQ(held(l, kNow).cpu_millicores, UINT64_MAX - 1000);
  EXPECT_EQ(add_hold(l, node(8000, 16 * kGiB, 1000, kGiB), hold("a", 2000, kGiB), kNow),
            HoldResult::kNoRoom);
  *l.add_holds() = hold("huge2", UINT64_MAX - 1000, 1);
  EXPECT_EQ(held(l, kNow).cpu_millicores, UINT64_MAX) << "the sum saturates";
  cvm::v1::CapacityLedger empty;
  EXPECT_EQ(
      add_hold(empty, node(8000, 16 * kGiB, 1000, kGiB), hold("b", 1, UINT64_MAX - 100), kNow),
      HoldResult::kNoRoom)
      << "the new hold itself near 2^64";
}

TEST(Ledger, RemoveHold) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("a", 1, 1);
  *l.add_holds() = hold("b", 1, 1);
  *l.add_holds() = hold("gone", 1, 1, kNow - 5);
  EXPECT_TRUE(remove_hold(l, "a", kNow));
  ASSERT_EQ(l.holds_size(), 1) << "removing also prunes expired holds";
  EXPECT_EQ(l.holds(0).build_id(), "b");
  EXPECT_FALSE(remove_hold(l, "a", kNow));
  EXPECT_FALSE(remove_hold(l, "nope", kNow));
}

// The property the CAS relies on: whatever order holds are added in, the sum of what a ledger
// accepts never exceeds the room the node had.
TEST(Ledger, AcceptedHoldsNeverExceedCapacity) {
  for (uint64_t cap = 0; cap <= 4000; cap += 250) {
    for (uint64_t req = 1; req <= 1500; req += 137) {
      cvm::v1::CapacityLedger l;
      const NodeRecord n = node(cap, cap * kGiB, cap / 4, 0);
      for (int i = 0; i < 40; ++i) {
        (void)add_hold(l, n, hold("b" + std::to_string(i), req, req * kGiB), kNow);
      }
      const auto total = held(l, kNow);
      EXPECT_LE(total.cpu_millicores + n.allocated_cpu_millicores, cap);
      EXPECT_LE(total.memory_bytes, cap * kGiB);
      EXPECT_EQ(total.cpu_millicores, static_cast<uint64_t>(l.holds_size()) * req);
    }
  }
}

// A node whose NodeStatus says it runs `builds` (allocated = their sum on top of `alloc_cpu`).
NodeRecord node_running(uint64_t cpu, uint64_t mem, std::vector<AllocatedBuild> builds) {
  NodeRecord n = node(cpu, mem);
  for (const auto& b : builds) {
    n.allocated_cpu_millicores += b.cpu_millicores;
    n.allocated_memory_bytes += b.memory_bytes;
  }
  std::sort(builds.begin(), builds.end(),
            [](const auto& a, const auto& b) { return a.build_id < b.build_id; });
  n.allocated_builds = std::move(builds);
  return n;
}

TEST(Ledger, AHoldTheNodeAlreadyCountsIsNotCountedAgain) {
  // Build "a" holds 1500m and the agent now reports it running (allocated 1500m): before, the
  // hold counted on top until it expired, and a 4000m node refused a 2000m build for 30 s.
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("a", 1500, kGiB);
  const NodeRecord n = node_running(4000, 8 * kGiB, {{"a", 1500, kGiB}});
  EXPECT_EQ(held(l, kNow, &n).cpu_millicores, 0U);
  EXPECT_EQ(held(l, kNow).cpu_millicores, 1500U) << "without the node: every hold in force";
  EXPECT_EQ(add_hold(l, n, hold("b", 2500, kGiB), kNow), HoldResult::kAdded);
  // Counted once, not zero times: "a"'s 1500 are in allocated, so 500m more do not fit.
  EXPECT_EQ(add_hold(l, n, hold("c", 500, kGiB), kNow), HoldResult::kNoRoom);
}

TEST(Ledger, ANodeListingLessThanTheHoldDoesNotCoverIt) {
  cvm::v1::CapacityLedger l;
  *l.add_holds() = hold("a", 1500, 2 * kGiB);
  // Another build id, less CPU, less memory: each leaves the hold counted.
  for (const auto& listed :
       {AllocatedBuild{"z", 1500, 2 * kGiB}, AllocatedBuild{"a", 1000, 2 * kGiB},
        AllocatedBuild{"a", 1500, kGiB}}) {
    const NodeRecord n = node_running(4000, 8 * kGiB, {listed});
    EXPECT_FALSE(covered_by_node(n, l.holds(0))) << listed.build_id;
    EXPECT_EQ(held(l, kNow, &n).cpu_millicores, 1500U) << listed.build_id;
  }
  const NodeRecord n = node_running(4000, 8 * kGiB, {{"a", 2000, 4 * kGiB}});
  EXPECT_TRUE(covered_by_node(n, l.holds(0)));
}

TEST(Ledger, ACoveredHoldKeepsCountingItsGpus) {
  // GPUs are the broker's leases, not part of `allocated`: the hold's GPU count stays.
  cvm::v1::CapacityLedger l;
  auto h = hold("a", 1000, kGiB);
  h.set_gpus(2);
  *l.add_holds() = h;
  const NodeRecord n = node_running(4000, 8 * kGiB, {{"a", 1000, kGiB}});
  const auto total = held(l, kNow, &n);
  EXPECT_EQ(total.cpu_millicores, 0U);
  EXPECT_EQ(total.gpus, 2U);
}

TEST(Ledger, HoldingAgainForABuildTheNodeRunsTakesNoNewRoom) {
  // A full node that runs "a": a redelivered START of "a" holds again without needing room.
  cvm::v1::CapacityLedger l;
  const NodeRecord n = node_running(2000, 2 * kGiB, {{"a", 2000, 2 * kGiB}});
  EXPECT_EQ(add_hold(l, n, hold("a", 2000, 2 * kGiB), kNow), HoldResult::kAdded);
  EXPECT_EQ(add_hold(l, n, hold("b", 1, 1), kNow), HoldResult::kNoRoom);
}

TEST(Ledger, CoveredHoldsNeverLetANodeExceedCapacity) {
  // Whatever the node lists, capacity >= allocated + the holds it does not cover, after any
  // sequence of adds.
  for (uint64_t listed = 0; listed <= 6; ++listed) {
    for (uint64_t req = 100; req <= 1500; req += 350) {
      std::vector<AllocatedBuild> builds;
      for (uint64_t i = 0; i < listed; ++i) builds.push_back({"b" + std::to_string(i), req, kGiB});
      const NodeRecord n = node_running(8000, 64 * kGiB, builds);
      cvm::v1::CapacityLedger l;
      for (int i = 0; i < 20; ++i) {
        (void)add_hold(l, n, hold("b" + std::to_string(i), req, kGiB), kNow);
      }
      // A node may report more than its capacity (6 x 1500m here): then no new room at all.
      const uint64_t room =
          n.allocated_cpu_millicores >= 8000 ? 0 : 8000 - n.allocated_cpu_millicores;
      EXPECT_LE(held(l, kNow, &n).cpu_millicores, room) << listed << " listed, " << req << "m each";
    }
  }
}

}  // namespace
}  // namespace cvm::scheduler
