// e2e_latency_bench: submit -> SCHEDULED and submit -> RUNNING through the real stack (nats-server,
// cvm-scheduler, cvm-gpu-broker and one cvm-node-agent launching real runc containers), with
// builds submitted as cvmctl submits them (a BuildRequest on CVM_BUILDS, Nats-Msg-Id = build id,
// timed from just before the publish), and the memory of each service at rest and under load.
//
// Phase 1 (latency): one build at a time, START, RUNNING, then DELETE: an idle stack's latency.
// Phase 2 (load): a burst of builds at once, all to RUNNING, then all deleted; RSS is sampled
// throughout and VmHWM (the kernel's peak RSS) is read at the end.
//
//   e2e_latency_bench [--builds N] [--burst N] [--burst-cpu MILLICORES]
// A load tool, not a test: it prints figures ("label  p50 X us  p99 Y us (n=N)" and
// "memory SERVICE ..." lines) for scripts/bench.sh, it does not judge them. Needs root, runc,
// umoci and nats-server.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "bench_util.h"
#include "child_process.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cvm::bench::Steady;
using cvm::test::ChildProcess;

// VmRSS or VmHWM of a process, in KiB; -1 when it is gone.
long status_kib(pid_t pid, const char* field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  const std::string prefix = std::string(field) + ":";
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) return std::stol(line.substr(prefix.size()));
  }
  return -1;
}

using cvm::bench::print_latency;

// When each phase of each build was first seen on cvm.v1.builds.*.events.
class EventLog {
 public:
  void record(const cvm::v1::BuildEvent& e) {
    const auto now = Steady::now();
    std::lock_guard lock(mu_);
    seen_[e.build_id()].emplace(e.phase(), now);
  }
  std::optional<Steady::time_point> at(const std::string& build, cvm::v1::Phase phase) {
    std::lock_guard lock(mu_);
    const auto b = seen_.find(build);
    if (b == seen_.end()) return std::nullopt;
    const auto p = b->second.find(phase);
    return p == b->second.end() ? std::nullopt : std::optional(p->second);
  }
  bool reached(const std::string& build, cvm::v1::Phase phase) {
    return at(build, phase).has_value() || at(build, cvm::v1::FAILED).has_value();
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::map<cvm::v1::Phase, Steady::time_point>> seen_;
};

struct Service {
  std::string name;
  ChildProcess* process;
  long rest_rss = 0;
  std::atomic<long> load_rss_max{0};
};

}  // namespace

