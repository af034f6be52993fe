// plan_reclaims: which leases the reconcile frees, and which it must leave alone.
#include "cvm/broker/reclaim.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace cvm::broker {
namespace {

constexpr int64_t kNow = 1'700'000'000'000;
constexpr int64_t kMin = 60'000;

LeaseEntry lease(const std::string& node, const std::string& gpu, const std::string& ws,
                 int64_t leased_ms, uint64_t rev = 7) {
  LeaseEntry e;
  e.key = node + "." + gpu;
  e.revision = rev;
  e.lease.set_node_id(node);
  e.lease.set_gpu_uuid(gpu);
  e.lease.set_workspace_id(ws);
  e.lease.set_lease_id("b-" + ws);
  e.lease.set_leased_unix_ms(leased_ms);
  return e;
}

struct World {
  std::vector<LeaseEntry> leases;
  std::map<std::string, int64_t, std::less<>> nodes{{"n1", kNow - 1000}};
  std::map<std::string, WorkspaceView, std::less<>> workspaces;
  ReclaimOptions opts{.now_unix_ms = kNow, .node_ttl_ms = kMin, .lease_grace_ms = 10 * kMin};

  std::vector<Reclaim> plan() { return plan_reclaims(leases, nodes, workspaces, opts); }
};

TEST(Reclaim, NothingWhileEverythingIsAlive) {
  World w;
  w.leases = {lease("n1", "GPU-0", "ws", kNow - 60 * kMin)};
  w.workspaces["ws"] = {cvm::v1::RUNNING, kNow - 30 * kMin};
  EXPECT_TRUE(w.plan().empty());
}

TEST(Reclaim, NodeGone) {
  World w;
  w.leases = {lease("gone", "GPU-0", "ws", kNow, 42)};
  w.workspaces["ws"] = {cvm::v1::RUNNING, kNow};
  const auto p = w.plan();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].cause, ReclaimCause::kNodeGone);
  EXPECT_EQ(p[0].key, "gone.GPU-0");
  EXPECT_EQ(p[0].revision, 42u);  // deleted only if still at the revision read
  EXPECT_EQ(p[0].workspace_id, "ws");
  EXPECT_EQ(p[0].message, "node gone is no longer registered");
}

TEST(Reclaim, NodeLostAfterTheTtl) {
  World w;
  w.leases = {lease("n1", "GPU-0", "ws", kNow)};
  w.workspaces["ws"] = {cvm::v1::RUNNING, kNow};
  w.nodes["n1"] = kNow - kMin;
  EXPECT_TRUE(w.plan().empty());  // exactly the TTL: still alive
  w.nodes["n1"] = kNow - kMin - 1;
  auto p = w.plan();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].cause, ReclaimCause::kNodeLost);
  EXPECT_EQ(p[0].message, "node n1 has not heartbeated for 60 s");
  w.opts.node_ttl_ms = 0;  // liveness off
  EXPECT_TRUE(w.plan().empty());
}

TEST(Reclaim, WorkspaceGoneOnlyAfterTheGrace) {
  World w;
  w.leases = {lease("n1", "GPU-0", "ws", kNow - 10 * kMin)};
  EXPECT_TRUE(w.plan().empty());  // its agent may not have written the record yet
  w.leases = {lease("n1", "GPU-0", "ws", kNow - 10 * kMin - 1)};
  const auto p = w.plan();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].cause, ReclaimCause::kWorkspaceGone);
  EXPECT_EQ(reclaim_cause_name(p[0].cause), "workspace-gone");
}

TEST(Reclaim, StoppedWithoutReleaseAfterTheGrace) {
  World w;
  w.leases = {lease("n1", "GPU-0", "ws", kNow - 60 * kMin)};
  w.workspaces["ws"] = {cvm::v1::STOPPED, kNow - 5 * kMin};
  EXPECT_TRUE(w.plan().empty());  // the agent's own release may still come
  w.workspaces["ws"] = {cvm::v1::STOPPED, kNow - 11 * kMin};
  auto p = w.plan();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].cause, ReclaimCause::kWorkspaceStopped);
  EXPECT_EQ(p[0].message, "workspace ws is stopped");
  w.workspaces["ws"] = {cvm::v1::FAILED, kNow - 11 * kMin};
  p = w.plan();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].message, "workspace ws is failed");
}

TEST(Reclaim, ALeaseNewerThanTheStopBelongsToTheNextStart) {
  World w;
  w.leases = {lease("n1", "GPU-0", "ws", kNow - 20 * kMin)};
  w.workspaces["ws"] = {cvm::v1::STOPPED, kNow - 30 * kMin};
  EXPECT_TRUE(w.plan().empty());
}

TEST(Reclaim, EveryOtherPhaseKeepsTheLease) {
  for (auto phase :
       {cvm::v1::PHASE_UNSPECIFIED, cvm::v1::PENDING, cvm::v1::SCHEDULED, cvm::v1::PREPARING,
        cvm::v1::STARTING, cvm::v1::RUNNING, cvm::v1::STOPPING, cvm::v1::LOST}) {
    World w;
    w.leases = {lease("n1", "GPU-0", "ws", kNow - 60 * kMin)};
    w.workspaces["ws"] = {phase, kNow - 30 * kMin};
    EXPECT_TRUE(w.plan().empty()) << cvm::v1::Phase_Name(phase);
  }
}

TEST(Reclaim, ManyLeasesEachJudgedAlone) {
  World w;
  w.nodes["n2"] = kNow - 5 * kMin;  // lost
  w.leases = {lease("n1", "GPU-0", "alive", kNow - 60 * kMin),
              lease("n1", "GPU-1", "missing", kNow - 60 * kMin),
              lease("n2", "GPU-0", "alive", kNow), lease("n3", "GPU-0", "alive", kNow)};
  w.workspaces["alive"] = {cvm::v1::RUNNING, kNow};
  const auto p = w.plan();
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].key, "n1.GPU-1");
  EXPECT_EQ(p[1].cause, ReclaimCause::kNodeLost);
  EXPECT_EQ(p[2].cause, ReclaimCause::kNodeGone);
}

}  // namespace
}  // namespace cvm::broker
