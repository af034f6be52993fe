// build_still_ours: whether a build assigned to this node is still its own, given the workspace's
// record in KV (docs/reliability.md, "Stale agent writes" and "Returning agent");
// ownership_read_fresh: when that answer must be read again before the runtime.
#include <gtest/gtest.h>

#include "cvm/agent/agent_service.h"

namespace cvm::agent {
namespace {

cvm::v1::WorkspaceRecord record(const std::string& node, const std::string& build) {
  cvm::v1::WorkspaceRecord r;
  r.set_workspace_id("ws-1");
  r.set_node_id(node);
  r.set_build_id(build);
  r.set_phase(cvm::v1::RUNNING);
  return r;
}

TEST(BuildStillOurs, NoRecordIsOurs) {
  EXPECT_TRUE(build_still_ours(nullptr, 0, 0, "n1", "b1"));
  // Deleted since the agent read it: nobody else claims it.
  EXPECT_TRUE(build_still_ours(nullptr, 0, 7, "n1", "b1"));
}

TEST(BuildStillOurs, ThisNodesRecordIsOursWhateverItsRevision) {
  const auto r = record("n1", "b1");
  EXPECT_TRUE(build_still_ours(&r, 5, 5, "n1", "b1"));
  // The scheduler marked it LOST while the agent was away: still this node's.
  EXPECT_TRUE(build_still_ours(&r, 9, 5, "n1", "b1"));
  const auto older = record("n1", "b0");
  EXPECT_TRUE(build_still_ours(&older, 9, 5, "n1", "b1"));
}

TEST(BuildStillOurs, SameBuildOnAnotherNodeMoved) {
  const auto r = record("other-0", "b1");
  EXPECT_FALSE(build_still_ours(&r, 5, 5, "n1", "b1"));  // a redelivery after the move
  EXPECT_FALSE(build_still_ours(&r, 9, 5, "n1", "b1"));  // written while the agent was frozen
}

TEST(BuildStillOurs, AnotherBuildOnAnotherNodeDependsOnTheRevision) {
  const auto r = record("other-0", "b0");
  // The record the agent saw when the assignment came: the workspace's past, it moves here.
  EXPECT_TRUE(build_still_ours(&r, 5, 5, "n1", "b1"));
  // Written since: the workspace was placed elsewhere again.
  EXPECT_FALSE(build_still_ours(&r, 6, 5, "n1", "b1"));
}

// The read sent when a START arrives stands for "now" right before the runtime only while it is
// fresh; older (a slow unpack, a frozen agent), the agent reads again.
TEST(OwnershipReadFresh, FreshOnlyWellWithinTheNodeTtl) {
  using std::chrono::milliseconds;
  EXPECT_TRUE(ownership_read_fresh(milliseconds(0)));
  EXPECT_TRUE(ownership_read_fresh(milliseconds(250)));
  EXPECT_FALSE(ownership_read_fresh(milliseconds(251)));
  EXPECT_FALSE(ownership_read_fresh(std::chrono::seconds(3)));  // a node TTL: the build may move
}

}  // namespace
}  // namespace cvm::agent
