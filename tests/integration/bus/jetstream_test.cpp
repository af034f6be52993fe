// JetStream through the adapter: streams, de-duplication, pull consumers and redelivery.

#include <algorithm>
#include <future>
#include <mutex>
#include <vector>

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

class BusJetStream : public BusFixture {
 protected:
  void SetUp() override {
    BusFixture::SetUp();
    if (HasFatalFailure()) return;
    conn_ = connect();
    ASSERT_TRUE(conn_);
    make_stream(conn_, "WORK", "work.>");
  }
  void TearDown() override {
    conn_.reset();
    BusFixture::TearDown();
  }

  ConsumerConfig consumer(std::chrono::milliseconds ack_wait = 30s, int max_deliver = -1) {
    ConsumerConfig c;
    c.stream = "WORK";
    c.durable = "worker";
    c.filter_subject = "work.>";
    c.ack_wait = ack_wait;
    c.max_deliver = max_deliver;
    return c;
  }

  std::unique_ptr<PullConsumer> consume(const ConsumerConfig& config,
                                        std::function<void(JsMessagePtr)> handler) {
    auto c = conn_->pull_consume(config, std::move(handler));
    EXPECT_TRUE(c.ok()) << c.error().message;
    return c.ok() ? std::move(*c) : nullptr;
  }

  void publish(const std::string& subject, const std::string& data) {
    auto ack = conn_->js_publish(subject, data);
    ASSERT_TRUE(ack.ok()) << ack.error().message;
  }

  ConnectionPtr conn_;
};

TEST_F(BusJetStream, EnsureStreamIsIdempotentAndUpdates) {
  StreamConfig config;
  config.name = "EVENTS";
  config.subjects = {"events.>"};
  config.max_age = std::chrono::hours{24};
  ASSERT_TRUE(conn_->ensure_stream(config).ok());
  ASSERT_TRUE(conn_->ensure_stream(config).ok());
  config.max_age = std::chrono::hours{48};
  config.subjects.push_back("audit.>");
  auto updated = conn_->ensure_stream(config);
  ASSERT_TRUE(updated.ok()) << updated.error().message;
  auto ack = conn_->js_publish("audit.x", "1");
  ASSERT_TRUE(ack.ok()) << ack.error().message;
  EXPECT_EQ(ack->stream, "EVENTS");
}

TEST_F(BusJetStream, EnsureStreamIsSafeConcurrently) {
  StreamConfig config;
  config.name = "RACE";
  config.subjects = {"race.>"};
  config.retention = Retention::kWorkQueue;
  std::vector<ConnectionPtr> conns;
  for (int i = 0; i < 4; ++i) conns.push_back(connect());
  std::vector<std::future<Status>> results;
  for (auto& c : conns) {
    results.push_back(
        std::async(std::launch::async, [&c, &config] { return c->ensure_stream(config); }));
  }
  for (auto& r : results) {
    auto s = r.get();
    EXPECT_TRUE(s.ok()) << s.error().message;
  }
}

TEST_F(BusJetStream, PublishToSubjectWithoutStreamFails) {
  auto ack = conn_->js_publish("nostream.x", "1", {}, {}, 1s);
  ASSERT_FALSE(ack.ok());
  EXPECT_TRUE(ack.error().is_not_found()) << ack.error().message;
}

TEST_F(BusJetStream, DuplicateMsgIdIsStoredOnce) {
  auto first = conn_->js_publish("work.a", "payload", "build-1");
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_FALSE(first->duplicate);
  auto second = conn_->js_publish("work.a", "payload", "build-1");
  ASSERT_TRUE(second.ok()) << second.error().message;
  EXPECT_TRUE(second->duplicate);
  EXPECT_EQ(second->sequence, first->sequence);
  auto other = conn_->js_publish("work.a", "payload", "build-2", {{"X-Kind", "start"}});
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->duplicate);
  EXPECT_EQ(other->sequence, first->sequence + 1) << "the duplicate took no sequence";

  Collector<JsMessagePtr> got;
  auto c = consume(consumer(), [&](JsMessagePtr m) {
    static_cast<void>(m->ack());
    got.add(m);
  });
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_EQ(got.at(0)->header("Nats-Msg-Id"), "build-1");
  EXPECT_EQ(got.at(1)->header("X-Kind"), "start");
  EXPECT_FALSE(got.wait_for(3, 200ms));
}

