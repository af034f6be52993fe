// agent_launch_bench: assignment received -> RUNNING through cvm-node-agent, against raw `runc`
// starting the same two bundles (the supervising container, whose cvm-supervisor runs the inner
// one), in the same run. Both rootfs paths, interleaved in each iteration: Caching off (the
// default: the image unpacked natively onto the workspace's range) and Caching on (the node
// cache's rootfs under an ID-mapped overlay; the first Caching-on launch fills the cache). Also the
// agent's idle RSS. Needs root, runc, umoci (to build the image) and nats-server; a load tool, not
// a test: it prints figures, it does not judge them.
//
//   agent_launch_bench [--iterations N] [--agent-log debug] [--paths on|off] [--work-dir DIR]
//   (release build for figures; --agent-log debug keeps the agent's step timings in
//   /tmp/agent_launch_bench.agent.log; --paths runs one rootfs path only, e.g. to profile it;
//   --work-dir puts the agent's state dir, the bundles and the image on another filesystem,
//   default the temp dir)
//
// The filesystem matters for Caching off, and the bench prints which one it ran on. On an ext4
// without a journal (this project's CI VMs: `/` is journal-less and mounted with `discard`) the
// kernel allocates each new inode past every one deleted in the last 5-35 s
// (`recently_deleted()` in ext4's `find_inode_bit`, checked only without a journal), so a node that
// deletes a rootfs and then unpacks another pays for every file of the first; back-to-back runs
// here go 1.11 -> 1.18 -> 1.37 -> 1.73. The raw baseline creates no files. scripts/bench.sh
// therefore also runs the bench on a journaled ext4 (a loop device), as a node's /var/lib is.
//
// What is measured, exactly:
// - Agent: from the publish of a START assignment (JetStream, the agent's work stream) to the
//   arrival of its RUNNING event on a core subscription of the bench. Inside: PREPARING, ID range
//   and in-flight record written, the rootfs (unpack or overlay), both specs, `runc run` of the
//   supervising bundle, the supervisor's own `runc run --detach` of the inner bundle, its
//   status.json, the KV record, the RUNNING publish.
// - Raw baseline: `runc --root <own root> run --detach --bundle <ws>/supervisor raw-<ws>` of the
//   very bundles the agent wrote for a workspace (the supervisor's config.json, rootfs dir and
//   binds; the inner bundle with its rootfs), spawned directly (no shell) with stdio on a log file
//   as the agent does it, from spawn to the moment the supervisor's status.json says "running"
//   (inotify on the run dir, as the agent waits). The same cvm-supervisor inside, so the same inner
//   `runc run --detach`. Nothing of the agent's bookkeeping, no NATS.
// - Same starting state: before the raw run the agent's container is deleted (`runc delete -f`),
//   and what a run leaves in the bundles is put back as the agent's launch found it: the
//   supervisor's rootfs dir emptied again (runc created ~30 mount points in it on the first run:
//   directories and empty files for each bind), the run dir emptied (status.json, inner.log) and,
//   with Caching on, the overlay unmounted, its upper and work dirs removed and a fresh ID-mapped
//   overlay mounted (the agent's own mount_idmapped_overlay, same range), so that neither run finds
//   a warm overlay the other one made. runc writes nothing into the inner rootfs (every mount point
//   exists in the image: the overlay's upper dir stays empty). The Caching-off rootfs stays as
//   unpacked (the raw run gets a complete bundle: the unpack is the agent's work, not runc's).
// - Waiting: the bench blocks (a condition variable for the agent's RUNNING, inotify for raw), so
//   no polling thread of the bench competes with either; and it sleeps 50 ms before each measured
//   run, so that neither overlaps what the previous step left running (the agent's work after
//   RUNNING, the kernel's after a teardown).
// - Order: even iterations run the agent first and then raw on its bundles; odd ones run raw first
//   on the bundles of an unmeasured agent launch (of another workspace, reset as above) and then
//   the measured agent launch of a fresh workspace. The agent's launch always starts from no files
//   at all; each raw run from the reset bundles.
#include <poll.h>
#include <spawn.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
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
#include "cvm/agent/idmap_mount.h"
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
using Steady = std::chrono::steady_clock;
using cvm::test::run_command;

