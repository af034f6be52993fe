#include "cvm/session/flow.h"

#include <deque>
#include <random>
#include <string>

#include <gtest/gtest.h>

namespace cvm::session {
namespace {

using cvm::v1::SessionFrame;
using namespace std::chrono_literals;

SessionFrame output(std::string bytes) {
  SessionFrame f;
  f.set_output(std::move(bytes));
  return f;
}

SessionFrame heartbeat() {
  SessionFrame f;
  f.set_heartbeat(true);
  return f;
}

TEST(FlowControl, NumbersFramesFromOneAndSpendsTheWindowOnDataOnly) {
  FlowControl fc(10, 100);
  auto a = fc.send(output("12345"));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->seq(), 1u);
  EXPECT_EQ(fc.can_send(), 5u);
  auto b = fc.send(heartbeat());
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->seq(), 2u);
  EXPECT_EQ(fc.can_send(), 5u);
  EXPECT_EQ(fc.sent_frames(), 2u);
}

TEST(FlowControl, RefusesDataBeyondThePeersWindowAndNumbersNothing) {
  FlowControl fc(4, 100);
  auto r = fc.send(output("12345"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("exceed"), std::string::npos) << r.error().message;
  EXPECT_EQ(fc.can_send(), 4u);
  auto next = fc.send(output("1234"));
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->seq(), 1u);
  EXPECT_EQ(fc.can_send(), 0u);
}

TEST(FlowControl, CreditFromThePeerWidensTheWindow) {
  FlowControl fc(4, 100);
  ASSERT_TRUE(fc.send(output("1234")).ok());
  SessionFrame credit;
  credit.set_seq(1);
  credit.set_credit(3);
  ASSERT_TRUE(fc.receive(credit).ok());
  EXPECT_EQ(fc.can_send(), 3u);
}

TEST(FlowControl, CreditSaturatesInsteadOfWrapping) {
  FlowControl fc(UINT64_MAX - 1, 100);
  SessionFrame credit;
  credit.set_seq(1);
  credit.set_credit(10);
  ASSERT_TRUE(fc.receive(credit).ok());
  EXPECT_EQ(fc.can_send(), UINT64_MAX);
}

TEST(FlowControl, AGapARepeatOrAFrameWithoutANumberEndsTheSession) {
  FlowControl fc(100, 100);
  SessionFrame f = heartbeat();
  f.set_seq(2);
  EXPECT_FALSE(fc.receive(f).ok()) << "a gap";
  f.set_seq(0);
  EXPECT_FALSE(fc.receive(f).ok()) << "no number";
  f.set_seq(1);
  ASSERT_TRUE(fc.receive(f).ok());
  auto again = fc.receive(f);
  ASSERT_FALSE(again.ok()) << "a repeat";
  EXPECT_NE(again.error().message.find("lost or repeated"), std::string::npos);
}

TEST(FlowControl, DataBeyondTheOwnWindowIsABreach) {
  FlowControl fc(100, 8);
  SessionFrame f = output("12345");
  f.set_seq(1);
  ASSERT_TRUE(fc.receive(f).ok());
  f.set_seq(2);
  auto r = fc.receive(f);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("3 of window left"), std::string::npos) << r.error().message;
}

TEST(FlowControl, CreditGoesBackOnceHalfTheWindowWasWrittenOut) {
  FlowControl fc(100, 10);
  SessionFrame f = output("1234567");
  f.set_seq(1);
  ASSERT_TRUE(fc.receive(f).ok());
  EXPECT_EQ(fc.buffered(), 7u);
  EXPECT_FALSE(fc.consumed(4).has_value()) << "4 of 10 is under half";
  EXPECT_EQ(fc.buffered(), 3u);
  auto credit = fc.consumed(3);
  ASSERT_TRUE(credit.has_value());
  EXPECT_EQ(credit->credit(), 7u);
  EXPECT_EQ(credit->seq(), 1u) << "credit frames are numbered with the rest";
  EXPECT_EQ(fc.buffered(), 0u);
}

TEST(FlowControl, ConsumingMoreThanWasReceivedHandsBackOnlyWhatWasSpent) {
  FlowControl fc(100, 10);
  SessionFrame f = output("123456");
  f.set_seq(1);
  ASSERT_TRUE(fc.receive(f).ok());
  auto credit = fc.consumed(1000);
  ASSERT_TRUE(credit.has_value());
  EXPECT_EQ(credit->credit(), 6u);
  EXPECT_FALSE(fc.consumed(1000).has_value()) << "nothing more was spent";
}

