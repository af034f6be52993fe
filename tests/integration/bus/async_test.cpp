// The asynchronous calls of the adapter: JetStream publish with an ack callback, KV
// compare-and-set without waiting, request-reply and the stream message-get, each completing on
// the executor; and the fire-and-forget ack.

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

class BusAsync : public BusFixture {
 protected:
  void SetUp() override {
    BusFixture::SetUp();
    if (HasFatalFailure()) return;
    conn_ = connect();
    ASSERT_TRUE(conn_);
    make_stream(conn_, "ASYNC", "async.>");
    if (HasFatalFailure()) return;
    make_kv(conn_, "ledger", kv_);
  }
  void TearDown() override {
    kv_.reset();
    conn_.reset();
    BusFixture::TearDown();
  }

  // Runs one asynchronous call and waits for its result (which must come on the io thread).
  template <class R, class Start>
  std::optional<R> await(Start&& start, std::chrono::milliseconds timeout = 10s) {
    Collector<R> results;
    std::atomic<bool> on_io{false};
    start([&](R r) {
      on_io = on_io_thread();
      results.add(std::move(r));
    });
    if (!results.wait_for(1, timeout)) return std::nullopt;
    EXPECT_TRUE(on_io.load()) << "completions run on the executor";
    return results.at(0);
  }

  ConnectionPtr conn_;
  std::optional<KeyValue> kv_;
};

TEST_F(BusAsync, PublishAsyncAcksWithSequenceAndDeduplicates) {
  AsyncPublish opts;
  opts.msg_id = "m1";
  auto first = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.a", "one", opts, done); });
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(first->ok()) << first->error().message;
  EXPECT_EQ((*first)->stream, "ASYNC");
  EXPECT_EQ((*first)->sequence, 1u);
  EXPECT_FALSE((*first)->duplicate);

  auto again = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.a", "one again", opts, done); });
  ASSERT_TRUE(again.has_value());
  ASSERT_TRUE(again->ok());
  EXPECT_TRUE((*again)->duplicate);
  auto last = conn_->last_message("ASYNC", "async.a");
  ASSERT_TRUE(last.ok());
  ASSERT_TRUE(last->has_value());
  EXPECT_EQ((*last)->data, "one");
}

TEST_F(BusAsync, ManyPublishesInFlightEachGetTheirOwnAck) {
  constexpr int kCount = 500;
  Collector<std::pair<int, uint64_t>> acks;
  for (int i = 0; i < kCount; ++i) {
    conn_->js_publish_async("async.many", std::to_string(i), {}, [&, i](Result<PubAck> ack) {
      acks.add({i, ack.ok() ? ack->sequence : 0});
    });
  }
  ASSERT_TRUE(acks.wait_for(kCount));
  std::set<uint64_t> sequences;
  for (const auto& [i, seq] : acks.items()) {
    ASSERT_NE(seq, 0u) << "publish " << i << " failed";
    sequences.insert(seq);
  }
  EXPECT_EQ(sequences.size(), static_cast<size_t>(kCount)) << "one distinct sequence each";
}

TEST_F(BusAsync, ExpectedLastSubjectSequenceIsCompareAndSet) {
  // 0: nothing on the subject yet.
  AsyncPublish create;
  create.expected_last_subject_sequence = 0;
  auto made = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.cas", "v1", create, done); });
  ASSERT_TRUE(made.has_value() && made->ok()) << (made ? made->error().message : "no result");
  auto twice = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.cas", "v1b", create, done); });
  ASSERT_TRUE(twice.has_value());
  ASSERT_FALSE(twice->ok());
  EXPECT_TRUE(twice->error().is_conflict()) << twice->error().message;

  AsyncPublish next;
  next.expected_last_subject_sequence = (*made)->sequence;
  auto updated = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.cas", "v2", next, done); });
  ASSERT_TRUE(updated.has_value() && updated->ok());
  auto stale = await<Result<PubAck>>(
      [&](auto done) { conn_->js_publish_async("async.cas", "v3", next, done); });
  ASSERT_TRUE(stale.has_value());
  ASSERT_FALSE(stale->ok());
  EXPECT_TRUE(stale->error().is_conflict());
}

