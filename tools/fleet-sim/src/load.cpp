#include "cvm/fleetsim/load.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"

namespace cvm::fleetsim {

namespace {

using Steady = std::chrono::steady_clock;

// An io_context on its own thread, for the connections the load side owns.
class IoThread {
 public:
  explicit IoThread(const char* name)
      : guard_(boost::asio::make_work_guard(io_)), thread_([this, name] {
          pthread_setname_np(pthread_self(), name);
          io_.run();
        }) {}
  ~IoThread() {
    guard_.reset();
    io_.stop();
    thread_.join();
  }
  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;
  boost::asio::io_context& io() { return io_; }

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_;
  std::thread thread_;
};

}  // namespace

Percentiles percentiles(std::vector<double> micros) {
  Percentiles p;
  p.samples = micros.size();
  if (micros.empty()) return p;
  std::sort(micros.begin(), micros.end());
  auto at = [&](double q) {
    const auto i = static_cast<size_t>(q * static_cast<double>(micros.size() - 1) + 0.5);
    return micros[std::min(i, micros.size() - 1)];
  };
  p.p50_us = at(0.50);
  p.p90_us = at(0.90);
  p.p99_us = at(0.99);
  p.max_us = micros.back();
  return p;
}

Result<Percentiles> measure_request_reply(const std::string& nats_url, int samples,
                                          std::chrono::microseconds pace,
                                          const std::atomic<bool>* stop) {
  IoThread responder_io("rtt-echo");
  IoThread client_io("rtt-client");
  auto responder = bus::Connection::connect({.url = nats_url, .name = "rtt-echo"},
                                            responder_io.io().get_executor());
  if (!responder) return responder.error();
  auto client = bus::Connection::connect({.url = nats_url, .name = "rtt-client"},
                                         client_io.io().get_executor());
  if (!client) return client.error();
  auto conn = *responder;
  auto sub = conn->subscribe("cvm.bench.echo", "", [conn](bus::Message m) {
    if (!m.reply.empty()) (void)conn->publish(m.reply, m.data);
  });
  if (!sub) return sub.error();
  if (auto st = conn->flush(); !st) return st.error();
  const std::string payload(200, 'x');  // about a BuildRequest's size
  std::vector<double> micros;
  micros.reserve(static_cast<size_t>(samples));
  auto next = Steady::now();
  for (int i = 0; i < samples + 100; ++i) {
    if (stop != nullptr && stop->load()) break;
    if (pace.count() > 0) {
      next += pace;
      std::this_thread::sleep_until(next);
    }
    const auto t0 = Steady::now();
    auto r = (*client)->request("cvm.bench.echo", payload, std::chrono::seconds(2));
    const auto t1 = Steady::now();
    if (!r) return r.error();
    if (i >= 100) {  // the first hundred warm up the connections
      micros.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
  }
  return percentiles(std::move(micros));
}

Result<LoadReport> run_load(const LoadConfig& config) {
  IoThread events_io("load-events");
  IoThread submit_io("load-submit");
  auto events_conn = bus::Connection::connect({.url = config.nats_url, .name = "load-events"},
                                              events_io.io().get_executor());
  if (!events_conn) return events_conn.error();
  auto submit_conn = bus::Connection::connect({.url = config.nats_url, .name = "load-submit"},
                                              submit_io.io().get_executor());
  if (!submit_conn) return submit_conn.error();
  if (auto st = service::ensure_streams(**submit_conn); !st) return st.error();

  std::mutex mu;
  std::condition_variable cv;
  std::unordered_map<std::string, Steady::time_point> submitted_at;
  std::unordered_set<std::string> decided;
  std::vector<double> latencies;
  LoadReport report;
  Steady::time_point last_decision{};
  const std::string prefix = config.prefix + "-b";
  int acked = 0;
  std::optional<Error> submit_error;

  // Core subscription: the first SCHEDULED or FAILED of each build decides it.
  auto sub =
      (*events_conn)->subscribe(std::string(wire::kBuildEventsWildcard), "", [&](bus::Message m) {
        cvm::v1::BuildEvent e;
        if (!e.ParseFromString(m.data) || !e.build_id().starts_with(prefix)) return;
        if (e.phase() != cvm::v1::SCHEDULED && e.phase() != cvm::v1::FAILED) return;
        const auto now = Steady::now();
        std::lock_guard lock(mu);
        if (!decided.insert(e.build_id()).second) return;
        auto it = submitted_at.find(e.build_id());
        if (e.phase() == cvm::v1::SCHEDULED) {
          ++report.scheduled;
          if (it != submitted_at.end()) {
            latencies.push_back(
                std::chrono::duration<double, std::micro>(now - it->second).count());
          }
        } else {
          ++report.failed;
          ++report.failure_reasons[cvm::v1::Reason_Name(e.reason())];
        }
        last_decision = now;
        cv.notify_all();
      });
  if (!sub) return sub.error();
  if (auto st = (*events_conn)->flush(); !st) return st.error();

  const auto start = Steady::now();
  const auto interval = config.rate_per_s > 0
                            ? std::chrono::duration<double>(1.0 / config.rate_per_s)
                            : std::chrono::duration<double>(0);
  for (int i = 0; i < config.requests; ++i) {
    if (config.rate_per_s > 0) {
      // Open loop: request i goes out at start + i/rate whatever happened to the others, so a
      // slow scheduler shows up as latency rather than as a slower offered load.
      std::this_thread::sleep_until(
          start + std::chrono::duration_cast<Steady::duration>(interval * static_cast<double>(i)));
    }
    if (config.window > 0) {
      std::unique_lock lock(mu);
      const bool room = cv.wait_for(lock, config.timeout, [&] {
        return static_cast<int>(submitted_at.size() - decided.size()) < config.window;
      });
      if (!room) break;
    }
    cvm::v1::BuildRequest r;
    r.set_build_id(prefix + std::to_string(i));
    r.set_workspace_id(config.prefix + "-w" + std::to_string(i));
    r.set_owner("fleet-sim");
    r.set_image("oci:/images/busybox:latest");
    r.set_transition(cvm::v1::START);
    r.mutable_resources()->set_cpu_millicores(config.cpu_millicores);
    r.mutable_resources()->set_memory_bytes(config.memory_bytes);
    if (config.gpu_every > 0 && i % config.gpu_every == 0) {
      r.mutable_resources()->mutable_gpu()->set_count(1);
      r.set_use_cvm(true);
    }
    {
      std::lock_guard lock(mu);
      submitted_at[r.build_id()] = Steady::now();
    }
    // Asynchronous, as many clients submitting at once would: a blocking publish would cap the
    // offered rate at one per round trip and make the load generator the bottleneck.
    bus::AsyncPublish opts;
    opts.msg_id = r.build_id();
    (*submit_conn)
        ->js_publish_async(std::string(wire::kBuildsSubmit), r.SerializeAsString(), opts,
                           [&](Result<bus::PubAck> ack) {
                             std::lock_guard lock(mu);
                             ++acked;
                             if (!ack && !submit_error) submit_error = ack.error();
                             cv.notify_all();
                           });
    ++report.submitted;
  }
  {
    std::unique_lock lock(mu);
    report.submit_seconds = std::chrono::duration<double>(Steady::now() - start).count();
    cv.wait_for(lock, config.timeout, [&] { return acked >= report.submitted; });
    if (submit_error) return *submit_error;
  }
  {
    std::unique_lock lock(mu);
    cv.wait_for(lock, config.timeout,
                [&] { return static_cast<int>(decided.size()) >= report.submitted; });
    report.undecided = report.submitted - static_cast<int>(decided.size());
    report.seconds =
        std::chrono::duration<double>(
            (last_decision == Steady::time_point{} ? Steady::now() : last_decision) - start)
            .count();
    const double decisions = report.scheduled + report.failed;
    report.decisions_per_s = report.seconds > 0 ? decisions / report.seconds : 0;
    report.scheduled_per_s = report.seconds > 0 ? report.scheduled / report.seconds : 0;
    report.submit_to_scheduled = percentiles(latencies);
  }
  sub->unsubscribe();
  return report;
}

Result<EventAudit> audit_events(const std::string& nats_url,
                                const std::vector<std::string>& build_ids,
                                std::chrono::milliseconds quiet,
                                std::chrono::milliseconds timeout) {
  IoThread io("audit");
  auto conn =
      bus::Connection::connect({.url = nats_url, .name = "event-audit"}, io.io().get_executor());
  if (!conn) return conn.error();
  std::mutex mu;
  std::condition_variable cv;
  EventAudit audit;
  std::unordered_set<std::string> wanted(build_ids.begin(), build_ids.end());
  std::unordered_set<std::string> seen;
  std::unordered_set<std::string> ended;
  auto last_event = Steady::now();

  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamEvents);
  cc.durable = "audit-" + std::to_string(Steady::now().time_since_epoch().count());
  cc.max_ack_pending = 10000;
  auto consumer = (*conn)->pull_consume(
      cc,
      [&](bus::JsMessagePtr m) {
        cvm::v1::BuildEvent e;
        const bool ok = e.ParseFromArray(m->data().data(), static_cast<int>(m->data().size()));
        (void)m->ack_async();
        std::lock_guard lock(mu);
        ++audit.events;
        last_event = Steady::now();
        if (!ok) return;
        seen.insert(e.build_id());
        if (is_terminal_phase(e.phase())) {
          ++audit.terminal[e.build_id()];
          if (wanted.contains(e.build_id())) ended.insert(e.build_id());
        }
        cv.notify_all();
      },
      256);
  if (!consumer) return consumer.error();
  {
    std::unique_lock lock(mu);
    const auto deadline = Steady::now() + timeout;
    // Every wanted build ended, then no new event for `quiet`: late duplicates would show by then.
    while (Steady::now() < deadline) {
      if (ended.size() >= wanted.size() && Steady::now() - last_event >= quiet) break;
      cv.wait_for(lock, std::chrono::milliseconds(50));
    }
    audit.builds = seen.size();
    for (const auto& id : build_ids) {
      const auto it = audit.terminal.find(id);
      const int n = it == audit.terminal.end() ? 0 : it->second;
      if (n != 1) audit.problems.push_back(id + ": " + std::to_string(n) + " terminal events");
    }
  }
  (*consumer)->stop();
  return audit;
}

}  // namespace cvm::fleetsim
