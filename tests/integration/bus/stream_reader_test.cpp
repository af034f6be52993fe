// The read side of the adapter (stream_reader.cpp) against a real nats-server: history then live
// messages of one subject, stream and consumer state, per-user inbox prefixes.
#include <string>

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

StreamConfig events_config() {
  StreamConfig c;
  c.name = "READS";
  c.subjects = {"reads.*.events"};
  return c;
}

std::vector<std::string> drain(StreamReader& reader, size_t n) {
  std::vector<std::string> out;
  while (out.size() < n) {
    auto m = reader.next(5s);
    EXPECT_TRUE(m.ok()) << m.error().message;
    if (!m.ok() || !m->has_value()) break;
    out.push_back((*m)->message.data);
  }
  return out;
}

TEST_F(BusFixture, StreamReaderGivesHistoryInOrderThenLiveMessagesOfOneSubjectOnly) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  ASSERT_TRUE(conn->ensure_stream(events_config()).ok());
  for (const char* d : {"a1", "a2", "a3"}) ASSERT_TRUE(conn->js_publish("reads.a.events", d).ok());
  ASSERT_TRUE(conn->js_publish("reads.b.events", "b1").ok());

  auto reader = conn->read_stream("READS", "reads.a.events");
  ASSERT_TRUE(reader.ok()) << reader.error().message;
  auto first = (*reader)->next(5s);
  ASSERT_TRUE(first.ok() && first->has_value());
  EXPECT_EQ((*first)->message.data, "a1");
  EXPECT_EQ((*first)->message.subject, "reads.a.events");
  EXPECT_EQ((*first)->stream_sequence, 1u);
  EXPECT_EQ((*first)->pending, 2u) << "pending tells a reader how much history is left";
  EXPECT_GT((*first)->timestamp_unix_ns, 0);
  EXPECT_EQ(drain(**reader, 2), (std::vector<std::string>{"a2", "a3"}));

  // Caught up: nothing more until something is published, then it arrives.
  auto idle = (*reader)->next(200ms);
  ASSERT_TRUE(idle.ok());
  EXPECT_FALSE(idle->has_value());
  ASSERT_TRUE(conn->js_publish("reads.b.events", "b2").ok());
  ASSERT_TRUE(conn->js_publish("reads.a.events", "a4").ok());
  EXPECT_EQ(drain(**reader, 1), (std::vector<std::string>{"a4"}));
}

TEST_F(BusFixture, StreamReaderOnAnEmptySubjectTimesOutAndOnAMissingStreamFails) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  ASSERT_TRUE(conn->ensure_stream(events_config()).ok());
  auto reader = conn->read_stream("READS", "reads.none.events");
  ASSERT_TRUE(reader.ok()) << reader.error().message;
  auto m = (*reader)->next(200ms);
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->has_value());

  auto missing = conn->read_stream("NO_SUCH_STREAM", "x.y");
  EXPECT_FALSE(missing.ok());
}

TEST_F(BusFixture, StreamAndConsumerStatesCountWhatIsLeft) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  StreamConfig work;
  work.name = "WORKQ";
  work.subjects = {"workq.*"};
  work.retention = Retention::kWorkQueue;
  ASSERT_TRUE(conn->ensure_stream(work).ok());
  auto none = conn->consumer_states("WORKQ");
  ASSERT_TRUE(none.ok()) << none.error().message;
  EXPECT_TRUE(none->empty());

  for (int i = 0; i < 5; ++i) ASSERT_TRUE(conn->js_publish("workq.n1", "x").ok());
  ASSERT_TRUE(conn->js_publish("workq.n2", "x").ok());
  Collector<int> seen;
  // A consumer that never acks: its messages move from pending to ack-pending.
  auto consumer = conn->pull_consume(
      {.stream = "WORKQ", .durable = "slow", .filter_subject = "workq.n1", .max_ack_pending = 2},
      [&](JsMessagePtr) { seen.add(1); }, 1);
  ASSERT_TRUE(consumer.ok()) << consumer.error().message;
  ASSERT_TRUE(seen.wait_for(2));

  std::vector<ConsumerState> states;
  ASSERT_TRUE(cvm::test::wait_until([&] {
    auto s = conn->consumer_states("WORKQ");
    if (!s.ok() || s->size() != 1) return false;
    states = *s;
    return states[0].ack_pending == 2 && states[0].pending == 3;
  }));
  EXPECT_EQ(states[0].name, "slow");
  EXPECT_EQ(states[0].filter_subject, "workq.n1");

  auto stream = conn->stream_state("WORKQ");
  ASSERT_TRUE(stream.ok()) << stream.error().message;
  EXPECT_EQ(stream->messages, 6u);
  EXPECT_EQ(stream->last_sequence, 6u);
  EXPECT_EQ(stream->consumers, 1);
  EXPECT_FALSE(conn->stream_state("NO_SUCH_STREAM").ok());
  EXPECT_FALSE(conn->consumer_states("NO_SUCH_STREAM").ok());
}

TEST(InboxPrefix, IsPerUserAndAlwaysOneSubjectToken) {
  EXPECT_EQ(inbox_prefix_for(""), "");
  EXPECT_EQ(inbox_prefix_for("agent-n1"), "_INBOX_agent-n1");
  EXPECT_EQ(inbox_prefix_for("a.b*c>d e"), "_INBOX_a_b_c_d_e");
}

// A user confined to its own inbox prefix can still do request-reply and JetStream; this is what
// lets deploy/nats deny every other inbox.
TEST_F(BusFixture, RequestsAndJetStreamWorkUnderAPerUserInboxPrefix) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  auto o = options();
  o.inbox_prefix = "_INBOX_tester";
  auto confined = connect(o);
  ASSERT_TRUE(confined);
  Collector<std::string> replies_to;
  auto echo = conn->subscribe("echo", "", [&](Message m) {
    replies_to.add(m.reply);
    (void)conn->publish(m.reply, m.data);
  });
  ASSERT_TRUE(echo.ok());
  ASSERT_TRUE(conn->flush().ok());
  auto reply = confined->request("echo", "hi", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ(reply->data, "hi");
  ASSERT_TRUE(replies_to.wait_for(1));
  EXPECT_EQ(replies_to.at(0).rfind("_INBOX_tester.", 0), 0u) << replies_to.at(0);

  ASSERT_TRUE(confined->ensure_stream(events_config()).ok());
  ASSERT_TRUE(confined->js_publish("reads.c.events", "c1").ok());
  auto reader = confined->read_stream("READS", "reads.c.events");
  ASSERT_TRUE(reader.ok()) << reader.error().message;
  auto m = (*reader)->next(5s);
  ASSERT_TRUE(m.ok() && m->has_value());
  EXPECT_EQ((*m)->message.data, "c1");
}

}  // namespace
}  // namespace cvm::bus::testing