TEST_F(BusJetStream, PullConsumerDeliversOnExecutorAndAckStopsRedelivery) {
  publish("work.a", "1");
  publish("work.b", "2");
  Collector<JsMessagePtr> got;
  std::atomic<bool> off_executor{false};
  auto c = consume(consumer(500ms), [&](JsMessagePtr m) {
    if (!on_io_thread()) off_executor = true;
    auto s = m->ack();
    EXPECT_TRUE(s.ok()) << s.error().message;
    got.add(m);
  });
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_FALSE(off_executor);
  EXPECT_EQ(got.at(0)->data(), "1");
  EXPECT_EQ(got.at(0)->subject(), "work.a");
  EXPECT_EQ(got.at(0)->num_delivered(), 1u);
  EXPECT_EQ(got.at(0)->stream_sequence(), 1u);
  EXPECT_EQ(got.at(1)->data(), "2");
  // Past the ack wait: an un-acked message would be back by now.
  EXPECT_FALSE(got.wait_for(3, 1200ms));
}

// Many batches' worth, published while the consumer is already pulling (requests half-used when
// more arrive): each message exactly once, in order, and never more than two pull requests
// waiting at the server.
TEST_F(BusJetStream, ABurstOfManyBatchesArrivesOnceInOrder) {
  constexpr int kMessages = 1000;
  std::vector<uint64_t> seen;
  std::mutex mu;
  auto c = consume(consumer(), [&](JsMessagePtr m) {
    ASSERT_TRUE(m->ack_async().ok());
    std::lock_guard lock(mu);
    seen.push_back(m->stream_sequence());
  });
  ASSERT_TRUE(c);
  uint64_t most_waiting = 0;
  for (int i = 0; i < kMessages; ++i) {
    publish("work.burst", std::to_string(i));
    if (i % 100 == 0) {
      auto states = conn_->consumer_states("WORK");
      ASSERT_TRUE(states.ok());
      for (const auto& st : *states) most_waiting = std::max(most_waiting, st.waiting);
    }
  }
  ASSERT_TRUE(cvm::test::wait_until(
      [&] {
        std::lock_guard lock(mu);
        return seen.size() >= kMessages;
      },
      20s));
  std::this_thread::sleep_for(300ms);  // a duplicate would arrive about now
  std::lock_guard lock(mu);
  ASSERT_EQ(seen.size(), static_cast<size_t>(kMessages));
  for (int i = 0; i < kMessages; ++i) EXPECT_EQ(seen[i], static_cast<uint64_t>(i + 1));
  EXPECT_LE(most_waiting, 2u);
}

// An ack of a message whose delivery was already settled is a no-op, as in cnats: a nak after an
// ack does not bring the message back.
TEST_F(BusJetStream, ANakAfterAnAckChangesNothing) {
  publish("work.once", "x");
  Collector<JsMessagePtr> got;
  auto c = consume(consumer(500ms), [&](JsMessagePtr m) {
    EXPECT_TRUE(m->ack().ok());
    EXPECT_TRUE(m->nak().ok());
    got.add(m);
  });
  ASSERT_TRUE(got.wait_for(1));
  EXPECT_FALSE(got.wait_for(2, 1500ms));
}

TEST_F(BusJetStream, NakWithDelayRedeliversAfterDelay) {
  publish("work.a", "retry-me");
  Collector<std::pair<uint64_t, std::chrono::steady_clock::time_point>> got;
  auto c = consume(consumer(), [&](JsMessagePtr m) {
    const auto at = std::chrono::steady_clock::now();
    // Ack before recording: the test ends (and closes the connection) once it sees the record.
    auto s = m->num_delivered() == 1 ? m->nak(300ms) : m->ack();
    EXPECT_TRUE(s.ok()) << s.error().message;
    got.add({m->num_delivered(), at});
  });
  ASSERT_TRUE(got.wait_for(2, 5s));
  EXPECT_EQ(got.at(0).first, 1u);
  EXPECT_EQ(got.at(1).first, 2u);
  EXPECT_GE(got.at(1).second - got.at(0).second, 250ms);
}

