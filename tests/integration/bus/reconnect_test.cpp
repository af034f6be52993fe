// The adapter across a NATS crash: callbacks fire, and publish, KV and consumers recover.

#include <nats/nats.h>

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

using BusReconnect = BusFixture;

TEST_F(BusReconnect, RecoversAfterServerRestartOnSamePort) {
  std::atomic<int> disconnected{0};
  std::atomic<int> reconnected{0};
  std::atomic<bool> callbacks_on_executor{true};
  auto o = options();
  o.on_disconnected = [&] {
    if (!on_io_thread()) callbacks_on_executor = false;
    ++disconnected;
  };
  o.on_reconnected = [&] {
    if (!on_io_thread()) callbacks_on_executor = false;
    ++reconnected;
  };
  auto conn = connect(o);
  ASSERT_TRUE(conn);

  make_stream(conn, "JOBS", "jobs.>");
  ASSERT_FALSE(HasFatalFailure());
  auto kv = conn->ensure_kv(KvConfig{.bucket = "state"});
  ASSERT_TRUE(kv.ok()) << kv.error().message;
  ASSERT_TRUE(kv->put("k", "before").ok());

  Collector<std::string> got;
  ConsumerConfig cc;
  cc.stream = "JOBS";
  cc.durable = "jobs";
  auto consumer = conn->pull_consume(cc, [&](JsMessagePtr m) {
    static_cast<void>(m->ack());
    got.add(std::string(m->data()));
  });
  ASSERT_TRUE(consumer.ok()) << consumer.error().message;
  ASSERT_TRUE(conn->js_publish("jobs.1", "before").ok());
  ASSERT_TRUE(got.wait_for(1));

  server_.kill();
  ASSERT_TRUE(cvm::test::wait_until([&] { return disconnected.load() > 0; }, 5s));
  EXPECT_FALSE(conn->connected());
  auto restarted = server_.start();
  ASSERT_TRUE(restarted.ok()) << restarted.error().message;
  ASSERT_TRUE(cvm::test::wait_until([&] { return reconnected.load() > 0; }, 10s));
  EXPECT_TRUE(callbacks_on_executor);

  // JetStream may need a moment after the restart to accept API calls again.
  ASSERT_TRUE(cvm::test::wait_until([&] { return kv->put("k", "after").ok(); }, 10s, 50ms));
  auto value = kv->get("k");
  ASSERT_TRUE(value.ok()) << value.error().message;
  ASSERT_TRUE(value->has_value());
  EXPECT_EQ((*value)->value, "after");

  auto ack = conn->js_publish("jobs.2", "after");
  ASSERT_TRUE(ack.ok()) << ack.error().message;
  EXPECT_EQ(ack->sequence, 2u) << "the stream kept its data across the restart";
  EXPECT_TRUE(got.wait_for(2, 10s)) << "the pull consumer resumed";
  EXPECT_EQ(got.items().back(), "after");

  Collector<Message> core;
  auto sub = conn->subscribe("after.restart", "", [&](Message m) { core.add(std::move(m)); });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(conn->flush().ok());
  ASSERT_TRUE(conn->publish("after.restart", "x").ok());
  EXPECT_TRUE(core.wait_for(1));
}

TEST_F(BusReconnect, ConsumerSurvivesServerShutdownAndStopsPromptly) {
  Collector<Error> errors;
  std::atomic<bool> off_executor{false};
  auto conn = connect(recording_errors(errors, off_executor));
  ASSERT_TRUE(conn);
  make_stream(conn, "JOBS", "jobs.>");
  ASSERT_FALSE(HasFatalFailure());
  ConsumerConfig cc;
  cc.stream = "JOBS";
  cc.durable = "jobs";
  auto consumer = conn->pull_consume(cc, [](JsMessagePtr) {});
  ASSERT_TRUE(consumer.ok());
  server_.stop();
  // A graceful shutdown may fail the pending fetch ("Server Shutdown"), or the fetch just times
  // out while the connection reconnects: which one is a race. Either way the loop must neither
  // crash nor block shutdown, and what it reports arrives on the executor.
  static_cast<void>(errors.wait_for(1, 700ms));
  for (const auto& e : errors.items()) {
    EXPECT_NE(e.message.find("fetch from consumer JOBS/jobs"), std::string::npos) << e.message;
  }
  EXPECT_FALSE(off_executor);
  const auto start = std::chrono::steady_clock::now();
  consumer->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

}  // namespace
}  // namespace cvm::bus::testing

namespace cvm::bus::testing {
namespace {

// A durable deleted underneath a running consumer (by an operator, or lost with a server's
// store) makes fetches time out silently: the consumer must notice, say so on the executor, and
// put the durable back so work flows again.
TEST_F(BusReconnect, ConsumerRestoresDeletedDurable) {
  Collector<Error> errors;
  std::atomic<bool> off_executor{false};
  auto conn = connect(recording_errors(errors, off_executor));
  ASSERT_TRUE(conn);
  make_stream(conn, "JOBS", "jobs.>");
  ASSERT_FALSE(HasFatalFailure());
  ConsumerConfig cc;
  cc.stream = "JOBS";
  cc.durable = "doomed";
  Collector<std::string> got;
  auto consumer = conn->pull_consume(cc, [&](JsMessagePtr m) {
    static_cast<void>(m->ack());
    got.add(std::string(m->data()));
  });
  ASSERT_TRUE(consumer.ok());

  // Straight cnats: the adapter deliberately has no "delete consumer".
  natsConnection* nc = nullptr;
  ASSERT_EQ(natsConnection_ConnectTo(&nc, server_.url().c_str()), NATS_OK);
  jsCtx* js = nullptr;
  ASSERT_EQ(natsConnection_JetStream(&js, nc, nullptr), NATS_OK);
  EXPECT_EQ(js_DeleteConsumer(js, "JOBS", "doomed", nullptr, nullptr), NATS_OK);
  jsCtx_Destroy(js);
  natsConnection_Destroy(nc);

  ASSERT_TRUE(errors.wait_for(1, 5s));
  EXPECT_NE(errors.at(0).message.find("JOBS/doomed"), std::string::npos) << errors.at(0).message;
  EXPECT_FALSE(off_executor);
  ASSERT_TRUE(conn->js_publish("jobs.1", "after delete").ok());
  ASSERT_TRUE(got.wait_for(1, 6s)) << "the durable was not restored";
  EXPECT_EQ(got.at(0), "after delete");
  const auto start = std::chrono::steady_clock::now();
  consumer->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

}  // namespace
}  // namespace cvm::bus::testing
