#pragma once
// A real nats-server plus an io_context on its own thread: the executor the adapter posts to.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/bus/bus.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"

namespace cvm::bus::testing {

using namespace std::chrono_literals;

// Thread-safe record of what handlers saw, with bounded waits.
template <class T>
class Collector {
 public:
  void add(T value) {
    std::lock_guard lock(mu_);
    items_.push_back(std::move(value));
    cv_.notify_all();
  }
  // True once at least n items arrived within the timeout.
  bool wait_for(size_t n, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return items_.size() >= n; });
  }
  std::vector<T> items() const {
    std::lock_guard lock(mu_);
    return items_;
  }
  size_t size() const {
    std::lock_guard lock(mu_);
    return items_.size();
  }
  T at(size_t i) const {
    std::lock_guard lock(mu_);
    return items_.at(i);
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<T> items_;
};

class BusFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    io_thread_ = std::thread([this] { io_.run(); });
    io_thread_id_ = io_thread_.get_id();
    auto started = server_.start();
    ASSERT_TRUE(started.ok()) << started.error().message;
  }

  void TearDown() override {
    // Connections made by the test body are gone by now; let their last posts run, then stop.
    work_.reset();
    io_thread_.join();
  }

  ConnectOptions options() const {
    ConnectOptions o;
    o.url = server_.url();
    o.name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    o.reconnect_wait = 100ms;
    return o;
  }

  ConnectionPtr connect(const ConnectOptions& o) {
    auto conn = Connection::connect(o, io_.get_executor());
    EXPECT_TRUE(conn.ok()) << conn.error().message;
    return conn.ok() ? *conn : nullptr;
  }
  ConnectionPtr connect() { return connect(options()); }

  [[nodiscard]] bool on_io_thread() const { return std::this_thread::get_id() == io_thread_id_; }

  // Options whose error callback records each error and notes one that arrived off the executor
  // (every callback of the adapter must run on it).
  ConnectOptions recording_errors(Collector<Error>& errors, std::atomic<bool>& off_executor) const {
    auto o = options();
    o.on_error = [this, &errors, &off_executor](const Error& e) {
      if (!on_io_thread()) off_executor = true;
      errors.add(e);
    };
    return o;
  }

  // A stream or bucket the test needs; a failure fails the test (check HasFatalFailure()).
  static void make_stream(const ConnectionPtr& conn, const std::string& name,
                          const std::string& subjects) {
    StreamConfig config;
    config.name = name;
    config.subjects = {subjects};
    auto s = conn->ensure_stream(config);
    ASSERT_TRUE(s.ok()) << s.error().message;
  }
  static void make_kv(const ConnectionPtr& conn, const std::string& bucket,
                      std::optional<KeyValue>& out, int history = 5) {
    KvConfig config;
    config.bucket = bucket;
    config.history = history;
    auto kv = conn->ensure_kv(config);
    ASSERT_TRUE(kv.ok()) << kv.error().message;
    out.emplace(std::move(*kv));
  }

  // Declared first: destroyed last, after everything that may post to it.
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{
      boost::asio::make_work_guard(io_)};
  std::thread io_thread_;
  std::thread::id io_thread_id_;
  cvm::test::NatsServer server_;
};

}  // namespace cvm::bus::testing
