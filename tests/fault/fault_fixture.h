#pragma once
// What every fault test shares: a private directory, a client connection on its own io thread,
// the services as processes (so kill -9 and SIGSTOP are real), submits that retry with the same
// msg-id, and the ledger check at the end.

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "child_process.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"
#include "durable_nodes.h"
#include "ledger.h"

namespace cvm::fault {

using namespace std::chrono_literals;
inline constexpr uint64_t kMiB = 1ULL << 20;
inline constexpr uint64_t kGiB = 1ULL << 30;

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    work_ = (std::filesystem::temp_directory_path() /
             ("cvm-fault-" + std::string(info->name()) + "-" + std::to_string(getpid())))
                .string();
    std::filesystem::remove_all(work_);
    std::filesystem::create_directories(work_);
    io_thread_ = std::thread([this] {
      auto guard = boost::asio::make_work_guard(io_);
      io_.run();
    });
  }

  void TearDown() override {
    processes_.clear();
    client_.reset();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
    std::error_code ec;
    if (!HasFailure()) std::filesystem::remove_all(work_, ec);
  }

  // Starts `nats` (one server), connects the test's client to it and makes the streams of the
  // wire contract. Call it under ASSERT_NO_FATAL_FAILURE.
  void start_nats(test::NatsServer& nats) {
    ASSERT_TRUE(nats.start().ok());
    connect_client(nats.url());
    ASSERT_TRUE(service::ensure_streams(*client_).ok());
  }

  // The test's own client; `url` may list several servers.
  void connect_client(const std::string& url) {
    auto conn = bus::Connection::connect({.url = url, .name = "fault-test"}, io_.get_executor());
    ASSERT_TRUE(conn.ok()) << conn.error().message;
    client_ = *conn;
  }

  test::ChildProcess& spawn(const std::string& name, std::vector<std::string> argv) {
    const std::string log = work_ + "/" + name + "-" + std::to_string(++spawned_) + ".log";
    processes_.push_back(std::make_unique<test::ChildProcess>(std::move(argv), log));
    return *processes_.back();
  }
  test::ChildProcess& start_scheduler(const std::string& url, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {CVM_SCHEDULER_BIN, "--nats-url", url, "--metrics-listen",
                                     "off"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return spawn("scheduler", argv);
  }
  test::ChildProcess& start_broker(const std::string& url) {
    return spawn("broker", {CVM_BROKER_BIN, "--nats-url", url, "--metrics-listen", "off"});
  }

  // Until the scheduler fetches from CVM_BUILDS and the broker answers a reserve: a fault while a
  // service is still starting is a different test (see docs/reliability.md, item 2).
  void wait_services_ready(bool broker = true) {
    ASSERT_TRUE(test::wait_until(
        [&] {
          auto cs = client_->consumer_states(std::string(wire::kStreamBuilds));
          if (!cs.ok()) return false;
          for (const auto& c : *cs) {
            if (c.name == wire::kSchedulerDurable && c.waiting > 0) return true;
          }
          return false;
        },
        60s, 100ms))
        << "the scheduler never fetched" << logs();
    if (!broker) return;
    ASSERT_TRUE(broker_answers(60s)) << "the broker never answered" << logs();
  }

  // Whether the broker answers a reserve (with a refusal: the node is unknown) within `patience`.
  bool broker_answers(std::chrono::milliseconds patience) {
    cvm::v1::GpuReserveRequest probe;
    probe.set_node_id("no-such-node");
    probe.set_count(1);
    probe.set_workspace_id("probe");
    probe.set_build_id("probe");
    return test::wait_until(
        [&] {
          return client_->request(std::string(wire::kGpuReserve), probe.SerializeAsString(), 500ms)
              .ok();
        },
        patience, 100ms);
  }

  static cvm::v1::BuildRequest request(const std::string& build, uint64_t cpu = 500,
                                       uint64_t mem = 512 * kMiB, uint32_t gpus = 0) {
    cvm::v1::BuildRequest r;
    r.set_build_id(build);
    r.set_workspace_id("ws-" + build);
    r.set_image("oci:/images/busybox:latest");
    r.set_transition(cvm::v1::START);
    r.mutable_resources()->set_cpu_millicores(cpu);
    r.mutable_resources()->set_memory_bytes(mem);
    if (gpus > 0) r.mutable_resources()->mutable_gpu()->set_count(gpus);
    return r;
  }

  // Publishes to CVM_BUILDS until JetStream acknowledges it, always with the build id as the
  // msg-id, so a retry after a lost ack is dropped by the server instead of stored twice.
  bool submit(const cvm::v1::BuildRequest& r, std::chrono::milliseconds patience = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + patience;
    while (std::chrono::steady_clock::now() < deadline) {
      auto ack = client_->js_publish(std::string(wire::kBuildsSubmit), r.SerializeAsString(),
                                     r.build_id(), {}, 2s);
      if (ack) {
        if (ack->duplicate) ++duplicates_;
        return true;
      }
      ++submit_retries_;
      std::this_thread::sleep_for(100ms);
    }
    return false;
  }

  // A burst on its own thread: builds <prefix>-<i>, every `gpu_every`-th asking for one GPU.
  struct Burst {
    std::thread thread;
    std::atomic<int> submitted{0};
    std::mutex mu;
    std::vector<std::string> acknowledged;
    std::vector<std::string> refused;
    ~Burst() {
      if (thread.joinable()) thread.join();
    }
  };
  std::unique_ptr<Burst> burst(const std::string& prefix, int n, int gpu_every = 0,
                               uint64_t cpu = 500, uint64_t mem = 512 * kMiB) {
    auto b = std::make_unique<Burst>();
    Burst* raw = b.get();
    b->thread = std::thread([this, raw, prefix, n, gpu_every, cpu, mem] {
      for (int i = 0; i < n; ++i) {
        const std::string id = prefix + "-" + std::to_string(i);
        const uint32_t gpus = gpu_every > 0 && i % gpu_every == 0 ? 1 : 0;
        const bool ok = submit(request(id, cpu, mem, gpus));
        {
          std::lock_guard lock(raw->mu);
          (ok ? raw->acknowledged : raw->refused).push_back(id);
        }
        ++raw->submitted;
      }
    });
    return b;
  }

  // Runs the ledger check and fails the test with every broken promise.
  LedgerReport expect_ledger(const LedgerOptions& options) {
    auto report = check_ledger(*client_, options);
    EXPECT_TRUE(report.ok()) << report.error().message;
    if (!report.ok()) return {};
    EXPECT_TRUE(report->problems.empty()) << report->summary();
    std::printf("ledger: %s\n", report->summary().c_str());
    return *report;
  }

  // The end of a burst over durable nodes: every submit acknowledged (retried with its msg-id
  // through the fault), the ledger clean, and every build launched exactly once, by name. One
  // terminal event each is not enough here: a build FAILED on a transient error of the bus is
  // lost work too.
  void expect_burst_ran_once(Burst& b, DurableNodes& nodes, const std::string& more_logs = "") {
    b.thread.join();
    const size_t n = b.acknowledged.size() + b.refused.size();
    EXPECT_TRUE(b.refused.empty()) << b.refused.size() << " submits never acknowledged";
    LedgerOptions lo;
    lo.acknowledged_builds = b.acknowledged;
    lo.timeout = 120s;
    lo.sim_over_capacity = nodes.over_capacity();
    lo.sim_launched_twice = nodes.launched_twice();
    const auto report = expect_ledger(lo);
    const auto launched = nodes.launched_builds();
    std::string not_launched;
    for (const auto& id : b.acknowledged) {
      if (launched.contains(id)) continue;
      const auto w = report.terminal_words.find(id);
      not_launched +=
          "\n  " + id + ": " + (w == report.terminal_words.end() ? "no terminal event" : w->second);
    }
    EXPECT_EQ(nodes.launched(), n)
        << "each build launched once; not launched:" << not_launched << logs() << more_logs;
    std::printf("submit retries %d, duplicates dropped by the server %d\n", submit_retries_.load(),
                duplicates_.load());
  }

  std::string logs(size_t bytes = 3000) const {
    std::string out;
    for (const auto& p : processes_) out += "\n--- " + p->log_path() + "\n" + p->log_tail(bytes);
    return out;
  }

  std::string work_;
  boost::asio::io_context io_;
  std::thread io_thread_;
  bus::ConnectionPtr client_;
  std::vector<std::unique_ptr<test::ChildProcess>> processes_;
  int spawned_ = 0;
  std::atomic<int> duplicates_{0};
  std::atomic<int> submit_retries_{0};
};

}  // namespace cvm::fault
