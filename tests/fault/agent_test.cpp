// Item 4a: a real cvm-node-agent (real runc containers) under the real scheduler, killed with
// kill -9 mid-launch and restarted: exactly one running container or a FAILED event, no orphan
// bundle or ID range.
#include "agent_fixture.h"

namespace cvm::fault {
namespace {

// 4a: kill -9 mid-launch (PREPARING or STARTING, while the big image is unpacked), restart at once.
TEST_F(AgentFault, KillNineAgentMidLaunchThenRestart) {
  ASSERT_NO_FATAL_FAILURE(start_services_with_agent());
  ASSERT_TRUE(submit(agent_request("a4")));
  // Mid-launch: preparing the bundle or applying the big image's layers while STARTING.
  // On a fast disk the launch can finish before a poll sees it mid-way (seen in CI): then the kill
  // lands on a running workspace, which the restarted agent must adopt, not launch again.
  ASSERT_TRUE(wait_phase("a4", {cvm::v1::PREPARING, cvm::v1::STARTING, cvm::v1::RUNNING}, 60s))
      << logs();
  agent_->kill9();
  const int64_t restarted = now_ms();
  start_agent();
  ASSERT_TRUE(wait_agent_ready(restarted)) << logs();
  auto end = wait_phase("a4", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(end) << logs();
  std::printf("kill -9 mid-launch, restarted: the build ended %s on %s\n",
              cvm::v1::Phase_Name(end->phase()).c_str(), end->node_id().c_str());
  if (end->phase() == cvm::v1::RUNNING) {
    EXPECT_EQ(containers(), std::vector<std::string>{"cvm-ws-a4"});
  } else {
    EXPECT_TRUE(containers().empty());
  }
  expect_agent_ledger("a4");
}

}  // namespace
}  // namespace cvm::fault