// Two ends over an in-memory bus (one FIFO per direction, as core NATS keeps order on one
// connection): a producer writes as fast as its window allows, the consumer writes out at a
// random pace. Everything arrives once, in order, and the bytes in flight plus those buffered
// never exceed the receiver's window.
TEST(FlowControl, TwoEndsMoveALargeStreamWithinTheWindow) {
  constexpr uint64_t kWindow = 64 << 10;
  FlowControl agent(kWindow, kWindow);
  FlowControl client(kWindow, kWindow);
  std::deque<SessionFrame> to_client;
  std::deque<SessionFrame> to_agent;
  std::mt19937 rng(7);
  std::string source(3 << 20, '\0');
  for (auto& c : source) c = static_cast<char>(rng());
  size_t produced = 0;
  std::string sink;
  uint64_t client_buffered = 0;  // received, not yet written out
  uint64_t max_outstanding = 0;
  int rounds = 0;
  while (sink.size() < source.size()) {
    ASSERT_LT(++rounds, 1'000'000) << "stalled at " << sink.size();
    // The agent sends what its window allows, in chunks.
    while (produced < source.size() && agent.can_send() > 0) {
      const size_t n = std::min<size_t>(
          {kMaxChunk, agent.can_send(), source.size() - produced, 1 + (rng() % 20000)});
      auto f = agent.send(output(source.substr(produced, n)));
      ASSERT_TRUE(f.ok()) << f.error().message;
      to_client.push_back(*f);
      produced += n;
    }
    uint64_t in_flight = 0;
    for (const auto& f : to_client) in_flight += data_size(f);
    max_outstanding = std::max(max_outstanding, in_flight + client_buffered);
    // The client takes a few frames off the bus, then writes some of its buffer out.
    for (int i = static_cast<int>(rng() % 4); i >= 0 && !to_client.empty(); --i) {
      auto f = to_client.front();
      to_client.pop_front();
      ASSERT_TRUE(client.receive(f).ok());
      sink += f.output();
      client_buffered += data_size(f);
    }
    const uint64_t written = std::min<uint64_t>(client_buffered, rng() % 30000);
    client_buffered -= written;
    if (auto credit = client.consumed(written)) to_agent.push_back(*credit);
    while (!to_agent.empty()) {
      ASSERT_TRUE(agent.receive(to_agent.front()).ok());
      to_agent.pop_front();
    }
  }
  EXPECT_TRUE(sink == source) << "the stream arrived changed";
  EXPECT_LE(max_outstanding, kWindow);
  EXPECT_GT(client.received_frames(), 20u);
}

TEST(Liveness, GoneAfterThreeSilentPeriodsAndHeartbeatsWhenIdle) {
  const auto t0 = std::chrono::steady_clock::time_point{} + 1h;
  Liveness l(1000ms, t0);
  EXPECT_FALSE(l.heartbeat_due(t0 + 999ms));
  EXPECT_TRUE(l.heartbeat_due(t0 + 1000ms));
  l.sent(t0 + 1000ms);
  EXPECT_FALSE(l.heartbeat_due(t0 + 1500ms));
  EXPECT_FALSE(l.gone(t0 + 2999ms));
  EXPECT_TRUE(l.gone(t0 + 3000ms));
  l.heard(t0 + 2500ms);
  EXPECT_FALSE(l.gone(t0 + 5000ms));
  EXPECT_TRUE(l.gone(t0 + 5500ms));
}

TEST(Access, OwnerAndAdminsEnterOthersAreToldWhoOwnsIt) {
  const std::vector<std::string> admins = {"ops"};
  EXPECT_TRUE(may_enter("alice", "alice", admins).allowed);
  EXPECT_TRUE(may_enter("ops", "alice", admins).allowed);
  auto bob = may_enter("bob", "alice", admins);
  EXPECT_FALSE(bob.allowed);
  EXPECT_EQ(bob.reason, "the workspace belongs to alice, not to bob");
  EXPECT_FALSE(may_enter("bob", "", admins).allowed) << "no owner: admins only";
  EXPECT_TRUE(may_enter("ops", "", admins).allowed);
  EXPECT_FALSE(may_enter("", "", {""}).allowed) << "an empty user is nobody";
  EXPECT_FALSE(may_enter("", "alice", admins).allowed);
}

TEST(Limits, PerWorkspaceThenPerUserAndZeroMeansNone) {
  Limits l;
  l.per_workspace = 2;
  l.per_user = 3;
  EXPECT_FALSE(over_limit(1, 2, l).has_value());
  EXPECT_NE(over_limit(2, 0, l).value_or("").find("at most 2"), std::string::npos);
  EXPECT_NE(over_limit(0, 3, l).value_or("").find("at most 3"), std::string::npos);
  l.per_workspace = 0;
  l.per_user = 0;
  EXPECT_FALSE(over_limit(1000, 1000, l).has_value());
}

TEST(SessionId, SixteenHexDigitsAndNotRepeated) {
  const auto a = new_session_id();
  const auto b = new_session_id();
  EXPECT_EQ(a.size(), 16u);
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef"), std::string::npos) << a;
  EXPECT_NE(a, b);
}

}  // namespace
}  // namespace cvm::session
