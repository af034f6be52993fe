// Items 4b and 5: the real agent gone past the scheduler's --node-ttl.
//   4b. kill -9 it and leave it dead: its not-yet-running build is placed elsewhere (a simulated
//       node). When the agent finally comes back, it must not run that build too, must not end it
//       a second time, and must leave no orphan behind.
//   5.  freeze it (SIGSTOP) instead, let the build run elsewhere, then SIGCONT: its stale writes
//       must be refused by revision and nothing may run twice.
#include "agent_fixture.h"

namespace cvm::fault {
namespace {

// 4b: dead past the TTL. The build that never got to run goes to the other node; the agent that
// comes back later must leave it there.
TEST_F(AgentFault, AgentDeadPastTtlItsBuildIsPlacedElsewhere) {
  ASSERT_NO_FATAL_FAILURE(start_services_with_agent({"--node-ttl", "3"}));
  ASSERT_TRUE(submit(agent_request("a4b")));
  auto first = wait_phase("a4b", {cvm::v1::SCHEDULED, cvm::v1::PREPARING, cvm::v1::STARTING}, 60s);
  ASSERT_TRUE(first) << logs();
  agent_->kill9();
  ASSERT_EQ(first->node_id(), "n1");
  start_other_node();
  auto end = wait_phase("a4b", {cvm::v1::RUNNING, cvm::v1::FAILED}, 60s);
  ASSERT_TRUE(end) << logs();
  EXPECT_EQ(end->phase(), cvm::v1::RUNNING) << end->message();
  EXPECT_EQ(end->node_id(), "other-0") << "placed again on the live node";

  // The agent comes back: its durable consumer still holds the old assignment.
  const int64_t restarted = now_ms();
  start_agent();
  ASSERT_TRUE(wait_agent_ready(restarted)) << logs();
  std::this_thread::sleep_for(5s);  // let it act on the redelivered assignment, if it would
  EXPECT_TRUE(containers().empty())
      << "the returning agent ran a build that runs elsewhere" << logs();
  LedgerOptions lo;
  lo.acknowledged_builds = {"a4b"};
  lo.timeout = 30s;
  lo.agents = {host()};
  const auto stats = harness_->on_fleet([](auto& f) { return f.stats(); });
  lo.sim_over_capacity = stats.over_capacity;
  expect_ledger(lo);
}

// 5: frozen, not dead. After SIGCONT the agent finishes what it was doing unless something
// refuses it: the workspace record moved to the other node (a new revision), so the agent's
// write must fail its compare-and-set and it must not leave a second copy running.
TEST_F(AgentFault, FrozenAgentPastTtlStaleWritesRefusedNothingRunsTwice) {
  ASSERT_NO_FATAL_FAILURE(start_services_with_agent({"--node-ttl", "3"}));
  ASSERT_TRUE(submit(agent_request("a5")));
  auto first = wait_phase("a5", {cvm::v1::SCHEDULED, cvm::v1::PREPARING, cvm::v1::STARTING}, 60s);
  ASSERT_TRUE(first) << logs();
  ASSERT_EQ(::kill(agent_->pid(), SIGSTOP), 0);
  ASSERT_EQ(first->node_id(), "n1");
  start_other_node();
  auto end = wait_phase("a5", {cvm::v1::RUNNING, cvm::v1::FAILED}, 60s);
  ASSERT_TRUE(end) << logs();
  ASSERT_EQ(end->phase(), cvm::v1::RUNNING) << end->message();
  ASSERT_EQ(end->node_id(), "other-0");
  ASSERT_TRUE(test::wait_until(
      [&] {
        auto h = record_history("ws-a5");
        return !h.empty() && h.back().node_id() == "other-0";
      },
      10s))
      << "the other node never recorded the workspace";

  ASSERT_EQ(::kill(agent_->pid(), SIGCONT), 0);
  // Give the thawed agent time to finish its launch and write, as it would.
  std::this_thread::sleep_for(15s);
  const auto history = record_history("ws-a5");
  size_t last_other = 0;
  for (size_t i = 0; i < history.size(); ++i) {
    if (history[i].node_id() == "other-0") last_other = i;
  }
  for (size_t i = last_other + 1; i < history.size(); ++i) {
    ADD_FAILURE() << "stale write accepted: after the workspace moved to other-0, n1 wrote "
                  << cvm::v1::Phase_Name(history[i].phase()) << " (build " << history[i].build_id()
                  << ")";
  }
  const auto running = containers();
  EXPECT_TRUE(running.empty()) << "the build runs twice: " << running.size()
                               << " container(s) on n1 too" << logs();
  expect_agent_ledger("a5");
}

}  // namespace
}  // namespace cvm::fault