double ms_since(Steady::time_point t0) {
  return std::chrono::duration<double, std::milli>(Steady::now() - t0).count();
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

// "ext4 on /dev/vda (rw,relatime; rw,discard,...), no journal": the mount that holds PATH (the
// longest mount point prefix in /proc/self/mountinfo) and, for ext4, whether it has a journal (jbd2
// lists a journaled device as /proc/fs/jbd2/<dev>-<journal inode>).
std::string describe_filesystem(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string best_point, best;
  for (std::string line; std::getline(in, line);) {
    // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
    std::istringstream fields(line);
    std::string id, parent, dev, root, point, options, word;
    fields >> id >> parent >> dev >> root >> point >> options;
    while (fields >> word && word != "-") {
    }
    std::string type, source, super_options;
    fields >> type >> source >> super_options;
    const bool inside =
        path == point || point == "/" ||
        (path.rfind(point, 0) == 0 && path.size() > point.size() && path[point.size()] == '/');
    if (!inside || point.size() < best_point.size()) continue;
    best_point = point;
    best = type + " on " + source + " (" + options + "; " + super_options + ")";
    if (type == "ext4") {
      const std::string dev_name = fs::path(source).filename();
      bool journal = false;
      std::error_code ec;
      for (fs::directory_iterator it("/proc/fs/jbd2", ec); !ec && it != fs::directory_iterator();
           it.increment(ec)) {
        if (it->path().filename().string().rfind(dev_name + "-", 0) == 0) journal = true;
      }
      best += journal ? ", journal" : ", no journal";
    }
  }
  return best.empty() ? "unknown" : best;
}

// On-CPU and run-queue wait time of all of a process's threads so far, ns
// (/proc/PID/task/*/schedstat).
std::pair<double, double> sched_ns(pid_t pid) {
  double cpu = 0, wait = 0;
  std::error_code ec;
  for (fs::directory_iterator it("/proc/" + std::to_string(pid) + "/task", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::ifstream in(it->path() / "schedstat");
    double c = 0, w = 0;
    if (in >> c >> w) {
      cpu += c;
      wait += w;
    }
  }
  return {cpu, wait};
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Waits (inotify, as the agent does) until <run_dir>/status.json says "running"; the watch is set
// up by the caller before the runtime starts, so no rename is missed.
class StatusWatch {
 public:
  explicit StatusWatch(const std::string& run_dir)
      : run_dir_(run_dir), fd_(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK)) {
    if (fd_ >= 0) ::inotify_add_watch(fd_, run_dir.c_str(), IN_MOVED_TO | IN_CLOSE_WRITE);
  }
  ~StatusWatch() {
    if (fd_ >= 0) ::close(fd_);
  }
  StatusWatch(const StatusWatch&) = delete;
  StatusWatch& operator=(const StatusWatch&) = delete;

  bool wait_running(std::chrono::milliseconds timeout) {
    const auto deadline = Steady::now() + timeout;
    for (;;) {
      const std::string text = read_file(run_dir_ + "/status.json");
      if (text.find("\"running\"") != std::string::npos) {
        // How long the report waited to be read (its mtime: the supervisor's rename), as the
        // agent logs it for its own wait (--agent-log debug).
        struct stat st {};
        timespec now{};
        if (::stat((run_dir_ + "/status.json").c_str(), &st) == 0 &&
            ::clock_gettime(CLOCK_REALTIME, &now) == 0) {
          noticed_after_ms = static_cast<double>(now.tv_sec - st.st_mtim.tv_sec) * 1e3 +
                             static_cast<double>(now.tv_nsec - st.st_mtim.tv_nsec) / 1e6;
        }
        return true;
      }
      if (text.find("\"failed\"") != std::string::npos) return false;
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count();
      if (left <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      (void)::poll(&p, 1, fd_ >= 0 ? static_cast<int>(left) : 1);
      char buf[4096];
      while (fd_ >= 0 && ::read(fd_, buf, sizeof buf) > 0) {
      }
    }
  }

  double noticed_after_ms = -1;  // status.json written -> read, once running was seen

 private:
  std::string run_dir_;
  int fd_;
};

// `runc --root ROOT run --detach --bundle BUNDLE ID`, spawned as the agent spawns it: stdin
// /dev/null, stdout and stderr appended to `log` (the container's init inherits them), no shell.
int runc_run_detached(const std::string& root, const std::string& bundle, const std::string& id,
                      const std::string& log) {
  std::vector<std::string> args = {"runc",     "--root",   root,   "run",
                                   "--detach", "--bundle", bundle, id};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  ::posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, "runc", &actions, nullptr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return 127;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Puts a workspace's bundles back into the state the agent's launch started the runtime from (see
// the header): empty supervisor rootfs and run dir; with Caching on, a fresh ID-mapped overlay of
// the cached rootfs on the same range.
bool reset_bundles(const std::string& dir, bool caching, const std::string& cached_rootfs) {
  std::error_code ec;
  fs::remove_all(dir + "/supervisor/rootfs", ec);
  fs::create_directory(dir + "/supervisor/rootfs", ec);
  fs::permissions(dir + "/supervisor/rootfs", fs::perms(0755), ec);
  for (const char* f : {"/run/status.json", "/run/status.json.tmp", "/run/inner.log"}) {
    fs::remove(dir + f, ec);
  }
  if (!caching) return true;
  struct stat upper {};
  if (::stat((dir + "/overlay/upper").c_str(), &upper) != 0) {
    std::cerr << "no overlay upper dir under " << dir << "\n";
    return false;
  }
  const cvm::agent::IdRange ids{upper.st_uid, 65536};
  if (auto st = cvm::agent::unmount_under(dir); !st) {
    std::cerr << "unmount under " << dir << ": " << st.error().message << "\n";
    return false;
  }
  fs::remove_all(dir + "/overlay", ec);
  auto plan = cvm::agent::plan_workspace_overlay(dir, cached_rootfs);
  if (!plan) return false;
  if (auto st = cvm::agent::mount_idmapped_overlay(*plan, ids); !st) {
    std::cerr << "remount the overlay of " << dir << ": " << st.error().message << "\n";
    return false;
  }
  return true;
}

// The node cache's one rootfs (the bench uses one image): <cache>/rootfs/<digest>/rootfs.
std::string cached_rootfs_of(const std::string& cache_dir) {
  std::error_code ec;
  for (fs::directory_iterator it(cache_dir + "/rootfs", ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(".tmp", 0) == 0) continue;
    if (fs::is_directory(it->path() / "rootfs", ec)) return (it->path() / "rootfs").string();
  }
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 10;
  std::string paths = "both";            // --paths on|off: one rootfs path only (to profile it)
  std::string agent_log_level = "info";  // --agent-log debug: the agent's per-step timings, kept in
                                         // /tmp/agent_launch_bench.agent.log
  std::string work_dir = fs::temp_directory_path();  // --work-dir: where every file of the run goes
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iterations") iterations = std::max(1, std::atoi(argv[i + 1]));
    if (std::string(argv[i]) == "--agent-log") agent_log_level = argv[i + 1];
    if (std::string(argv[i]) == "--paths") paths = argv[i + 1];
    if (std::string(argv[i]) == "--work-dir") work_dir = argv[i + 1];
  }
  if (geteuid() != 0) {
    std::cerr << "agent_launch_bench: needs root (runc)\n";
    return 2;
  }
  const std::string work = fs::path(work_dir) / ("cvm-launch-bench-" + std::to_string(getpid()));
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
    std::vector<double> agent_cpu_ms;   // the agent's own threads on a CPU, until RUNNING arrived
    std::vector<double> agent_wait_ms;  // ... and runnable but waiting for one
    std::vector<double> preparing_ms;   // assignment published -> PREPARING received (the bus)
    std::vector<double> prepare_ms;  // PREPARING -> STARTING: the rootfs (unpack or overlay), specs
    std::vector<double> start_ms;    // STARTING -> RUNNING: the runtime, as the raw path
    std::vector<double> raw_runc_ms;  // raw: until `runc run --detach` exits (the supervisor runs)
    std::vector<double> raw_notice_ms;  // raw: status.json written -> read by the waiter
  };
  Path off{.caching = false};
  Path on{.caching = true};
  // Before each measured run: the agent's work after an event it published (the in-flight record,
  // its heartbeat, malloc_trim) and the kernel's after a teardown must not overlap it.
  const auto settle = [] { std::this_thread::sleep_for(50ms); };
  // Through the agent: publish the assignment, wait for RUNNING. The event is pushed to a core
  // subscription (timestamped on arrival), not polled: the agent's side pays no request per poll.
  // Returns the ms from publish to RUNNING and, with `p`, notes the phase times from the record.
  const auto agent_launch = [&](const std::string& ws, bool caching,
                                Path* p) -> std::optional<double> {
    const std::string build = "b-" + ws;
    std::mutex mu;
    std::condition_variable cv;
    std::optional<Steady::time_point> preparing;
    std::optional<Steady::time_point> ended;
    cvm::v1::Phase end_phase = cvm::v1::PHASE_UNSPECIFIED;
    auto sub = c->subscribe(cvm::wire::build_events_subject(build), "", [&](cvm::bus::Message m) {
      const auto now = Steady::now();
      cvm::v1::BuildEvent e;
      if (!e.ParseFromString(m.data)) return;
      std::lock_guard lock(mu);
      if (e.phase() == cvm::v1::PREPARING && !preparing) preparing = now;
      if (e.phase() != cvm::v1::RUNNING && e.phase() != cvm::v1::FAILED) return;
      if (!ended) {
        ended = now;
        end_phase = e.phase();
        cv.notify_all();
      }
    });
    if (!sub.ok()) return std::nullopt;
    (void)c->flush();
    settle();
    const auto sched0 = sched_ns(agent.pid());
    const auto t0 = Steady::now();
    assign(build, ws, cvm::v1::START, caching);
    // Blocked on a condition variable (no polling thread of the bench competes with the launch,
    // as none does with the raw run).
    bool ok = false;
    {
      std::unique_lock lock(mu);
      ok = cv.wait_for(lock, 120s, [&] { return ended.has_value(); });
    }
    if (!ok || end_phase != cvm::v1::RUNNING) {
      std::cerr << "launch " << ws << " did not reach RUNNING:\n" << agent.log_tail();
      return std::nullopt;
    }
    const double ms = std::chrono::duration<double, std::milli>(*ended - t0).count();
    const auto sched1 = sched_ns(agent.pid());
    if (p) {
      p->agent_cpu_ms.push_back((sched1.first - sched0.first) / 1e6);
      p->agent_wait_ms.push_back((sched1.second - sched0.second) / 1e6);
    }
    if (p && preparing) {
      p->preparing_ms.push_back(std::chrono::duration<double, std::milli>(*preparing - t0).count());
    }
    // The record is written before RUNNING is published or right after it: wait for it either way
    // before anything else runs, so that the next measurement does not overlap the agent's work.
    cvm::test::wait_until(
        [&] {
          auto e = workspaces->get(ws);
          cvm::v1::WorkspaceRecord rec;
          return e.ok() && e->has_value() && rec.ParseFromString((*e)->value) &&
                 rec.build_id() == build;
        },
        5s, 1ms);
    if (auto e = workspaces->get(ws); p && e.ok() && e->has_value()) {
      cvm::v1::WorkspaceRecord rec;
      if (rec.ParseFromString((*e)->value) && rec.phase_times_size() == 3) {
        p->prepare_ms.push_back(
            static_cast<double>(rec.phase_times(1).unix_ms() - rec.phase_times(0).unix_ms()));
        p->start_ms.push_back(
            static_cast<double>(rec.phase_times(2).unix_ms() - rec.phase_times(1).unix_ms()));
      }
    }
    return ms;
  };
  // DELETE through the agent (its container may already be gone): overlay, files, ID range freed.
  const auto agent_delete = [&](const std::string& ws) {
    const std::string build = "b-" + ws + "-del";
    assign(build, ws, cvm::v1::DELETE);
    cvm::test::wait_until([&] { return phase_of(build) == cvm::v1::STOPPED; }, 60s);
  };
  // The same two bundles with raw runc, from the state the agent's launch started from (header).
  const auto raw_run = [&](const std::string& ws, bool caching, Path& p) -> std::optional<double> {
    const std::string dir = state + "/workspaces/" + ws;
    run_command({"runc", "--root", agent_root, "delete", "-f", "cvm-" + ws});
    if (!reset_bundles(dir, caching, caching ? cached_rootfs_of(state + "/image-cache") : ""))
      return std::nullopt;
    const std::string raw_id = "raw-" + ws;
    StatusWatch watch(dir + "/run");
    settle();
    const auto t0 = Steady::now();
    const int rc = runc_run_detached(raw_root, dir + "/supervisor", raw_id, dir + "/raw.log");
    p.raw_runc_ms.push_back(ms_since(t0));
    const bool ok = rc == 0 && watch.wait_running(60s);
    const double ms = ms_since(t0);
    if (ok && watch.noticed_after_ms >= 0) p.raw_notice_ms.push_back(watch.noticed_after_ms);
    if (!ok) {
      std::cerr << "raw runc run of " << dir << " failed (exit " << rc
                << "): " << read_file(dir + "/raw.log") << read_file(dir + "/run/status.json")
                << "\n";
    }
    run_command({"runc", "--root", raw_root, "delete", "-f", raw_id});
    if (!ok) return std::nullopt;
    return ms;
  };
  const auto one = [&](Path& p, int i) -> bool {
    const std::string ws = std::string(p.caching ? "on" : "off") + std::to_string(i);
    std::optional<double> agent_ms;
    std::optional<double> raw_ms;
    if (i % 2 == 0) {
      agent_ms = agent_launch(ws, p.caching, &p);
      if (!agent_ms) return false;
      raw_ms = raw_run(ws, p.caching, p);
      agent_delete(ws);
    } else {
      // Raw first: on the bundles of an unmeasured launch of another workspace.
      const std::string donor = ws + "-raw";
      if (!agent_launch(donor, p.caching, nullptr)) return false;
      raw_ms = raw_run(donor, p.caching, p);
      agent_delete(donor);
      if (!raw_ms) return false;
      agent_ms = agent_launch(ws, p.caching, &p);
      agent_delete(ws);
    }
    if (!agent_ms || !raw_ms) return false;
    p.agent_ms.push_back(*agent_ms);
    p.raw_ms.push_back(*raw_ms);
    return true;
  };
  for (int i = 0; i < iterations; ++i) {
    // Interleaved, so that both paths see the same machine load.
    if (paths != "on" && !one(off, i)) return 1;
    if (paths != "off" && !one(on, i)) return 1;
  }
  // Idle again: nothing running, a few heartbeats later.
  std::this_thread::sleep_for(3s);
  const long rss_idle = rss_kib(agent.pid());

  const auto range = [](const std::vector<double>& v) {
    if (v.empty()) return std::make_pair(0.0, 0.0);
    return std::make_pair(*std::min_element(v.begin(), v.end()),
                          *std::max_element(v.begin(), v.end()));
  };
  // Caching off (the default) under the labels scripts already parse.
  const double agent_median = median(off.agent_ms);
  const double raw_median = median(off.raw_ms);
  std::printf(
      "iterations                         %d (each path; interleaved; agent first in even\n"
      "                                   ones, raw first in odd ones)\n",
      iterations);
  std::printf("work dir filesystem                %s\n", describe_filesystem(work).c_str());
  // A path not run (--paths) prints nothing rather than ratios of empty samples.
  if (paths != "on") {
    std::printf("Caching off (native unpack onto the workspace's ID range):\n");
    std::printf("assignment -> RUNNING (agent)      median %.1f ms  min %.1f  max %.1f\n",
                agent_median, range(off.agent_ms).first, range(off.agent_ms).second);
    std::printf("raw runc run, same two bundles     median %.1f ms  min %.1f  max %.1f\n",
                raw_median, range(off.raw_ms).first, range(off.raw_ms).second);
    std::printf("median ratio agent / raw           %.2f  (target <= 1.25)\n",
                agent_median / raw_median);
    std::printf("  agent's own threads: on CPU %.1f ms, runnable waiting %.1f ms (medians)\n",
                median(off.agent_cpu_ms), median(off.agent_wait_ms));
    std::printf(
        "  assignment -> PREPARING received median %.1f ms (delivery, ID range, in-flight)\n",
        median(off.preparing_ms));
    std::printf(
        "  of which PREPARING -> STARTING   median %.1f ms (image unpack onto the ID range)\n",
        median(off.prepare_ms));
    std::printf(
        "  of which STARTING -> RUNNING     median %.1f ms (runc + cvm-supervisor + runc)\n",
        median(off.start_ms));
    std::printf(
        "  raw: runc run exits after        median %.1f ms (then the supervisor's report)\n",
        median(off.raw_runc_ms));
    std::printf("  raw: report read after written   median %.2f ms (the agent's: its debug log)\n",
                median(off.raw_notice_ms));
  }
  if (paths != "off") {
    const double on_agent = median(on.agent_ms);
    const double on_raw = median(on.raw_ms);
    std::printf(
        "Caching on (node cache through an ID-mapped overlay; the first launch fills it):\n");
    std::printf(
        "caching on: agent assignment->RUNNING  median %.1f ms  min %.1f  max %.1f  "
        "(first %.1f)\n",
        on_agent, range(on.agent_ms).first, range(on.agent_ms).second,
        on.agent_ms.empty() ? 0.0 : on.agent_ms.front());
    std::printf("caching on: raw runc, same bundles     median %.1f ms  min %.1f  max %.1f\n",
                on_raw, range(on.raw_ms).first, range(on.raw_ms).second);
    std::printf("caching on: median ratio agent/raw     %.2f  (target <= 1.25)\n",
                on_agent / on_raw);
    std::printf("caching on:   agent's own threads: on CPU %.1f ms, runnable waiting %.1f ms\n",
                median(on.agent_cpu_ms), median(on.agent_wait_ms));
    std::printf("caching on:   assignment -> PREPARING  median %.1f ms\n", median(on.preparing_ms));
    std::printf(
        "caching on:   PREPARING -> STARTING    median %.1f ms (cache lookup, ID-mapped "
        "overlay mount, specs)\n",
        median(on.prepare_ms));
    std::printf("caching on:   STARTING -> RUNNING      median %.1f ms\n", median(on.start_ms));
    std::printf("caching on:   raw: runc run exits after median %.1f ms\n", median(on.raw_runc_ms));
    std::printf("caching on:   raw: report read after written median %.2f ms\n",
                median(on.raw_notice_ms));
  }
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
