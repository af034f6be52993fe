// agent_launch_bench: assignment received -> RUNNING through cvm-node-agent, against raw `runc`
// starting the same two bundles (the supervising container, whose cvm-supervisor runs the inner
// one), in the same run, alternating. Both rootfs paths, interleaved in each iteration: Caching off
// (the default: the image unpacked natively onto the workspace's range) and Caching on (the node
// cache's rootfs under an ID-mapped overlay; the first Caching-on launch fills the cache). Also the
// agent's idle RSS. Needs root, runc, umoci (to build the image) and nats-server; a load tool, not
// a test: it prints figures, it does not judge them.
//
//   agent_launch_bench [--iterations N]          (run the release preset for figures to report)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

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
using Clock = std::chrono::steady_clock;
using cvm::test::run_command;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : (n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2);
}

long rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 10;
  std::string agent_log_level = "info";  // --agent-log debug: the agent's per-step timings, kept in
                                         // /tmp/agent_launch_bench.agent.log
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iterations") iterations = std::max(1, std::atoi(argv[i + 1]));
    if (std::string(argv[i]) == "--agent-log") agent_log_level = argv[i + 1];
  }
  if (geteuid() != 0) {
    std::cerr << "agent_launch_bench: needs root (runc)\n";
    return 2;
  }
  const std::string work =
      fs::temp_directory_path() / ("cvm-launch-bench-" + std::to_string(getpid()));
  fs::create_directories(work);
  fs::permissions(work, fs::perms(0755));
  const std::string image = work + "/image";
  if (run_command({CVM_BUILD_IMAGE_SCRIPT, image, "latest"}, 120s).exit_code != 0) {
    std::cerr << "cannot build the default image\n";
    return 1;
  }
  cvm::test::NatsServer nats;
  if (!nats.start().ok()) {
    std::cerr << "cannot start nats-server\n";
    return 1;
  }
  const std::string state = work + "/agent";
  const std::string agent_root = work + "/runc-agent";
  const std::string raw_root = work + "/runc-raw";
  cvm::test::ChildProcess agent(
      {CVM_AGENT_BIN, "--nats-url", nats.url(), "--node-id", "bench", "--state-dir", state,
       "--runc-root", agent_root, "--metrics-listen", "off", "--stop-grace", "2", "--log-level",
       agent_log_level},
      work + "/agent.log");
  boost::asio::io_context io;
  auto conn = cvm::bus::Connection::connect({.url = nats.url()}, io.get_executor());
  if (!conn.ok()) return 1;
  auto c = *conn;
  // The connection delivers subscription messages on `io`: run it, so that an event is
  // timestamped when it arrives.
  auto io_work = boost::asio::make_work_guard(io);
  std::thread io_thread([&io] { io.run(); });
  struct Joiner {
    boost::asio::io_context& io;
    std::thread& t;
    ~Joiner() {
      io.stop();
      if (t.joinable()) t.join();
    }
  } joiner{io, io_thread};
  (void)c->ensure_stream(cvm::service::node_work_stream());
  (void)c->ensure_stream(cvm::service::events_stream());
  auto nodes = c->ensure_kv(cvm::service::nodes_bucket());
  if (!nodes.ok() || !cvm::test::wait_until(
                         [&] {
                           auto e = nodes->get("bench");
                           return e.ok() && e->has_value();
                         },
                         30s)) {
    std::cerr << "the agent did not register:\n" << agent.log_tail();
    return 1;
  }
  const long rss_start = rss_kib(agent.pid());

  const auto phase_of = [&](const std::string& build) {
    auto m = c->last_message(std::string(cvm::wire::kStreamEvents),
                             cvm::wire::build_events_subject(build));
    cvm::v1::BuildEvent e;
    if (!m.ok() || !m->has_value() || !e.ParseFromString((*m)->data))
      return cvm::v1::PHASE_UNSPECIFIED;
    return e.phase();
  };
  const auto assign = [&](const std::string& build, const std::string& ws, cvm::v1::Transition t,
                          bool caching = false) {
    cvm::v1::NodeAssignment a;
    a.mutable_request()->set_build_id(build);
    a.mutable_request()->set_workspace_id(ws);
    a.mutable_request()->set_image("oci:" + image + ":latest");
    a.mutable_request()->set_transition(t);
    a.set_node_id("bench");
    a.set_cvm(true);
    a.set_caching(caching);  // what the scheduler took from KV cvm_settings
    (void)c->js_publish(cvm::wire::node_work_subject("bench"), a.SerializeAsString(), build);
  };

  auto workspaces = c->ensure_kv(cvm::service::workspaces_bucket());
  if (!workspaces.ok()) return 1;
  struct Path {
    bool caching = false;
    std::vector<double> agent_ms;
    std::vector<double> raw_ms;
    std::vector<double> prepare_ms;  // PREPARING -> STARTING: the rootfs (unpack or overlay), specs
    std::vector<double> start_ms;    // STARTING -> RUNNING: the runtime, as the raw path
  };
  Path off{.caching = false};
  Path on{.caching = true};
  const auto one = [&](Path& p, int i) -> bool {
    const std::string ws = std::string(p.caching ? "on" : "off") + std::to_string(i);
    const std::string build = "b-" + ws;
    // 1. Through the agent: publish the assignment, wait for RUNNING. The event is pushed to a
    // core subscription (timestamped on arrival), not polled: the raw path's report is a file the
    // bench reads every 1 ms, so the agent's side must not pay a request per poll either.
    std::mutex mu;
    std::optional<Clock::time_point> ended;
    cvm::v1::Phase end_phase = cvm::v1::PHASE_UNSPECIFIED;
    auto sub = c->subscribe(cvm::wire::build_events_subject(build), "", [&](cvm::bus::Message m) {
      const auto now = Clock::now();
      cvm::v1::BuildEvent e;
      if (!e.ParseFromString(m.data)) return;
      if (e.phase() != cvm::v1::RUNNING && e.phase() != cvm::v1::FAILED) return;
      std::lock_guard lock(mu);
      if (!ended) {
        ended = now;
        end_phase = e.phase();
      }
    });
    if (!sub.ok()) return false;
    (void)c->flush();
    auto t0 = Clock::now();
    assign(build, ws, cvm::v1::START, p.caching);
    const bool ok = cvm::test::wait_until(
        [&] {
          std::lock_guard lock(mu);
          return ended.has_value();
        },
        120s, 1ms);
    if (!ok || end_phase != cvm::v1::RUNNING) {
      std::cerr << "launch " << ws << " did not reach RUNNING:\n" << agent.log_tail();
      return false;
    }
    p.agent_ms.push_back(std::chrono::duration<double, std::milli>(*ended - t0).count());
    cvm::test::wait_until(
        [&] {
          auto e = workspaces->get(ws);
          return e.ok() && e->has_value();
        },
        5s, 1ms);
    if (auto e = workspaces->get(ws); e.ok() && e->has_value()) {
      cvm::v1::WorkspaceRecord rec;
      if (rec.ParseFromString((*e)->value) && rec.phase_times_size() == 3) {
        p.prepare_ms.push_back(
            static_cast<double>(rec.phase_times(1).unix_ms() - rec.phase_times(0).unix_ms()));
        p.start_ms.push_back(
            static_cast<double>(rec.phase_times(2).unix_ms() - rec.phase_times(1).unix_ms()));
      }
    }

    // 2. The same two bundles with raw runc: take the agent's container away (the files, and the
    // overlay with Caching on, stay), then start the supervising bundle and wait for its report
    // that the inner one runs.
    const std::string dir = state + "/workspaces/" + ws;
    run_command({"runc", "--root", agent_root, "delete", "-f", "cvm-" + ws});
    fs::remove(dir + "/run/status.json");
    const std::string raw_id = "raw-" + ws;
    t0 = Clock::now();
    // runc's stdio goes to a file, as the agent does it: the container's init inherits it and
    // would hold a capture pipe open for as long as it runs.
    auto r = run_command({"/bin/sh", "-c",
                          "exec runc --root " + raw_root + " run -d --bundle " + dir +
                              "/supervisor " + raw_id + " >>" + dir + "/raw.log 2>&1"},
                         60s);
    const bool raw_ok =
        r.exit_code == 0 &&
        cvm::test::wait_until(
            [&] {
              return read_file(dir + "/run/status.json").find("running") != std::string::npos;
            },
            60s, 1ms);
    p.raw_ms.push_back(ms_since(t0));
    if (!raw_ok) {
      std::cerr << "raw runc run of " << dir << " failed: " << r.output
                << read_file(dir + "/run/status.json") << "\n";
      return false;
    }
    run_command({"runc", "--root", raw_root, "delete", "-f", raw_id});
    // 3. DELETE through the agent (its container is already gone): overlay, files and ID range
    // freed.
    assign(build + "-del", ws, cvm::v1::DELETE);
    cvm::test::wait_until([&] { return phase_of(build + "-del") == cvm::v1::STOPPED; }, 60s);
    return true;
  };
  for (int i = 0; i < iterations; ++i) {
    // Interleaved, so that both paths see the same machine load.
    if (!one(off, i) || !one(on, i)) return 1;
  }
  // Idle again: nothing running, a few heartbeats later.
  std::this_thread::sleep_for(3s);
  const long rss_idle = rss_kib(agent.pid());

  const auto range = [](const std::vector<double>& v) {
    return std::make_pair(*std::min_element(v.begin(), v.end()),
                          *std::max_element(v.begin(), v.end()));
  };
  // Caching off (the default) under the labels scripts already parse.
  const double agent_median = median(off.agent_ms);
  const double raw_median = median(off.raw_ms);
  std::printf("iterations                         %d (each path; interleaved)\n", iterations);
  std::printf("Caching off (native unpack onto the workspace's ID range):\n");
  std::printf("assignment -> RUNNING (agent)      median %.1f ms  min %.1f  max %.1f\n",
              agent_median, range(off.agent_ms).first, range(off.agent_ms).second);
  std::printf("raw runc run, same two bundles     median %.1f ms  min %.1f  max %.1f\n", raw_median,
              range(off.raw_ms).first, range(off.raw_ms).second);
  std::printf("median ratio agent / raw           %.2f  (target <= 1.25)\n",
              agent_median / raw_median);
  std::printf(
      "  of which PREPARING -> STARTING   median %.1f ms (image unpack onto the ID range)\n",
      median(off.prepare_ms));
  std::printf("  of which STARTING -> RUNNING     median %.1f ms (runc + cvm-supervisor + runc)\n",
              median(off.start_ms));
  const double on_agent = median(on.agent_ms);
  const double on_raw = median(on.raw_ms);
  std::printf("Caching on (node cache through an ID-mapped overlay; the first launch fills it):\n");
  std::printf(
      "caching on: agent assignment->RUNNING  median %.1f ms  min %.1f  max %.1f  "
      "(first %.1f)\n",
      on_agent, range(on.agent_ms).first, range(on.agent_ms).second, on.agent_ms.front());
  std::printf("caching on: raw runc, same bundles     median %.1f ms  min %.1f  max %.1f\n", on_raw,
              range(on.raw_ms).first, range(on.raw_ms).second);
  std::printf("caching on: median ratio agent/raw     %.2f  (target <= 1.25)\n", on_agent / on_raw);
  std::printf(
      "caching on:   PREPARING -> STARTING    median %.1f ms (cache lookup, ID-mapped "
      "overlay mount, specs)\n",
      median(on.prepare_ms));
  std::printf("caching on:   STARTING -> RUNNING      median %.1f ms\n", median(on.start_ms));
  std::printf("agent RSS after start              %.1f MiB\n", rss_start / 1024.0);
  std::printf("agent RSS idle after the launches  %.1f MiB  (target <= 15 MiB)\n",
              rss_idle / 1024.0);
  agent.stop();
  std::error_code ec;
  if (agent_log_level != "info") {
    fs::copy_file(work + "/agent.log", "/tmp/agent_launch_bench.agent.log",
                  fs::copy_options::overwrite_existing, ec);
  }
  fs::remove_all(work, ec);
  return 0;
}