TEST_F(BusJetStream, TermStopsRedelivery) {
  publish("work.a", "poison");
  publish("work.b", "fine");
  Collector<std::string> got;
  auto c = consume(consumer(500ms), [&](JsMessagePtr m) {
    got.add(std::string(m->data()));
    auto s = m->data() == "poison" ? m->term() : m->ack();
    EXPECT_TRUE(s.ok()) << s.error().message;
  });
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_FALSE(got.wait_for(3, 1200ms)) << "a terminated message came back";
}

TEST_F(BusJetStream, MaxDeliverBoundsRedelivery) {
  publish("work.a", "flaky");
  Collector<uint64_t> got;
  auto c = consume(consumer(30s, 2), [&](JsMessagePtr m) {
    got.add(m->num_delivered());
    static_cast<void>(m->nak());
  });
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_FALSE(got.wait_for(3, 700ms));
  EXPECT_EQ(got.at(1), 2u);
}

TEST_F(BusJetStream, DurablePositionSurvivesConsumerRestart) {
  publish("work.a", "first");
  Collector<std::string> got;
  auto handler = [&](JsMessagePtr m) {
    static_cast<void>(m->ack());
    got.add(std::string(m->data()));
  };
  auto c = consume(consumer(), handler);
  ASSERT_TRUE(got.wait_for(1));
  c.reset();  // as a service restart would
  publish("work.a", "second");
  c = consume(consumer(), handler);
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_EQ(got.at(1), "second");
  EXPECT_FALSE(got.wait_for(3, 300ms)) << "the acked message was delivered again";
}

TEST_F(BusJetStream, MessageOutlivesItsConsumer) {
  publish("work.a", "late-ack");
  Collector<JsMessagePtr> got;
  auto c = consume(consumer(), [&](JsMessagePtr m) { got.add(m); });
  ASSERT_TRUE(got.wait_for(1));
  c.reset();
  auto m = got.at(0);
  EXPECT_EQ(m->data(), "late-ack");
  auto s = m->ack();
  EXPECT_TRUE(s.ok()) << s.error().message;
}

TEST_F(BusJetStream, ConsumerStopsPromptly) {
  auto c = consume(consumer(), [](JsMessagePtr) {});
  ASSERT_TRUE(c);
  std::this_thread::sleep_for(50ms);  // let the first fetch start
  const auto start = std::chrono::steady_clock::now();
  c.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

TEST_F(BusJetStream, ConsumerOnMissingStreamFails) {
  auto config = consumer();
  config.stream = "MISSING";
  auto c = conn_->pull_consume(config, [](JsMessagePtr) {});
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.error().is_not_found()) << c.error().message;
}

TEST_F(BusJetStream, ConsumerWithoutFilterGetsEverySubject) {
  publish("work.x", "1");
  publish("work.y.z", "2");
  auto config = consumer();
  config.durable = "all";
  config.filter_subject.clear();
  Collector<std::string> got;
  auto c = consume(config, [&](JsMessagePtr m) {
    static_cast<void>(m->ack());
    got.add(std::string(m->subject()));
  });
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_EQ(got.at(1), "work.y.z");
}

TEST_F(BusJetStream, LastMessageBySubject) {
  publish("work.s", "old");
  publish("work.s", "new");
  auto last = conn_->last_message("WORK", "work.s");
  ASSERT_TRUE(last.ok()) << last.error().message;
  ASSERT_TRUE(last->has_value());
  EXPECT_EQ((*last)->data, "new");
  auto none = conn_->last_message("WORK", "work.empty");
  ASSERT_TRUE(none.ok()) << none.error().message;
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace cvm::bus::testing