int main(int argc, char** argv) {
  int builds = 20;
  int burst = 4;
  uint64_t burst_cpu = 300;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--builds") builds = std::max(1, std::atoi(argv[i + 1]));
    if (a == "--burst") burst = std::max(0, std::atoi(argv[i + 1]));
    if (a == "--burst-cpu") burst_cpu = std::max(10, std::atoi(argv[i + 1]));
  }
  if (geteuid() != 0) {
    std::cerr << "e2e_latency_bench: needs root (runc)\n";
    return 2;
  }
  const std::string work =
      fs::temp_directory_path() / ("cvm-e2e-bench-" + std::to_string(getpid()));
  fs::create_directories(work);
  fs::permissions(work, fs::perms(0755));
  const std::string image = work + "/image";
  if (cvm::test::run_command({CVM_BUILD_IMAGE_SCRIPT, image, "latest"}, 120s).exit_code != 0) {
    std::cerr << "e2e_latency_bench: cannot build the default image\n";
    return 1;
  }
  cvm::test::NatsServer nats;
  if (!nats.start().ok()) {
    std::cerr << "e2e_latency_bench: cannot start nats-server\n";
    return 1;
  }
  const std::string url = nats.url();
  const std::string runc_root = work + "/runc";
  // A capacity hold counts on top of the agent's reported allocation until it expires (30 s by
  // default); with the agent heartbeating every second, 2 s covers the gap, and builds one after
  // another on this two-CPU node do not run out of room on holds of builds already deleted.
  ChildProcess scheduler(
      {CVM_SCHEDULER_BIN, "--nats-url", url, "--metrics-listen", "off", "--reservation-hold", "2"},
      work + "/scheduler.log");
  ChildProcess broker({CVM_BROKER_BIN, "--nats-url", url, "--metrics-listen", "off"},
                      work + "/broker.log");
  ChildProcess agent({CVM_AGENT_BIN, "--nats-url", url, "--node-id", "bench-node", "--state-dir",
                      work + "/agent", "--runc-root", runc_root, "--metrics-listen", "off",
                      "--heartbeat-interval", "1", "--stop-grace", "2"},
                     work + "/agent.log");
  const auto logs = [&] {
    return "\n--- scheduler\n" + scheduler.log_tail() + "\n--- broker\n" + broker.log_tail() +
           "\n--- agent\n" + agent.log_tail();
  };

  boost::asio::io_context io;
  auto guard = boost::asio::make_work_guard(io);
  std::thread io_thread([&] { io.run(); });
  const auto finish = [&](int rc) {
    guard.reset();
    io.stop();
    io_thread.join();
    for (auto* p : {&agent, &scheduler, &broker}) p->stop();
    auto list = cvm::test::run_command({"runc", "--root", runc_root, "list", "-q"});
    std::istringstream ids(list.output);
    for (std::string id; std::getline(ids, id);) {
      if (!id.empty()) cvm::test::run_command({"runc", "--root", runc_root, "delete", "-f", id});
    }
    std::error_code ec;
    if (rc == 0) fs::remove_all(work, ec);
    return rc;
  };

  auto conn = cvm::bus::Connection::connect({.url = url, .name = "e2e-bench"}, io.get_executor());
  if (!conn) {
    std::cerr << "e2e_latency_bench: " << conn.error().message << "\n";
    return finish(1);
  }
  auto c = *conn;
  EventLog events;
  auto sub =
      c->subscribe(std::string(cvm::wire::kBuildEventsWildcard), "", [&](cvm::bus::Message m) {
        cvm::v1::BuildEvent e;
        if (e.ParseFromString(m.data)) events.record(e);
      });
  if (!sub || !c->flush()) return finish(1);
  (void)c->ensure_stream(cvm::service::builds_stream());
  auto nodes = c->ensure_kv(cvm::service::nodes_bucket());
  // Registered, and the scheduler has had a heartbeat or two to index it.
  if (!nodes || !cvm::test::wait_until(
                    [&] {
                      auto e = nodes->get("bench-node");
                      return e.ok() && e->has_value();
                    },
                    30s)) {
    std::cerr << "e2e_latency_bench: the agent did not register" << logs() << "\n";
    return finish(1);
  }
  std::this_thread::sleep_for(3s);

  std::vector<Service> services(3);
  services[0].name = "cvm-scheduler";
  services[0].process = &scheduler;
  services[1].name = "cvm-gpu-broker";
  services[1].process = &broker;
  services[2].name = "cvm-node-agent";
  services[2].process = &agent;
  for (auto& s : services) s.rest_rss = status_kib(s.process->pid(), "VmRSS");

  int seq = 0;
  // cpu_millicores 0: the request's default (1000m, 512 MiB), as cvmctl sends it. The burst asks
  // for less so that it fits one node of this machine; a CPU limit also throttles the supervisor
  // and the inner runc, so it is kept well above a tiny share.
  const auto submit = [&](const std::string& build, const std::string& ws, cvm::v1::Transition t,
                          uint64_t cpu_millicores = 0) {
    cvm::v1::BuildRequest req;
    req.set_build_id(build);
    req.set_workspace_id(ws);
    req.set_owner("bench");
    req.set_image("oci:" + image + ":latest");
    req.set_transition(t);
    // use_cvm unset, as cvmctl leaves it: the default settings make it a CVM (supervising
    // container + inner container).
    if (cpu_millicores != 0) {
      req.mutable_resources()->set_cpu_millicores(cpu_millicores);
      req.mutable_resources()->set_memory_bytes(128ULL << 20);
    }
    const auto t0 = Steady::now();
    auto ack = c->js_publish(std::string(cvm::wire::kBuildsSubmit), req.SerializeAsString(), build);
    return ack.ok() ? std::optional(t0) : std::nullopt;
  };
  const auto wait_phase = [&](const std::string& build, cvm::v1::Phase phase) {
    return cvm::test::wait_until([&] { return events.reached(build, phase); }, 120s, 1ms) &&
           events.at(build, phase).has_value();
  };
  const auto us = [](Steady::time_point a, Steady::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };

  // The freed capacity counts once the agent's next NodeStatus says so (it heartbeats every
  // second here) and the deleted build's hold has expired: a default request takes half of this
  // machine's two CPUs, so the next build waits for both rather than fail for room.
  const auto wait_idle = [&] {
    (void)cvm::test::wait_until(
        [&] {
          auto e = nodes->get("bench-node");
          cvm::v1::NodeStatus status;
          return e.ok() && e->has_value() && status.ParseFromString((*e)->value) &&
                 status.allocated().cpu_millicores() == 0;
        },
        10s, 20ms);
    std::this_thread::sleep_for(2s);
  };

  // Phase 1: latency of an idle stack.
  std::vector<double> scheduled_us;
  std::vector<double> running_us;
  const std::vector<cvm::v1::Phase> kPhases = {cvm::v1::SCHEDULED, cvm::v1::PREPARING,
                                               cvm::v1::STARTING, cvm::v1::RUNNING};
  std::vector<std::vector<double>> phase_us(kPhases.size());
  for (int i = 0; i < builds; ++i) {
    const std::string ws = "lat" + std::to_string(i);
    const std::string build = "b" + std::to_string(seq++) + "-" + ws;
    const auto t0 = submit(build, ws, cvm::v1::START);
    if (!t0 || !wait_phase(build, cvm::v1::RUNNING)) {
      std::cerr << "e2e_latency_bench: " << build << " did not reach RUNNING" << logs() << "\n";
      return finish(1);
    }
    if (auto t = events.at(build, cvm::v1::SCHEDULED)) scheduled_us.push_back(us(*t0, *t));
    // Where the time goes between the two: each phase's event after the one before it.
    for (size_t p = 1; p < kPhases.size(); ++p) {
      const auto a = events.at(build, kPhases[p - 1]);
      const auto b = events.at(build, kPhases[p]);
      if (a && b) phase_us[p].push_back(us(*a, *b));
    }
    running_us.push_back(us(*t0, *events.at(build, cvm::v1::RUNNING)));
    const std::string del = "b" + std::to_string(seq++) + "-del-" + ws;
    if (!submit(del, ws, cvm::v1::DELETE) || !wait_phase(del, cvm::v1::STOPPED)) {
      std::cerr << "e2e_latency_bench: " << del << " did not stop" << logs() << "\n";
      return finish(1);
    }
    wait_idle();
  }

  // Phase 2: a burst, with RSS sampled every 20 ms.
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling) {
      for (auto& s : services) {
        const long rss = status_kib(s.process->pid(), "VmRSS");
        long prev = s.load_rss_max.load();
        while (rss > prev && !s.load_rss_max.compare_exchange_weak(prev, rss)) {
        }
      }
      std::this_thread::sleep_for(20ms);
    }
  });
  std::vector<double> burst_running_us;
  std::vector<std::pair<std::string, Steady::time_point>> started;
  bool burst_ok = true;
  for (int i = 0; i < burst; ++i) {
    const std::string ws = "load" + std::to_string(i);
    const std::string build = "b" + std::to_string(seq++) + "-" + ws;
    if (auto t0 = submit(build, ws, cvm::v1::START, burst_cpu)) started.emplace_back(build, *t0);
  }
  for (const auto& [build, t0] : started) {
    if (!wait_phase(build, cvm::v1::RUNNING)) {
      burst_ok = false;
      continue;
    }
    burst_running_us.push_back(us(t0, *events.at(build, cvm::v1::RUNNING)));
  }
  std::vector<std::string> deletes;
  for (int i = 0; i < burst; ++i) {
    const std::string ws = "load" + std::to_string(i);
    const std::string del = "b" + std::to_string(seq++) + "-del-" + ws;
    if (submit(del, ws, cvm::v1::DELETE)) deletes.push_back(del);
  }
  for (const auto& del : deletes) (void)wait_phase(del, cvm::v1::STOPPED);
  sampling = false;
  sampler.join();

  std::printf(
      "builds %d one at a time (default resources), then a burst of %d (cpu %llum, memory 128 "
      "MiB); all CVMs\n",
      builds, burst, static_cast<unsigned long long>(burst_cpu));
  print_latency("submit->SCHEDULED", scheduled_us);
  print_latency("submit->RUNNING", running_us);
  print_latency("submit->RUNNING (burst)", burst_running_us);
  for (size_t p = 1; p < kPhases.size(); ++p) {
    const std::string label =
        "  " + cvm::v1::Phase_Name(kPhases[p - 1]) + "->" + cvm::v1::Phase_Name(kPhases[p]);
    print_latency(label.c_str(), phase_us[p]);
  }
  if (!burst_ok) std::printf("burst: some builds did not reach RUNNING\n");
  for (auto& s : services) {
    const long hwm = status_kib(s.process->pid(), "VmHWM");
    std::printf("memory %-15s rest RSS %7.1f MiB  load RSS %7.1f MiB  peak VmHWM %7.1f MiB\n",
                s.name.c_str(), s.rest_rss / 1024.0, s.load_rss_max.load() / 1024.0, hwm / 1024.0);
  }
  return finish(burst_ok ? 0 : 1);
}