TEST_F(BusAsync, KvUpdateAsyncCountsDeleteMarkers) {
  auto created = await<Result<uint64_t>>([&](auto done) { kv_->update_async("n1", "a", 0, done); });
  ASSERT_TRUE(created.has_value() && created->ok()) << (created ? created->error().message : "");
  auto conflict =
      await<Result<uint64_t>>([&](auto done) { kv_->update_async("n1", "b", 0, done); });
  ASSERT_TRUE(conflict.has_value());
  EXPECT_TRUE(!conflict->ok() && conflict->error().is_conflict());

  auto rev2 =
      await<Result<uint64_t>>([&](auto done) { kv_->update_async("n1", "b", **created, done); });
  ASSERT_TRUE(rev2.has_value() && rev2->ok());
  auto got = kv_->get("n1");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->value, "b");
  EXPECT_EQ((*got)->revision, **rev2);

  // After a delete, the delete marker's revision is what the next write expects.
  ASSERT_TRUE(kv_->erase("n1").ok());
  auto history = kv_->history("n1");
  ASSERT_TRUE(history.ok() && !history->empty());
  const uint64_t marker = history->back().revision;
  EXPECT_EQ(history->back().op, KvOp::kDelete);
  auto over_old =
      await<Result<uint64_t>>([&](auto done) { kv_->update_async("n1", "c", **rev2, done); });
  ASSERT_TRUE(over_old.has_value());
  EXPECT_TRUE(!over_old->ok() && over_old->error().is_conflict());
  auto over_marker =
      await<Result<uint64_t>>([&](auto done) { kv_->update_async("n1", "c", marker, done); });
  ASSERT_TRUE(over_marker.has_value() && over_marker->ok())
      << (over_marker ? over_marker->error().message : "");
}

TEST_F(BusAsync, LastMessageAsyncReadsDataHeadersAndSequence) {
  auto none = await<Result<std::optional<StreamMessage>>>(
      [&](auto done) { conn_->last_message_async("ASYNC", "async.none", 2s, done); });
  ASSERT_TRUE(none.has_value());
  ASSERT_TRUE(none->ok()) << none->error().message;
  EXPECT_FALSE((*none)->has_value());

  const std::string binary("a\0b\xff\r\n", 6);
  ASSERT_TRUE(conn_->js_publish("async.last", "first").ok());
  auto pub = conn_->js_publish("async.last", binary, "id-7", {{"X-Kind", "test value"}});
  ASSERT_TRUE(pub.ok());
  auto last = await<Result<std::optional<StreamMessage>>>(
      [&](auto done) { conn_->last_message_async("ASYNC", "async.last", 2s, done); });
  ASSERT_TRUE(last.has_value());
  ASSERT_TRUE(last->ok()) << last->error().message;
  ASSERT_TRUE((*last)->has_value());
  const auto& m = ***last;
  EXPECT_EQ(m.message.subject, "async.last");
  EXPECT_EQ(m.message.data, binary);
  EXPECT_EQ(m.stream_sequence, pub->sequence);
  EXPECT_EQ(m.message.headers.at("X-Kind"), "test value");
  EXPECT_EQ(m.message.headers.at("Nats-Msg-Id"), "id-7");

  auto missing_stream = await<Result<std::optional<StreamMessage>>>(
      [&](auto done) { conn_->last_message_async("NO_SUCH_STREAM", "x", 2s, done); });
  ASSERT_TRUE(missing_stream.has_value());
  EXPECT_FALSE(missing_stream->ok()) << "a missing stream is an error, not an empty subject";
}

