// cvm-fleet-sim: N simulated node agents against a real NATS, with the real scheduler replicas and
// GPU broker in-process (or external ones with --schedulers 0), a load of BuildRequests, and a
// report: placements/s, submit->SCHEDULED percentiles, the raw request-reply round trip of the
// same run, and the audit of capacity and terminal events.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "cvm/fleetsim/harness.h"
#include "cvm/fleetsim/load.h"

namespace {

std::atomic<bool> g_stop{false};

void print_percentiles(const char* what, const cvm::fleetsim::Percentiles& p) {
  std::printf("%-28s p50 %9.1f us  p90 %9.1f us  p99 %9.1f us  max %9.1f us  (n=%zu)\n", what,
              p.p50_us, p.p90_us, p.p99_us, p.max_us, p.samples);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cvm-fleet-sim: simulated node agents to load the real scheduler and broker"};
  std::string url = "nats://127.0.0.1:4222";
  cvm::fleetsim::FleetConfig fleet;
  cvm::fleetsim::LoadConfig load;
  int schedulers = 1;
  bool broker = true;
  bool audit = true;
  bool register_only = false;
  int rtt_samples = 2000;
  double node_ttl_s = 60;
  std::string sampling = "none";
  int64_t launch_ms = fleet.launch_delay.count();
  int64_t heartbeat_ms = fleet.heartbeat_interval.count();
  std::string log_level = "warn";
  bool stages = false;
  app.add_option("--nats-url", url)->capture_default_str();
  app.add_option("--nodes", fleet.nodes, "simulated nodes")->capture_default_str();
  app.add_option("--prefix", fleet.prefix, "node id prefix")->capture_default_str();
  app.add_option("--launch-delay-ms", launch_ms)->capture_default_str();
  app.add_option("--heartbeat-ms", heartbeat_ms)->capture_default_str();
  app.add_flag("!--no-progress-events", fleet.progress_events,
               "only RUNNING, no PREPARING/STARTING");
  app.add_flag("!--no-workspace-records", fleet.write_workspaces);
  app.add_flag("!--shared-subscription", fleet.per_node_subscriptions,
               "one wildcard subscription for every node (cnats runs a thread per subscription)");
  app.add_option("--schedulers", schedulers, "in-process scheduler replicas (0: use external ones)")
      ->capture_default_str();
  app.add_flag("!--no-broker", broker, "do not run a GPU broker in-process");
  app.add_option("--node-ttl", node_ttl_s, "in-process schedulers: seconds before NODE_LOST")
      ->capture_default_str();
  app.add_option("--sampling", sampling, "in-process schedulers: none|log2|percent")
      ->check(CLI::IsMember({"none", "log2", "percent"}))
      ->capture_default_str();
  app.add_option("--requests", load.requests)->capture_default_str();
  app.add_option("--rate", load.rate_per_s, "requests/s offered (0: as fast as --window allows)")
      ->capture_default_str();
  app.add_option("--window", load.window, "most undecided requests at once (0: unbounded)")
      ->capture_default_str();
  app.add_option("--cpu", load.cpu_millicores)->capture_default_str();
  app.add_option("--memory", load.memory_bytes)->capture_default_str();
  app.add_option("--gpu-every", load.gpu_every, "every n-th request asks for a GPU")
      ->capture_default_str();
  app.add_option("--load-prefix", load.prefix)->capture_default_str();
  app.add_option("--rtt-samples", rtt_samples)->capture_default_str();
  app.add_flag("!--no-audit", audit, "skip the CVM_EVENTS audit");
  app.add_flag("--register-only", register_only,
               "register and heartbeat the nodes until SIGINT/SIGTERM, no load");
  app.add_option("--log-level", log_level)->capture_default_str();
  app.add_flag("--stages", stages,
               "in-process schedulers: print where each placement's time went, by stage");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  fleet.launch_delay = std::chrono::milliseconds(launch_ms);
  fleet.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  load.nats_url = url;

  cvm::SystemClock clock;
  cvm::fleetsim::Harness harness(url, clock);
  if (auto st = harness.start_fleet(fleet); !st) {
    std::cerr << "fleet-sim: " << st.error().message << "\n";
    return 1;
  }
  if (register_only) {
    std::signal(SIGINT, [](int) { g_stop = true; });
    std::signal(SIGTERM, [](int) { g_stop = true; });
    std::printf("registered %d nodes; heartbeating until SIGINT/SIGTERM\n", fleet.nodes);
    std::fflush(stdout);
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return 0;
  }
  if (broker) {
    if (auto st = harness.start_broker(); !st) {
      std::cerr << "broker: " << st.error().message << "\n";
      return 1;
    }
  }
  cvm::scheduler::SchedulerConfig sc;
  sc.node_ttl = std::chrono::milliseconds(static_cast<int64_t>(node_ttl_s * 1000));
  sc.sampling = sampling == "log2"      ? cvm::scheduler::Sampling::kLog2
                : sampling == "percent" ? cvm::scheduler::Sampling::kPercent
                                        : cvm::scheduler::Sampling::kNone;
  sc.trace_stages = stages;
  if (auto st = harness.start_schedulers(schedulers, sc); !st) {
    std::cerr << "scheduler: " << st.error().message << "\n";
    return 1;
  }
  // Every replica must see the whole fleet before the load starts, or the first decisions see a
  // partial index (a bounded wait on the replicas' own state, not a sleep).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (size_t i = 0; i < harness.schedulers(); ++i) {
    while (harness.on_scheduler(i, [](auto& s) { return s.nodes(); }) <
           static_cast<size_t>(fleet.nodes)) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::cerr << "scheduler replica " << i << " did not see every node\n";
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  auto rtt = cvm::fleetsim::measure_request_reply(url, rtt_samples);
  if (!rtt) {
    std::cerr << "rtt: " << rtt.error().message << "\n";
    return 1;
  }
  // The same round trip while the load runs, one every 4 ms (about 1% of the load's messages): how
  // much of submit->SCHEDULED is the machine's contention rather than the pipeline. Informative
  // only; the target's ratio stays against the idle round trip measured before.
  std::atomic<bool> load_done{false};
  cvm::Result<cvm::fleetsim::Percentiles> rtt_during =
      cvm::make_error(cvm::ErrorDomain::kInvalid, "not measured");
  std::thread rtt_thread([&] {
    rtt_during = cvm::fleetsim::measure_request_reply(url, rtt_samples,
                                                      std::chrono::milliseconds(4), &load_done);
  });
  auto report = cvm::fleetsim::run_load(load);
  load_done = true;
  rtt_thread.join();
  if (!report) {
    std::cerr << "load: " << report.error().message << "\n";
    return 1;
  }
  auto rtt_after = cvm::fleetsim::measure_request_reply(url, rtt_samples);
  const auto stats = harness.on_fleet([](auto& f) { return f.stats(); });

  std::printf("nodes %d, scheduler replicas %d, requests %d (rate %.0f/s, window %d)\n",
              fleet.nodes, schedulers, load.requests, load.rate_per_s, load.window);
  std::printf("decided %d/%d: scheduled %d, failed %d, undecided %d in %.3f s\n",
              report->scheduled + report->failed, report->submitted, report->scheduled,
              report->failed, report->undecided, report->seconds);
  for (const auto& [reason, n] : report->failure_reasons) {
    std::printf("  failed %s: %d\n", reason.c_str(), n);
  }
  std::printf("throughput: %.0f decisions/s, %.0f placements/s\n", report->decisions_per_s,
              report->scheduled_per_s);
  std::printf("offered: %d submitted in %.3f s (%.0f/s)\n", report->submitted,
              report->submit_seconds,
              report->submit_seconds > 0 ? report->submitted / report->submit_seconds : 0.0);
  print_percentiles("submit->SCHEDULED", report->submit_to_scheduled);
  print_percentiles("raw request-reply (before)", *rtt);
  if (rtt_after) print_percentiles("raw request-reply (after)", *rtt_after);
  if (rtt_during && rtt_during->samples > 0) {
    print_percentiles("raw request-reply (during)", *rtt_during);
  }
  if (rtt->p99_us > 0) {
    std::printf("p99 ratio submit->SCHEDULED / raw request-reply: %.1fx (p50 ratio %.1fx)\n",
                report->submit_to_scheduled.p99_us / rtt->p99_us,
                report->submit_to_scheduled.p50_us / rtt->p50_us);
  }
  if (rtt_during && rtt_during->p99_us > 0) {
    std::printf(
        "p99 ratio submit->SCHEDULED / raw request-reply during the load: %.1fx (p50 ratio "
        "%.1fx; same CPU contention, informative: the target is against the idle one)\n",
        report->submit_to_scheduled.p99_us / rtt_during->p99_us,
        report->submit_to_scheduled.p50_us / rtt_during->p50_us);
  }
  std::printf(
      "fleet: assignments %lu, launched %lu, over capacity %lu, launched twice %lu, "
      "duplicate launches %lu, heartbeats %lu\n",
      static_cast<unsigned long>(stats.assignments), static_cast<unsigned long>(stats.launched),
      static_cast<unsigned long>(stats.over_capacity),
      static_cast<unsigned long>(stats.launched_twice),
      static_cast<unsigned long>(stats.duplicate_launches),
      static_cast<unsigned long>(stats.heartbeats));
  if (stages) {
    for (size_t i = 0; i < harness.schedulers(); ++i) {
      const auto [report, conflicts] = harness.on_scheduler(
          i, [](auto& s) { return std::pair(s.stage_report(), s.counts().cas_conflicts); });
      std::printf("scheduler replica %zu stages (capacity compare-and-set conflicts: %lu):\n%s", i,
                  static_cast<unsigned long>(conflicts), report.c_str());
    }
  }
  int rc = stats.over_capacity == 0 && stats.launched_twice == 0 && report->undecided == 0 ? 0 : 3;
  if (audit) {
    std::vector<std::string> ids;
    for (int i = 0; i < report->submitted; ++i)
      ids.push_back(load.prefix + "-b" + std::to_string(i));
    auto a = cvm::fleetsim::audit_events(url, ids, std::chrono::milliseconds(1500),
                                         std::chrono::seconds(120));
    if (!a) {
      std::cerr << "audit: " << a.error().message << "\n";
      return 1;
    }
    std::printf("audit: %zu events, %zu builds, %zu without exactly one terminal event\n",
                a->events, a->builds, a->problems.size());
    for (size_t i = 0; i < a->problems.size() && i < 10; ++i) {
      std::printf("  %s\n", a->problems[i].c_str());
    }
    if (!a->problems.empty()) rc = 3;
  }
  harness.stop_all();
  return rc;
}
