// Core NATS through the adapter: executor hops, request-reply, error mapping, connect modes.

#include <nats/nats.h>

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

using BusCore = BusFixture;

TEST(BusErrors, MapsStatusesToDomains) {
  EXPECT_EQ(nats_error(NATS_TIMEOUT, "x").domain, ErrorDomain::kTimeout);
  EXPECT_EQ(nats_error(NATS_NO_RESPONDERS, "x").domain, ErrorDomain::kNotFound);
  EXPECT_EQ(nats_error(NATS_NOT_FOUND, "x").domain, ErrorDomain::kNotFound);
  EXPECT_EQ(nats_error(NATS_ERR, "x", JSStreamWrongLastSequenceErr).domain, ErrorDomain::kConflict);
  EXPECT_EQ(nats_error(NATS_ERR, "x", JSStreamNotFoundErr).domain, ErrorDomain::kNotFound);
  const Error e = nats_error(NATS_CONNECTION_CLOSED, "publish to a.b");
  EXPECT_EQ(e.domain, ErrorDomain::kNats);
  EXPECT_EQ(e.code, NATS_CONNECTION_CLOSED);
  EXPECT_NE(e.message.find("publish to a.b"), std::string::npos) << e.message;
  EXPECT_NE(e.message.find("Connection Closed"), std::string::npos) << e.message;
}

TEST_F(BusCore, SubscribeHandlerRunsOnExecutorThread) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  Collector<Message> got;
  std::atomic<bool> on_executor{false};
  auto sub = conn->subscribe("test.hop", "", [&](Message m) {
    on_executor = on_io_thread();
    got.add(std::move(m));
  });
  ASSERT_TRUE(sub.ok()) << sub.error().message;
  ASSERT_TRUE(conn->flush().ok());

  ASSERT_TRUE(conn->publish("test.hop", "hello", {{"X-Trace", "abc"}}).ok());
  ASSERT_TRUE(got.wait_for(1));
  const Message m = got.at(0);
  EXPECT_TRUE(on_executor);
  EXPECT_EQ(m.subject, "test.hop");
  EXPECT_EQ(m.data, "hello");
  EXPECT_EQ(m.headers.at("X-Trace"), "abc");
  EXPECT_TRUE(conn->connected());
}

TEST_F(BusCore, QueueSubscribersShareMessages) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  Collector<int> got;
  auto a = conn->subscribe("test.q", "workers", [&](Message) { got.add(1); });
  auto b = conn->subscribe("test.q", "workers", [&](Message) { got.add(2); });
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(conn->flush().ok());
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(conn->publish("test.q", "x").ok());
  ASSERT_TRUE(got.wait_for(20));
  ASSERT_TRUE(conn->flush().ok());
  EXPECT_FALSE(got.wait_for(21, 100ms)) << "each message goes to one queue member only";
}

TEST_F(BusCore, UnsubscribeStopsDelivery) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  Collector<std::string> got;
  auto sub = conn->subscribe("test.unsub", "", [&](Message m) { got.add(m.data); });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(conn->flush().ok());
  ASSERT_TRUE(conn->publish("test.unsub", "1").ok());
  ASSERT_TRUE(got.wait_for(1));
  sub->unsubscribe();
  ASSERT_TRUE(conn->publish("test.unsub", "2").ok());
  ASSERT_TRUE(conn->flush().ok());
  EXPECT_FALSE(got.wait_for(2, 200ms));
}

TEST_F(BusCore, RequestReply) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  auto sub = conn->subscribe("svc.echo", "", [conn_ptr = conn.get()](Message m) {
    static_cast<void>(conn_ptr->publish(m.reply, "re:" + m.data));
  });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(conn->flush().ok());
  auto reply = conn->request("svc.echo", "ping", 2s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ(reply->data, "re:ping");
}

TEST_F(BusCore, RequestWithoutRespondersIsNotFound) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  auto reply = conn->request("nobody.home", "x", 2s);
  ASSERT_FALSE(reply.ok());
  EXPECT_TRUE(reply.error().is_not_found()) << reply.error().message;
}

TEST_F(BusCore, RequestTimesOut) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  auto sub = conn->subscribe("svc.silent", "", [](Message) {});
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(conn->flush().ok());
  auto reply = conn->request("svc.silent", "x", 200ms);
  ASSERT_FALSE(reply.ok());
  EXPECT_TRUE(reply.error().is_timeout()) << reply.error().message;
}

TEST_F(BusCore, SubscriptionMayOutliveConnection) {
  auto conn = connect();
  ASSERT_TRUE(conn);
  auto sub = conn->subscribe("test.outlive", "", [](Message) {});
  ASSERT_TRUE(sub.ok());
  conn.reset();
  sub->unsubscribe();  // must not crash or leak once the connection is closed
  SUCCEED();
}

TEST_F(BusCore, ClosedCallbackRunsOnExecutor) {
  auto o = options();
  std::atomic<bool> closed_on_executor{false};
  o.on_closed = [&] { closed_on_executor = on_io_thread(); };
  auto conn = connect(o);
  ASSERT_TRUE(conn);
  conn.reset();
  EXPECT_TRUE(cvm::test::wait_until([&] { return closed_on_executor.load(); }, 5s));
}

TEST_F(BusCore, ConnectWithoutRetryFailsWhenNoServer) {
  auto o = options();
  o.url = "nats://127.0.0.1:" + std::to_string(cvm::test::free_port());
  o.retry_on_failed_connect = false;
  o.connect_timeout = 500ms;
  auto conn = Connection::connect(o, io_.get_executor());
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.error().domain, ErrorDomain::kNats) << conn.error().message;
  EXPECT_NE(conn.error().message.find("connect to"), std::string::npos);
}

TEST_F(BusCore, RetryOnFailedConnectConnectsWhenServerComesUp) {
  cvm::test::NatsServer late;
  auto o = options();
  o.url = late.url();
  std::atomic<bool> connected{false};
  o.on_connected = [&] { connected = on_io_thread(); };
  auto conn = connect(o);
  ASSERT_TRUE(conn);
  EXPECT_FALSE(conn->connected());
  ASSERT_TRUE(late.start().ok());
  EXPECT_TRUE(cvm::test::wait_until([&] { return connected.load(); }, 10s));
  EXPECT_TRUE(conn->connected());
  EXPECT_TRUE(conn->publish("late.ok", "x").ok());
}

TEST_F(BusCore, ConnectionToNeverStartedServerClosesCleanly) {
  auto o = options();
  o.url = "nats://127.0.0.1:" + std::to_string(cvm::test::free_port());
  auto conn = connect(o);
  ASSERT_TRUE(conn);
  EXPECT_FALSE(conn->connected());
  const auto start = std::chrono::steady_clock::now();
  conn.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
}

}  // namespace
}  // namespace cvm::bus::testing