TEST_F(BusAsync, RequestAsyncRepliesTimesOutAndReportsNoResponders) {
  auto responder = connect();
  ASSERT_TRUE(responder);
  auto sub = responder->subscribe("svc.echo", "", [r = responder.get()](Message m) {
    (void)r->publish(m.reply, "echo:" + m.data);
  });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(responder->flush().ok());

  // Several in flight at once, each answered to its own caller.
  Collector<std::string> replies;
  for (int i = 0; i < 20; ++i) {
    conn_->request_async("svc.echo", std::to_string(i), 2s, [&](Result<Message> r) {
      replies.add(r.ok() ? r->data : "error: " + r.error().message);
    });
  }
  ASSERT_TRUE(replies.wait_for(20));
  const auto items = replies.items();
  std::set<std::string> got(items.begin(), items.end());
  for (int i = 0; i < 20; ++i) EXPECT_TRUE(got.contains("echo:" + std::to_string(i))) << i;

  auto none =
      await<Result<Message>>([&](auto done) { conn_->request_async("svc.nobody", "x", 2s, done); });
  ASSERT_TRUE(none.has_value());
  ASSERT_FALSE(none->ok());
  EXPECT_EQ(none->error().domain, ErrorDomain::kNotFound) << none->error().message;

  auto silent = responder->subscribe("svc.silent", "", [](Message) {});
  ASSERT_TRUE(silent.ok());
  ASSERT_TRUE(responder->flush().ok());
  auto timed_out = await<Result<Message>>(
      [&](auto done) { conn_->request_async("svc.silent", "x", 200ms, done); });
  ASSERT_TRUE(timed_out.has_value());
  ASSERT_FALSE(timed_out->ok());
  EXPECT_EQ(timed_out->error().domain, ErrorDomain::kTimeout) << timed_out->error().message;
}

// A request still waiting when its connection is destroyed: its timer fires later on the executor,
// which outlives the connection, and must neither touch the connection's freed state (a
// heap-use-after-free under ASan before) nor answer twice. Publishes in flight at that moment are
// never answered, and their late acks (if any) are dropped without touching freed state either.
TEST_F(BusAsync, RequestInFlightWhenTheConnectionGoesAwayTimesOutOnce) {
  auto responder = connect();
  ASSERT_TRUE(responder);
  auto silent = responder->subscribe("svc.silent", "", [](Message) {});
  ASSERT_TRUE(silent.ok());
  ASSERT_TRUE(responder->flush().ok());

  auto doomed = connect();
  ASSERT_TRUE(doomed);
  Collector<std::string> answers;
  doomed->request_async("svc.silent", "x", 100ms, [&](Result<Message> r) {
    answers.add(r.ok() ? "reply" : r.error().message);
  });
  auto acks = std::make_shared<std::atomic<int>>(0);
  for (int i = 0; i < 50; ++i) {
    doomed->js_publish_async("async.late", "x", {}, [acks](Result<PubAck>) { ++*acks; });
  }
  doomed.reset();  // the last reference: ~Core closes the connection and releases its async state
  ASSERT_TRUE(answers.wait_for(1, 5s)) << "the request never timed out";
  std::this_thread::sleep_for(300ms);  // time for a second answer, were there one
  ASSERT_EQ(answers.items().size(), 1u);
  EXPECT_NE(answers.items().front(), "reply");
  EXPECT_LE(acks->load(), 50);
}

TEST_F(BusAsync, AckAsyncRemovesTheMessageFromTheConsumer) {
  ASSERT_TRUE(conn_->js_publish("async.work", "job").ok());
  ConsumerConfig cc;
  cc.stream = "ASYNC";
  cc.durable = "worker";
  cc.filter_subject = "async.work";
  cc.ack_wait = 1s;
  Collector<std::string> got;
  auto consumer = conn_->pull_consume(cc, [&](JsMessagePtr m) {
    EXPECT_TRUE(m->ack_async().ok());
    got.add(std::string(m->data()));
  });
  ASSERT_TRUE(consumer.ok());
  ASSERT_TRUE(got.wait_for(1));
  // Acked: no redelivery after ack_wait, and nothing pending on the server.
  ASSERT_TRUE(cvm::test::wait_until(
      [&] {
        auto states = conn_->consumer_states("ASYNC");
        return states.ok() && !states->empty() && states->front().ack_pending == 0;
      },
      5s));
  std::this_thread::sleep_for(1500ms);  // past ack_wait: a lost ack would redeliver by now
  EXPECT_EQ(got.size(), 1u);
  (*consumer)->stop();
}

}  // namespace
}  // namespace cvm::bus::testing
