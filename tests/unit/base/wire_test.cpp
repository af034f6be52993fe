#include "cvm/base/wire.h"
#include "cvm/base/reasons.h"

#include <string>

#include <gtest/gtest.h>

namespace cvm::wire {
namespace {

TEST(Wire, SubjectsFollowTheContract) {
  EXPECT_EQ(node_work_subject("n1"), "cvm.v1.node.n1.work");
  EXPECT_EQ(build_events_subject("b-7"), "cvm.v1.builds.b-7.events");
  EXPECT_EQ(agent_durable("n1"), "agent-n1");
}

TEST(Wire, SessionSubjectsCarryNodeUserAndSession) {
  EXPECT_EQ(session_open_subject("n1", "alice"), "cvm.v1.node.n1.open.alice");
  EXPECT_EQ(session_in_subject("n1", "alice", "s9"), "cvm.v1.node.n1.session.alice.s9.in");
  EXPECT_EQ(session_out_subject("n1", "alice", "s9"), "cvm.v1.node.n1.session.alice.s9.out");
  EXPECT_EQ(session_open_wildcard("n1"), "cvm.v1.node.n1.open.*");
  EXPECT_EQ(session_in_wildcard("n1"), "cvm.v1.node.n1.session.*.*.in");
}

TEST(Wire, ValidIdsAreSingleSubjectTokens) {
  EXPECT_TRUE(is_valid_id("ws_1-A"));
  EXPECT_TRUE(is_valid_id(std::string(128, 'a')));
  EXPECT_FALSE(is_valid_id(""));
  EXPECT_FALSE(is_valid_id(std::string(129, 'a')));
  for (const char* bad : {"a.b", "a b", "a*", "a>", "a/b", "ä", "a\n"}) {
    EXPECT_FALSE(is_valid_id(bad)) << bad;
  }
}

TEST(Reasons, EveryReasonHasText) {
  for (int r = cvm::v1::Reason_MIN + 1; r <= cvm::v1::Reason_MAX; ++r) {
    ASSERT_TRUE(cvm::v1::Reason_IsValid(r));
    EXPECT_FALSE(reason_text(static_cast<cvm::v1::Reason>(r)).empty()) << r;
    EXPECT_NE(reason_text(static_cast<cvm::v1::Reason>(r)), "unknown reason") << r;
  }
}

TEST(Reasons, TerminalPhases) {
  EXPECT_TRUE(is_terminal_phase(cvm::v1::RUNNING));
  EXPECT_TRUE(is_terminal_phase(cvm::v1::STOPPED));
  EXPECT_TRUE(is_terminal_phase(cvm::v1::FAILED));
  EXPECT_FALSE(is_terminal_phase(cvm::v1::SCHEDULED));
  EXPECT_FALSE(is_terminal_phase(cvm::v1::PREPARING));
  EXPECT_EQ(phase_name(cvm::v1::RUNNING), "RUNNING");
}

TEST(Reasons, PhasesThatReleaseCapacity) {
  for (int p = cvm::v1::Phase_MIN; p <= cvm::v1::Phase_MAX; ++p) {
    if (!cvm::v1::Phase_IsValid(p)) continue;
    const auto phase = static_cast<cvm::v1::Phase>(p);
    const bool expected =
        phase == cvm::v1::STOPPED || phase == cvm::v1::FAILED || phase == cvm::v1::LOST;
    EXPECT_EQ(releases_capacity(phase), expected) << phase_name(phase);
  }
}

}  // namespace
}  // namespace cvm::wire
