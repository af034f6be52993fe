// NODE_LOST detection and what happens to a build on a lost node.
#include <gtest/gtest.h>

#include "cvm/scheduler/liveness.h"

namespace cvm::scheduler {
namespace {

constexpr int64_t kNow = 1'700'000'000'000;
constexpr int64_t kTtl = 15'000;

TEST(Liveness, FreshNodeIsNotLost) {
  LivenessTracker t;
  t.observe("a", kNow);
  EXPECT_TRUE(t.sweep(kNow + kTtl, kTtl).empty()) << "exactly the TTL old is still live";
  EXPECT_FALSE(t.is_lost("a"));
}

TEST(Liveness, ExpiredNodeIsReportedOnce) {
  LivenessTracker t;
  t.observe("a", kNow);
  auto lost = t.sweep(kNow + kTtl + 1, kTtl);
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].node_id, "a");
  EXPECT_EQ(lost[0].last_heartbeat_unix_ms, kNow);
  EXPECT_TRUE(t.is_lost("a"));
  EXPECT_TRUE(t.sweep(kNow + 10 * kTtl, kTtl).empty()) << "one report per heartbeat";
}

TEST(Liveness, NewHeartbeatRearmsAndLaterLossIsReportedAgain) {
  LivenessTracker t;
  t.observe("a", kNow);
  ASSERT_EQ(t.sweep(kNow + kTtl + 1, kTtl).size(), 1u);
  t.observe("a", kNow + kTtl + 5);
  EXPECT_FALSE(t.is_lost("a"));
  EXPECT_TRUE(t.sweep(kNow + kTtl + 6, kTtl).empty());
  auto again = t.sweep(kNow + 2 * kTtl + 6, kTtl);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].last_heartbeat_unix_ms, kNow + kTtl + 5);
}

TEST(Liveness, OlderHeartbeatIsIgnored) {
  LivenessTracker t;
  t.observe("a", kNow);
  t.observe("a", kNow - 100'000);  // a replayed watch entry
  EXPECT_TRUE(t.sweep(kNow + kTtl, kTtl).empty());
  t.observe("a", kNow);  // the same heartbeat again does not re-arm a reported loss
  ASSERT_EQ(t.sweep(kNow + kTtl + 1, kTtl).size(), 1u);
  t.observe("a", kNow);
  EXPECT_TRUE(t.sweep(kNow + kTtl + 2, kTtl).empty());
}

TEST(Liveness, ForgottenNodeIsNeverLost) {
  LivenessTracker t;
  t.observe("a", kNow);
  t.forget("a");
  EXPECT_TRUE(t.sweep(kNow + 10 * kTtl, kTtl).empty());
  EXPECT_EQ(t.size(), 0u);
}

TEST(Liveness, RearmReportsAgain) {
  LivenessTracker t;
  t.observe("a", kNow);
  ASSERT_EQ(t.sweep(kNow + kTtl + 1, kTtl).size(), 1u);
  t.rearm("a");
  EXPECT_EQ(t.sweep(kNow + kTtl + 2, kTtl).size(), 1u);
  t.rearm("unknown");  // harmless
}

TEST(Liveness, ManyNodesSortedAndOnlyStaleOnes) {
  LivenessTracker t;
  for (int i = 0; i < 100; ++i) t.observe("n" + std::to_string(i), kNow - (i % 2) * 2 * kTtl);
  auto lost = t.sweep(kNow, kTtl);
  ASSERT_EQ(lost.size(), 50u);
  for (size_t i = 1; i < lost.size(); ++i) EXPECT_LT(lost[i - 1].node_id, lost[i].node_id);
  for (const auto& l : lost) EXPECT_EQ(l.last_heartbeat_unix_ms, kNow - 2 * kTtl);
}

TEST(LostAction, EveryPhase) {
  EXPECT_EQ(lost_node_action(std::nullopt), LostAction::kPlaceAgain);
  const struct {
    cvm::v1::Phase phase;
    LostAction action;
  } cases[] = {
      {cvm::v1::PHASE_UNSPECIFIED, LostAction::kPlaceAgain},
      {cvm::v1::PENDING, LostAction::kPlaceAgain},
      {cvm::v1::SCHEDULED, LostAction::kPlaceAgain},
      {cvm::v1::PREPARING, LostAction::kPlaceAgain},
      {cvm::v1::STARTING, LostAction::kPlaceAgain},
      {cvm::v1::RUNNING, LostAction::kMarkLost},
      {cvm::v1::STOPPING, LostAction::kNothing},
      {cvm::v1::STOPPED, LostAction::kNothing},
      {cvm::v1::FAILED, LostAction::kNothing},
      {cvm::v1::LOST, LostAction::kNothing},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(lost_node_action(c.phase), c.action) << cvm::v1::Phase_Name(c.phase);
  }
  // Every enum value is covered above.
  EXPECT_EQ(std::size(cases), static_cast<size_t>(cvm::v1::Phase_descriptor()->value_count()));
}

}  // namespace
}  // namespace cvm::scheduler
