// `cvmctl dead-letters` against a real nats-server: the server itself writes the advisories into
// CVM_DEAD_LETTERS (one request terminated, as the scheduler does on its last delivery; one
// delivered MaxDeliver times and naked, which leaves it in the work queue), and the command lists
// both, with the build where the request is still stored.
#include <gtest/gtest.h>

#include <sstream>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/cli/commands.h"
#include "cvm/service/streams.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/build.pb.h"

namespace cvm::cli {
namespace {

using namespace std::chrono_literals;

class DeadLetters : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.start().ok());
    io_thread_ = std::thread([this] {
      auto guard = boost::asio::make_work_guard(io_);
      io_.run();
    });
    auto conn = bus::Connection::connect({.url = nats_.url(), .name = "dead-letters-test"},
                                         io_.get_executor());
    ASSERT_TRUE(conn.ok()) << conn.error().message;
    conn_ = *conn;
    global_.nats_url = nats_.url();
  }
  void TearDown() override {
    conn_.reset();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
  }

  struct Output {
    int rc;
    std::string out;
    std::string err;
  };
  Output run(uint64_t limit = 20) {
    std::ostringstream out, err;
    const int rc = dead_letters_command(global_, limit, out, err);
    return {rc, out.str(), err.str()};
  }

  void submit(const std::string& build) {
    cvm::v1::BuildRequest r;
    r.set_build_id(build);
    r.set_workspace_id("ws-" + build);
    r.set_image("oci:/images/busybox:latest");
    r.set_transition(cvm::v1::START);
    auto ack = conn_->js_publish(std::string(wire::kBuildsSubmit), r.SerializeAsString(), build);
    ASSERT_TRUE(ack.ok()) << ack.error().message;
  }

  uint64_t dead_letters() {
    auto st = conn_->stream_state(std::string(service::kStreamDeadLetters));
    return st.ok() ? st->messages : 0;
  }

  test::NatsServer nats_;
  boost::asio::io_context io_;
  std::thread io_thread_;
  bus::ConnectionPtr conn_;
  GlobalOptions global_;
};

TEST_F(DeadLetters, ListsTerminatedAndMaxDeliveredRequestsWithTheBuildWhenStillStored) {
  // Before the scheduler ever ran there is no stream: say so, as "unavailable".
  auto none = run();
  EXPECT_EQ(none.rc, kExitUnavailable);
  EXPECT_NE(none.err.find("no CVM_DEAD_LETTERS stream"), std::string::npos) << none.err;

  ASSERT_TRUE(service::ensure_streams(*conn_).ok());
  ASSERT_TRUE(conn_->ensure_stream(service::dead_letters_stream()).ok());
  auto empty = run();
  EXPECT_EQ(empty.rc, kExitOk) << empty.err;
  EXPECT_NE(empty.out.find("no dead letters"), std::string::npos) << empty.out;

  submit("b-termed");  // CVM_BUILDS seq 1
  submit("b-kept");    // seq 2
  // A consumer on CVM_BUILDS as the scheduler's (filtered on the submit subject, one delivery
  // at most): term the first request, nak the second.
  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamBuilds);
  cc.durable = "dead-letters-test";
  cc.max_deliver = 1;
  cc.ack_wait = 2s;
  auto consumer = conn_->pull_consume(cc, [](bus::JsMessagePtr m) {
    cvm::v1::BuildRequest r;
    ASSERT_TRUE(r.ParseFromString(std::string(m->data())));
    if (r.build_id() == "b-termed") {
      EXPECT_TRUE(m->term().ok());
    } else {
      EXPECT_TRUE(m->nak().ok());
    }
  });
  ASSERT_TRUE(consumer.ok()) << consumer.error().message;
  ASSERT_TRUE(test::wait_until([&] { return dead_letters() >= 2; }, 30s))
      << "the server stored " << dead_letters() << " advisories";
  consumer->reset();

  auto both = run();
  ASSERT_EQ(both.rc, kExitOk) << both.err;
  EXPECT_EQ(both.err, "");
  std::printf("%s", both.out.c_str());
  EXPECT_NE(both.out.find("terminated"), std::string::npos) << both.out;
  EXPECT_NE(both.out.find("max_deliveries"), std::string::npos) << both.out;
  // The naked request stays in the work queue: its build is named. The termed one is gone.
  EXPECT_NE(both.out.find("b-kept (workspace ws-b-kept)"), std::string::npos) << both.out;
  EXPECT_EQ(both.out.find("b-termed"), std::string::npos) << both.out;
  EXPECT_NE(both.out.find("(request removed)"), std::string::npos) << both.out;

  // --limit keeps the newest.
  auto newest = run(1);
  ASSERT_EQ(newest.rc, kExitOk) << newest.err;
  size_t rows = 0;
  for (size_t at = newest.out.find("CVM_BUILDS"); at != std::string::npos;
       at = newest.out.find("CVM_BUILDS", at + 1)) {
    ++rows;
  }
  EXPECT_EQ(rows, 1u) << newest.out;

  global_.output = "json";
  auto json = run(0);
  ASSERT_EQ(json.rc, kExitOk) << json.err;
  EXPECT_NE(json.out.find(R"("stream_sequence":1)"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find(R"("stream_sequence":2)"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find(R"("build_id":"b-kept")"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find(R"("deliveries":1)"), std::string::npos) << json.out;
}

TEST_F(DeadLetters, AJunkRecordIsSkippedWithAWord) {
  ASSERT_TRUE(service::ensure_streams(*conn_).ok());
  ASSERT_TRUE(conn_->ensure_stream(service::dead_letters_stream()).ok());
  // Anyone allowed to publish on the advisory subject can put junk there: it must not stop the
  // listing.
  auto ack = conn_->js_publish("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.CVM_BUILDS.x",
                               "not an advisory", "", {}, 2s);
  ASSERT_TRUE(ack.ok()) << ack.error().message;
  auto r = run();
  EXPECT_EQ(r.rc, kExitOk);
  EXPECT_NE(r.err.find("skipping CVM_DEAD_LETTERS 1"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace cvm::cli
