// End to end: a real nats-server, the three services and one node agent as processes, cvmctl as a
// user runs it, and real runc containers in a user namespace.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>

#include "child_process.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/test/files.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/build.pb.h"

namespace cvm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Counts of a metric in Prometheus text format (0 when absent).
double scrape(uint16_t port, const std::string& series) {
  auto r =
      run_command({"curl", "-sf", "http://127.0.0.1:" + std::to_string(port) + "/metrics"}, 10s);
  std::istringstream in(r.output);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return 0;
}

class BuildPath : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    image_dir_ =
        new std::string(fs::temp_directory_path() / ("cvm-e2e-image-" + std::to_string(getpid())));
    auto r = run_command({CVM_BUILD_IMAGE_SCRIPT, *image_dir_, "latest"}, 120s);
    image_ok_ = r.exit_code == 0;
    if (!image_ok_) image_error_ = new std::string(r.output);
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*image_dir_, ec);
    delete image_dir_;
    delete image_error_;
  }

  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root to run containers";
    if (run_command({"runc", "--version"}).exit_code != 0) GTEST_SKIP() << "runc is missing";
    ASSERT_TRUE(image_ok_) << (image_error_ ? *image_error_ : "");
    work_ = fs::temp_directory_path() / ("cvm-e2e-" + std::to_string(getpid()));
    fs::create_directories(work_);
    fs::permissions(work_, fs::perms(0755));
    ASSERT_TRUE(nats_.start().ok());
    scheduler_port_ = free_port();
    agent_port_ = free_port();
    const std::string url = nats_.url();
    scheduler_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{CVM_SCHEDULER_BIN, "--nats-url", url, "--metrics-listen",
                                 "127.0.0.1:" + std::to_string(scheduler_port_)},
        work_ + "/scheduler.log");
    broker_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{CVM_BROKER_BIN, "--nats-url", url, "--metrics-listen", "off"},
        work_ + "/broker.log");
    start_agent("agent.log");
    ASSERT_TRUE(wait_until([&] { return node_registered(); }, 30s)) << logs();
  }

  void start_agent(const std::string& log, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {CVM_AGENT_BIN,
                                     "--nats-url",
                                     nats_.url(),
                                     "--node-id",
                                     "e2e-node",
                                     "--state-dir",
                                     work_ + "/agent",
                                     "--runc-root",
                                     runc_root(),
                                     "--metrics-listen",
                                     "127.0.0.1:" + std::to_string(agent_port_),
                                     "--heartbeat-interval",
                                     "1",
                                     "--stop-grace",
                                     "2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    agent_ = std::make_unique<ChildProcess>(argv, work_ + "/" + log);
  }

  void TearDown() override {
    for (auto* p : {agent_.get(), scheduler_.get(), broker_.get()}) {
      if (p != nullptr) p->stop();
    }
    // Whatever a failed test left running must not outlive it.
    auto list = run_command({"runc", "--root", runc_root(), "list", "-q"});
    std::istringstream ids(list.output);
    for (std::string id; std::getline(ids, id);) {
      if (!id.empty()) run_command({"runc", "--root", runc_root(), "delete", "-f", id});
    }
    std::error_code ec;
    if (!HasFailure()) fs::remove_all(work_, ec);
  }

  std::string runc_root() const { return work_ + "/runc"; }

  // The cached Debian machine image (scripts/build-debian-image.sh): its directory.
  static std::string debian_cache() {
    const char* env = std::getenv("CVM_TEST_IMAGE_CACHE");
    return env != nullptr && *env != '\0' ? env : "/var/cache/cvm-control/images";
  }
  // Builds (or finds cached) the Debian image and boots a 1 GiB CVM of it owned by `owner`.
  void start_debian(const std::string& workspace, const std::string& owner) {
    const std::string cache = debian_cache();
    auto image = run_command({"/bin/sh", CVM_BUILD_DEBIAN_IMAGE_SCRIPT, cache, "debian"}, 900s);
    ASSERT_EQ(image.exit_code, 0) << "the Debian image: " << image.output;
    auto start =
        cvmctl({"build", "start", "--workspace", workspace, "--image", "oci:" + cache + ":debian",
                "--cvm", "--memory", "1Gi", "--owner", owner, "--watch", "--timeout", "300"});
    ASSERT_EQ(start.exit_code, 0) << start.output << logs();
  }
  std::string image_ref() const { return "oci:" + *image_dir_ + ":latest"; }

  std::string logs() const {
    std::string out;
    for (const auto* p : {scheduler_.get(), broker_.get(), agent_.get()}) {
      if (p != nullptr) out += "\n--- " + p->log_path() + "\n" + p->log_tail();
    }
    return out;
  }

  bool node_registered() {
    auto r = run_command({CVMCTL_BIN, "--nats-url", nats_.url(), "nodes"}, 10s);
    return r.exit_code == 0 && r.output.find("e2e-node") != std::string::npos;
  }

  CommandResult cvmctl(std::vector<std::string> args) {
    std::vector<std::string> argv = {CVMCTL_BIN, "--nats-url", nats_.url()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, 180s);
  }

  // cvmctl as `user` (without NATS users, a session's user is $USER), through a shell for pipes.
  std::vector<std::string> cvmctl_as(const std::string& user) const {
    return {"/usr/bin/env", "USER=" + user, CVMCTL_BIN, "--nats-url", nats_.url()};
  }
  CommandResult shell_as(const std::string& user, const std::string& pipeline) {
    std::string line = "export USER=" + user + "; CVMCTL='" + std::string(CVMCTL_BIN) +
                       " --nats-url " + nats_.url() + "'; " + pipeline;
    return run_command({"/bin/bash", "-o", "pipefail", "-c", line}, 300s);
  }

  // The host pid of the workspace's inner container init. runc (the agent's --root) knows the
  // supervising container "cvm-<ws>"; the inner init is its child that is PID 1 of its own PID
  // namespace (NSpid ends in 1).
  int container_pid(const std::string& workspace) {
    auto r = run_command({"runc", "--root", runc_root(), "state", "cvm-" + workspace});
    const auto at = r.output.find("\"pid\":");
    if (r.exit_code != 0 || at == std::string::npos) return 0;
    const std::string sup = std::to_string(std::stoi(r.output.substr(at + 6)));
    std::istringstream children(read_file("/proc/" + sup + "/task/" + sup + "/children"));
    for (int child = 0; children >> child;) {
      const std::string status = read_file("/proc/" + std::to_string(child) + "/status");
      const auto ns = status.find("NSpid:");
      if (ns == std::string::npos) continue;
      std::istringstream ids(status.substr(ns + 6, status.find('\n', ns) - ns - 6));
      std::vector<int> v;
      for (int id = 0; ids >> id;) v.push_back(id);
      if (v.size() >= 2 && v.back() == 1) return child;
    }
    return 0;
  }

  static inline std::string* image_dir_ = nullptr;
  static inline std::string* image_error_ = nullptr;
  static inline bool image_ok_ = false;
  std::string work_;
  NatsServer nats_;
  uint16_t scheduler_port_ = 0;
  uint16_t agent_port_ = 0;
  std::unique_ptr<ChildProcess> scheduler_;
  std::unique_ptr<ChildProcess> broker_;
  std::unique_ptr<ChildProcess> agent_;
};

TEST_F(BuildPath, StartsInAUserNamespaceStopsAndLeavesNothing) {
  auto start = cvmctl({"build", "start", "--workspace", "ws1", "--build-id", "b-start-1", "--image",
                       image_ref(), "--memory", "64Mi", "--watch", "--timeout", "120"});
  ASSERT_EQ(start.exit_code, 0) << start.output << logs();
  EXPECT_NE(start.output.find("SCHEDULED"), std::string::npos) << start.output;
  EXPECT_NE(start.output.find("PREPARING"), std::string::npos) << start.output;
  EXPECT_NE(start.output.find("STARTING"), std::string::npos) << start.output;
  EXPECT_NE(start.output.find("RUNNING"), std::string::npos) << start.output;

  const int pid = container_pid("ws1");
  ASSERT_GT(pid, 0) << logs();
  // Root inside is an unprivileged ID range outside: "0 <base> 65536" with base != 0.
  std::istringstream uid_map(read_file("/proc/" + std::to_string(pid) + "/uid_map"));
  uint64_t inside = 1;
  uint64_t outside = 0;
  uint64_t count = 0;
  uid_map >> inside >> outside >> count;
  EXPECT_EQ(inside, 0u);
  EXPECT_NE(outside, 0u) << "container root must not be host root";
  EXPECT_EQ(count, 65536u);
  // The memory limit reached the inner container's cgroup, below its supervisor's (v1 here).
  const std::string v1 = "/sys/fs/cgroup/memory/cvm/cvm-ws1/inner/memory.limit_in_bytes";
  if (fs::exists(v1)) {
    EXPECT_EQ(std::stoull(read_file(v1)), 64ULL << 20);
  }

  auto stop = cvmctl({"build", "stop", "--workspace", "ws1", "--watch", "--timeout", "60"});
  ASSERT_EQ(stop.exit_code, 0) << stop.output << logs();
  EXPECT_NE(stop.output.find("STOPPED"), std::string::npos) << stop.output;
  auto list = run_command({"runc", "--root", runc_root(), "list", "-q"});
  EXPECT_EQ(list.output, "") << "a container was left behind";

  auto del = cvmctl({"build", "delete", "--workspace", "ws1", "--watch", "--timeout", "60"});
  ASSERT_EQ(del.exit_code, 0) << del.output << logs();
  EXPECT_FALSE(fs::exists(work_ + "/agent/workspaces/ws1")) << "DELETE keeps the bundle";
}

TEST_F(BuildPath, DuplicateSubmitRunsOnce) {
  auto first = cvmctl({"build", "start", "--workspace", "dup", "--build-id", "b-dup", "--image",
                       image_ref(), "--watch", "--timeout", "120"});
  ASSERT_EQ(first.exit_code, 0) << first.output << logs();
  const int pid = container_pid("dup");
  ASSERT_GT(pid, 0);

  // Same build id again through cvmctl: JetStream's duplicate window drops it.
  auto again = cvmctl(
      {"build", "start", "--workspace", "dup", "--build-id", "b-dup", "--image", image_ref()});
  EXPECT_EQ(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("duplicate"), std::string::npos) << again.output;

  // Same build id under another Nats-Msg-Id gets past the stream; the scheduler must drop it.
  boost::asio::io_context io;
  auto conn = bus::Connection::connect({.url = nats_.url()}, io.get_executor());
  ASSERT_TRUE(conn.ok());
  cvm::v1::BuildRequest req;
  req.set_build_id("b-dup");
  req.set_workspace_id("dup");
  req.set_image(image_ref());
  ASSERT_TRUE(
      (*conn)
          ->js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(), "b-dup-resent")
          .ok());
  ASSERT_TRUE(wait_until(
      [&] { return scrape(scheduler_port_, "cvm_scheduler_builds_duplicate_total") >= 1; }, 20s))
      << logs();
  EXPECT_EQ(container_pid("dup"), pid) << "the workspace was launched again";
  EXPECT_EQ(scrape(agent_port_, "cvm_agent_launches_total{result=\"running\"}"), 1);
}

TEST_F(BuildPath, BadInputIsTerminatedAnsweredAndCounted) {
  boost::asio::io_context io;
  auto conn = bus::Connection::connect({.url = nats_.url()}, io.get_executor());
  ASSERT_TRUE(conn.ok());
  // Undecodable bytes with a readable build id in the header: answered with INVALID_REQUEST.
  ASSERT_TRUE(
      (*conn)
          ->js_publish(std::string(wire::kBuildsSubmit), "\xff\xff\xff not protobuf", "bad-1")
          .ok());
  // A request without a workspace: answered too.
  cvm::v1::BuildRequest no_ws;
  no_ws.set_build_id("bad-2");
  no_ws.set_image(image_ref());
  ASSERT_TRUE(
      (*conn)->js_publish(std::string(wire::kBuildsSubmit), no_ws.SerializeAsString(), "").ok());
  // Garbage with nothing to answer to: terminated and counted only.
  ASSERT_TRUE((*conn)->js_publish(std::string(wire::kBuildsSubmit), "\x08\x96", "").ok());

  for (const std::string id : {"bad-1", "bad-2"}) {
    std::optional<bus::Message> last;
    ASSERT_TRUE(wait_until(
        [&] {
          auto m = (*conn)->last_message(std::string(wire::kStreamEvents),
                                         wire::build_events_subject(id));
          if (m.ok() && m->has_value()) last = **m;
          return last.has_value();
        },
        20s))
        << id << logs();
    cvm::v1::BuildEvent e;
    ASSERT_TRUE(e.ParseFromString(last->data));
    EXPECT_EQ(e.phase(), cvm::v1::FAILED) << id;
    EXPECT_EQ(e.reason(), cvm::v1::INVALID_REQUEST) << id;
    EXPECT_FALSE(e.message().empty());
  }
  ASSERT_TRUE(wait_until(
      [&] { return scrape(scheduler_port_, "cvm_scheduler_builds_invalid_total") >= 3; }, 20s))
      << logs();
  // Terminated, not redelivered in a loop: the count stays at 3.
  std::this_thread::sleep_for(3s);
  EXPECT_EQ(scrape(scheduler_port_, "cvm_scheduler_builds_invalid_total"), 3);
  EXPECT_TRUE(scheduler_->running());

  // And a request that fits no node says why.
  auto huge = cvmctl({"build", "start", "--workspace", "huge", "--image", image_ref(), "--memory",
                      "100Ti", "--watch", "--timeout", "60"});
  EXPECT_EQ(huge.exit_code, 1) << huge.output;
  EXPECT_NE(huge.output.find("NO_ELIGIBLE_NODE"), std::string::npos) << huge.output;
  EXPECT_NE(huge.output.find("0/1 nodes fit: 1 insufficient memory"), std::string::npos)
      << huge.output;
}

TEST_F(BuildPath, ServicesSurviveANatsRestart) {
  nats_.stop();
  std::this_thread::sleep_for(2s);
  EXPECT_TRUE(scheduler_->running());
  EXPECT_TRUE(broker_->running());
  EXPECT_TRUE(agent_->running());
  ASSERT_TRUE(nats_.start().ok());
  ASSERT_TRUE(wait_until([&] { return node_registered(); }, 30s)) << logs();
  auto start = cvmctl({"build", "start", "--workspace", "after", "--image", image_ref(), "--watch",
                       "--timeout", "120"});
  ASSERT_EQ(start.exit_code, 0) << start.output << logs();
  auto del = cvmctl({"build", "delete", "--workspace", "after", "--watch", "--timeout", "60"});
  ASSERT_EQ(del.exit_code, 0) << del.output << logs();
}

// `cvmctl logs` over the bus: a Debian workspace's systemd boot as its console printed it, to its
// owner and the admins only, the last lines only, a follower that sees new console output and
// ends when the workspace is deleted, and the log still there after STOP.
TEST_F(BuildPath, LogsShowTheConsoleOfADebianWorkspaceAndFollowIt) {
  ASSERT_NO_FATAL_FAILURE(start_debian("deb", "alice"));
  // Listed with its owner; another owner's list leaves it out.
  auto mine = cvmctl({"workspaces", "--owner", "alice"});
  ASSERT_EQ(mine.exit_code, 0) << mine.output;
  EXPECT_NE(mine.output.find("deb "), std::string::npos) << mine.output;
  EXPECT_NE(mine.output.find("RUNNING"), std::string::npos) << mine.output;
  EXPECT_NE(mine.output.find("e2e-node"), std::string::npos) << mine.output;
  EXPECT_NE(mine.output.find("1.0Gi"), std::string::npos) << mine.output;
  auto theirs = cvmctl({"workspaces", "--owner", "bob"});
  EXPECT_EQ(theirs.output.find("deb "), std::string::npos) << theirs.output;

  // Her console is hers (and the admins'): logs run as alice.
  auto as_alice = [&](std::vector<std::string> args) {
    auto argv = cvmctl_as("alice");
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, 180s);
  };
  CommandResult all;
  ASSERT_TRUE(wait_until(
      [&] {
        all = as_alice({"logs", "deb"});
        return all.exit_code == 0 && all.output.find("multi-user.target") != std::string::npos;
      },
      90s))
      << all.output << logs();
  EXPECT_NE(all.output.find("Welcome to"), std::string::npos) << all.output;
  auto bob = shell_as("bob", "$CVMCTL logs deb");
  EXPECT_EQ(bob.exit_code, 3) << bob.output;
  EXPECT_NE(bob.output.find("belongs to alice, not to bob"), std::string::npos) << bob.output;
  EXPECT_EQ(bob.output.find("Welcome to"), std::string::npos) << bob.output;
  auto admin = shell_as("cvmctl", "$CVMCTL logs deb --tail 1");
  EXPECT_EQ(admin.exit_code, 0) << admin.output;

  auto tail = as_alice({"logs", "deb", "--tail", "2"});
  ASSERT_EQ(tail.exit_code, 0) << tail.output;
  EXPECT_EQ(std::count(tail.output.begin(), tail.output.end(), '\n'), 2) << tail.output;

  auto follow_argv = cvmctl_as("alice");
  follow_argv.insert(follow_argv.end(), {"logs", "deb", "-f", "--tail", "0"});
  ChildProcess follower(follow_argv, work_ + "/follow.log");
  const int pid = container_pid("deb");
  ASSERT_GT(pid, 0);
  // Something new on the console, written from outside through the workspace's own /dev/console.
  // Written again each second: a mark written before the follower's first read is old output,
  // which --tail 0 rightly leaves out.
  bool seen = false;
  for (int i = 0; i < 20 && !seen; ++i) {
    auto wrote = run_command({"nsenter", "-t", std::to_string(pid), "-m", "--", "/bin/sh", "-c",
                              "echo cvm-follow-mark > /dev/console"});
    ASSERT_EQ(wrote.exit_code, 0) << wrote.output;
    seen = wait_until(
        [&] { return read_file(follower.log_path()).find("cvm-follow-mark") != std::string::npos; },
        1s);
  }
  EXPECT_TRUE(seen) << read_file(follower.log_path());
  EXPECT_EQ(read_file(follower.log_path()).find("Welcome to"), std::string::npos)
      << "--tail 0 printed old output";

  auto stop = cvmctl({"build", "stop", "--workspace", "deb", "--watch", "--timeout", "60"});
  ASSERT_EQ(stop.exit_code, 0) << stop.output << logs();
  auto after = as_alice({"logs", "deb"});
  EXPECT_EQ(after.exit_code, 0) << after.output;
  EXPECT_NE(after.output.find("cvm-follow-mark"), std::string::npos) << "gone after STOP";
  EXPECT_TRUE(follower.running()) << "a stopped workspace may start again: keep following";

  auto del = cvmctl({"build", "delete", "--workspace", "deb", "--watch", "--timeout", "60"});
  ASSERT_EQ(del.exit_code, 0) << del.output << logs();
  EXPECT_TRUE(wait_until([&] { return !follower.running(); }, 10s)) << "the follower did not end";
  auto gone = cvmctl({"logs", "deb"});
  EXPECT_EQ(gone.exit_code, 5) << gone.output;
  EXPECT_NE(gone.output.find("no workspace deb"), std::string::npos) << gone.output;
  auto bad = cvmctl({"logs", "../etc"});
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
}

// A CPU request is what the workspace's own programs see: nproc and `docker info` (both size
// themselves by sched_getaffinity) show the requested CPUs, not the node's; two 1-CPU workspaces
// are pinned to different CPUs.
TEST_F(BuildPath, ACpuRequestIsTheCpuCountInsideTheWorkspace) {
  const long node_cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  ASSERT_GE(node_cpus, 2) << "needs a node with 2 CPUs to tell a pin from none";
  const std::string cache = debian_cache();
  auto image = run_command({"/bin/sh", CVM_BUILD_DEBIAN_IMAGE_SCRIPT, cache, "debian"}, 900s);
  ASSERT_EQ(image.exit_code, 0) << "the Debian image: " << image.output;
  for (const std::string ws : {"cpu-a", "cpu-b"}) {
    auto start = cvmctl({"build", "start", "--workspace", ws, "--image", "oci:" + cache + ":debian",
                         "--cvm", "--cpu", "1", "--memory", "1Gi", "--watch", "--timeout", "300"});
    ASSERT_EQ(start.exit_code, 0) << start.output << logs();
  }
  auto inside = [&](const std::string& ws, const std::string& command) {
    const int pid = container_pid(ws);
    EXPECT_GT(pid, 0) << ws;
    return run_command({"nsenter", "-t", std::to_string(pid), "-a", "/usr/bin/env", "-i",
                        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "/bin/sh", "-c", command},
                       120s);
  };
  auto trim = [](std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s;
  };
  // nsenter joins the namespaces, not the cgroup: run through the workspace's systemd, whose
  // services live in its cgroup (and cpuset).
  const std::string booted =
      "for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 0.1; done; "
      "timeout 90 systemctl is-system-running --wait >/dev/null; ";
  auto nproc = inside("cpu-a", booted + "systemd-run --wait --pipe --quiet nproc");
  EXPECT_EQ(trim(nproc.output), "1") << nproc.output;
  auto ncpu = inside("cpu-a",
                     "timeout 60 sh -c 'until docker info >/dev/null 2>&1; do sleep 0.5; done'; "
                     "docker info --format '{{.NCPU}}'");
  EXPECT_EQ(trim(ncpu.output), "1") << ncpu.output;
  auto listed = cvmctl({"-o", "json", "workspaces", "--node", "e2e-node"});
  EXPECT_NE(listed.output.find("\"cpuset\""), std::string::npos) << listed.output;
  // The node's own view of the two pins: one CPU each, not the same one.
  const std::string a = trim(read_file("/sys/fs/cgroup/cpuset/cvm/cvm-cpu-a/cpuset.cpus"));
  const std::string b = trim(read_file("/sys/fs/cgroup/cpuset/cvm/cvm-cpu-b/cpuset.cpus"));
  if (fs::exists("/sys/fs/cgroup/cpuset/cvm")) {
    EXPECT_EQ(a.find_first_of(",-"), std::string::npos) << a;
    EXPECT_FALSE(a.empty());
    EXPECT_NE(a, b) << "both pinned to CPU " << a;
  }
  for (const std::string ws : {"cpu-a", "cpu-b"}) {
    auto del = cvmctl({"build", "delete", "--workspace", ws, "--watch", "--timeout", "60"});
    EXPECT_EQ(del.exit_code, 0) << del.output << logs();
  }
}

// cvmctl exec and shell over the bus into a Debian workspace booted with systemd: inside the
// workspace's own container, exit status, stderr, users and groups from the image, a 200 MB binary
// stream intact, owner-only access, a terminal driven through tmux (resize, ^C), SIGHUP when the
// client vanishes, and a clear end when the agent stops or the workspace stops.
TEST_F(BuildPath, ExecAndShellRunInsideADebianWorkspaceOverTheBus) {
  if (run_command({"tmux", "-V"}).exit_code != 0) GTEST_SKIP() << "tmux is missing";
  ASSERT_NO_FATAL_FAILURE(start_debian("sh1", "alice"));

  // The remote exit status is cvmctl's; stdout and stderr stay apart.
  auto status = shell_as("alice",
                         "$CVMCTL exec sh1 -- sh -c 'echo out; echo err >&2; exit 7' "
                         "2>" +
                             work_ + "/err.txt");
  EXPECT_EQ(status.exit_code, 7) << status.output << logs();
  EXPECT_EQ(status.output, "out\n");
  EXPECT_EQ(read_file(work_ + "/err.txt"), "err\n");

  // Inside the workspace's container: its user namespace (uid 0 is not the node's), its hostname.
  auto inside = shell_as("alice",
                         "$CVMCTL exec sh1 -- sh -c 'cat /proc/self/uid_map; hostname; "
                         "grep NoNewPrivs /proc/self/status /proc/1/status'");
  ASSERT_EQ(inside.exit_code, 0) << inside.output;
  std::istringstream map(inside.output);
  uint64_t in = 1, out = 0, count = 0;
  map >> in >> out >> count;
  EXPECT_EQ(in, 0u);
  EXPECT_NE(out, 0u) << inside.output;
  EXPECT_NE(inside.output.find("\nsh1\n"), std::string::npos) << inside.output;
  // sudo works in sessions and in what systemd starts: no_new_privs is set on neither.
  EXPECT_NE(inside.output.find("/proc/self/status:NoNewPrivs:\t0"), std::string::npos)
      << inside.output;
  EXPECT_NE(inside.output.find("/proc/1/status:NoNewPrivs:\t0"), std::string::npos)
      << inside.output;

  // The image's user dev, with its groups (sudo, docker) and home; sudo works for it.
  auto dev =
      shell_as("alice", "$CVMCTL exec -u dev sh1 -- sh -c 'id -un; id -Gn; pwd; sudo -n id -u'");
  ASSERT_EQ(dev.exit_code, 0) << dev.output;
  EXPECT_NE(dev.output.find("dev\n"), std::string::npos) << dev.output;
  EXPECT_NE(dev.output.find("sudo"), std::string::npos) << dev.output;
  EXPECT_NE(dev.output.find("docker"), std::string::npos) << dev.output;
  EXPECT_NE(dev.output.find("/home/dev\n"), std::string::npos) << dev.output;
  EXPECT_NE(dev.output.find("\n0\n"), std::string::npos) << "sudo: " << dev.output;
  auto nobody = shell_as("alice", "$CVMCTL exec -u nobody-here sh1 -- true");
  EXPECT_EQ(nobody.exit_code, 255) << nobody.output;
  EXPECT_NE(nobody.output.find("/etc/passwd"), std::string::npos) << nobody.output;

  // 200 MB of random bytes through stdin and back out through cat: the same checksum.
  const std::string blob = work_ + "/blob";
  ASSERT_EQ(run_command({"/bin/sh", "-c", "head -c 200M /dev/urandom > " + blob}).exit_code, 0);
  auto want = run_command({"/bin/sh", "-c", "sha256sum < " + blob});
  auto through = shell_as("alice", "$CVMCTL exec -i sh1 -- cat < " + blob + " | sha256sum");
  ASSERT_EQ(through.exit_code, 0) << through.output << logs();
  EXPECT_EQ(through.output, want.output);
  std::filesystem::remove(blob);

  // Only the owner and the admins may enter.
  auto bob = shell_as("bob", "$CVMCTL exec sh1 -- true");
  EXPECT_EQ(bob.exit_code, 255) << bob.output;
  EXPECT_NE(bob.output.find("belongs to alice, not to bob"), std::string::npos) << bob.output;
  EXPECT_EQ(shell_as("cvmctl", "$CVMCTL exec sh1 -- true").exit_code, 0) << "the admin";
  auto missing = shell_as("alice", "$CVMCTL exec nope -- true");
  EXPECT_EQ(missing.exit_code, 255) << missing.output;

  // A terminal: cvmctl shell under tmux, typed into and read back as a user sees it.
  const std::string tmux_sock = work_ + "/tmux.sock";
  auto tmux = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = {"tmux", "-S", tmux_sock};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, 10s);
  };
  auto pane = [&] { return tmux({"capture-pane", "-p", "-t", "t"}).output; };
  const std::string shell_cmd = "env USER=alice " + std::string(CVMCTL_BIN) + " --nats-url " +
                                nats_.url() + " shell sh1; echo EXITED $?; sleep 60";
  ASSERT_EQ(tmux({"new-session", "-d", "-s", "t", "-x", "120", "-y", "40", shell_cmd}).exit_code,
            0);
  tmux({"send-keys", "-t", "t", "echo $((6*7))-$TERM; stty size; whoami", "Enter"});
  EXPECT_TRUE(wait_until([&] { return pane().find("40 120") != std::string::npos; }, 20s))
      << pane() << logs();
  EXPECT_NE(pane().find("42-"), std::string::npos) << pane();
  EXPECT_NE(pane().find("root"), std::string::npos) << pane();
  tmux({"resize-window", "-t", "t", "-x", "100", "-y", "30"});
  tmux({"send-keys", "-t", "t", "clear; stty size", "Enter"});
  EXPECT_TRUE(wait_until([&] { return pane().find("30 100") != std::string::npos; }, 10s))
      << pane();
  tmux({"send-keys", "-t", "t", "clear; sleep 600", "Enter"});
  std::this_thread::sleep_for(1s);
  tmux({"send-keys", "-t", "t", "C-c"});
  tmux({"send-keys", "-t", "t", "echo after-$((1+1)); exit 7", "Enter"});
  EXPECT_TRUE(wait_until([&] { return pane().find("EXITED 7") != std::string::npos; }, 20s))
      << pane();
  EXPECT_NE(pane().find("after-2"), std::string::npos) << "^C did not stop sleep: " << pane();
  tmux({"kill-server"});

  // A client that vanishes: its process gets SIGHUP once three heartbeats were missed.
  auto argv = cvmctl_as("alice");
  argv.insert(argv.end(), {"exec", "sh1", "--", "sh", "-c",
                           "trap 'echo hup > /run/hup-mark; exit 0' HUP; "
                           "while true; do sleep 0.2; done"});
  {
    ChildProcess client(argv, work_ + "/client.log");
    std::this_thread::sleep_for(2s);
    client.kill9();
  }
  CommandResult mark;
  EXPECT_TRUE(wait_until(
      [&] {
        mark = shell_as("alice", "$CVMCTL exec sh1 -- cat /run/hup-mark");
        return mark.exit_code == 0 && mark.output == "hup\n";
      },
      20s))
      << mark.output << logs();

  // The agent stops: a running session ends with a clear error, the workspace keeps running, and
  // the restarted agent lets users in again.
  argv = cvmctl_as("alice");
  argv.insert(argv.end(), {"exec", "sh1", "--", "sleep", "1000"});
  {
    ChildProcess client(argv, work_ + "/client2.log");
    std::this_thread::sleep_for(2s);
    agent_->stop();
    EXPECT_TRUE(wait_until([&] { return !client.running(); }, 10s));
    EXPECT_NE(read_file(client.log_path()).find("is stopping"), std::string::npos)
        << read_file(client.log_path());
  }
  start_agent("agent2.log");
  CommandResult again;
  EXPECT_TRUE(wait_until(
      [&] {
        again = shell_as("alice", "$CVMCTL exec sh1 -- echo back");
        return again.exit_code == 0;
      },
      30s))
      << again.output << logs();
  EXPECT_EQ(again.output, "back\n");
  EXPECT_TRUE(wait_until(
      [&] { return scrape(agent_port_, "cvm_agent_sessions_total{result=\"opened\"}") >= 1; },
      10s));

  // An agent killed with -9: the next one ends what its sessions left, a process that ignores
  // SIGHUP included. That agent has limits: one session per workspace, 6 s idle.
  auto ignorer = cvmctl_as("alice");
  ignorer.insert(ignorer.end(), {"exec", "sh1", "--", "sh", "-c",
                                 "trap '' HUP; echo $$ > /run/ignorer; "
                                 "while true; do sleep 0.2; done"});
  {
    ChildProcess client(ignorer, work_ + "/client-ignorer.log");
    ASSERT_TRUE(wait_until(
        [&] {
          return shell_as("alice", "$CVMCTL exec sh1 -- test -s /run/ignorer").exit_code == 0;
        },
        20s));
    agent_->kill9();
    start_agent("agent3.log", {"--sessions-per-workspace", "1", "--session-idle-timeout", "6"});
    CommandResult alive;
    EXPECT_TRUE(wait_until(
        [&] {
          alive = shell_as("alice", "$CVMCTL exec sh1 -- sh -c 'kill -0 $(cat /run/ignorer)'");
          return alive.exit_code == 1;
        },
        40s))
        << "the process that ignores SIGHUP outlived the killed agent: " << alive.output << logs();
  }
  {
    ChildProcess idle(argv, work_ + "/client-idle.log");
    ASSERT_TRUE(
        wait_until([&] { return scrape(agent_port_, "cvm_agent_sessions_open") == 1; }, 20s))
        << logs();
    auto second = shell_as("alice", "$CVMCTL exec sh1 -- true");
    EXPECT_EQ(second.exit_code, 255) << second.output;
    EXPECT_NE(second.output.find("at most 1"), std::string::npos) << second.output;
    EXPECT_TRUE(wait_until([&] { return !idle.running(); }, 20s)) << "never ended for idleness";
    EXPECT_NE(read_file(idle.log_path()).find("idle for 6 s"), std::string::npos)
        << read_file(idle.log_path());
  }
  agent_->stop();  // before the next one takes its metrics port
  start_agent("agent4.log");
  ASSERT_TRUE(
      wait_until([&] { return shell_as("alice", "$CVMCTL exec sh1 -- true").exit_code == 0; }, 30s))
      << logs();

  // STOP ends the sessions of the workspace, then the workspace.
  {
    ChildProcess client(argv, work_ + "/client3.log");
    std::this_thread::sleep_for(2s);
    auto stop = cvmctl({"build", "stop", "--workspace", "sh1", "--watch", "--timeout", "60"});
    ASSERT_EQ(stop.exit_code, 0) << stop.output << logs();
    EXPECT_TRUE(wait_until([&] { return !client.running(); }, 10s));
    EXPECT_NE(read_file(client.log_path()).find("sh1 is stopping"), std::string::npos)
        << read_file(client.log_path());
  }
  auto stopped = shell_as("alice", "$CVMCTL exec sh1 -- true");
  EXPECT_EQ(stopped.exit_code, 255);
  EXPECT_NE(stopped.output.find("not running"), std::string::npos) << stopped.output;
  auto del = cvmctl({"build", "delete", "--workspace", "sh1", "--watch", "--timeout", "60"});
  EXPECT_EQ(del.exit_code, 0) << del.output;
}

// TCP into a workspace over the bus: OpenSSH's sshd, started by the workspace's systemd, reached
// by a real ssh, scp and rsync through `cvmctl proxy` as ProxyCommand; and `cvmctl port-forward`
// carrying a local port to it. Nothing on the node listens for the workspace.
TEST_F(BuildPath, SshScpAndRsyncReachADebianWorkspaceThroughCvmctl) {
  if (run_command({"ssh", "-V"}).exit_code != 0) GTEST_SKIP() << "openssh-client is missing";
  ASSERT_NO_FATAL_FAILURE(start_debian("ssh1", "alice"));

  // A key for dev, put in place through exec as a user would; then sshd must be up.
  const std::string key = work_ + "/id_ed25519";
  ASSERT_EQ(run_command({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key}).exit_code, 0);
  auto installed = shell_as("alice",
                            "$CVMCTL exec -i -u dev ssh1 -- sh -c 'mkdir -p -m 700 "
                            "~/.ssh && cat > ~/.ssh/authorized_keys' < " +
                                key + ".pub");
  ASSERT_EQ(installed.exit_code, 0) << installed.output;
  CommandResult up;
  ASSERT_TRUE(wait_until(
      [&] {
        up = shell_as("alice", "$CVMCTL exec ssh1 -- systemctl is-active ssh");
        return up.output == "active\n";
      },
      90s))
      << up.output << logs();

  const std::string proxy = "ProxyCommand=env USER=alice " + std::string(CVMCTL_BIN) +
                            " --nats-url " + nats_.url() + " proxy %h 22";
  const std::string opts = "-o '" + proxy +
                           "' -o StrictHostKeyChecking=no -o UserKnownHostsFile=" + work_ +
                           "/known_hosts -o BatchMode=yes -i " + key;
  auto ssh = run_command(
      {"/bin/sh", "-c", "ssh " + opts + " dev@ssh1 'echo over-ssh; id -un; hostname' 2>&1"}, 60s);
  ASSERT_EQ(ssh.exit_code, 0) << ssh.output << logs();
  EXPECT_NE(ssh.output.find("over-ssh\ndev\nssh1\n"), std::string::npos) << ssh.output;

  // scp a 20 MB file in and back; rsync a tree in.
  const std::string file = work_ + "/payload";
  ASSERT_EQ(run_command({"/bin/sh", "-c", "head -c 20M /dev/urandom > " + file}).exit_code, 0);
  auto scp = run_command({"/bin/sh", "-c",
                          "scp -q " + opts + " " + file + " dev@ssh1:payload && scp -q " + opts +
                              " dev@ssh1:payload " + file + ".back && cmp " + file + " " + file +
                              ".back && echo same"},
                         120s);
  EXPECT_EQ(scp.exit_code, 0) << scp.output;
  EXPECT_NE(scp.output.find("same"), std::string::npos) << scp.output;
  const std::string tree = work_ + "/tree";
  fs::create_directories(tree + "/a/b");
  std::ofstream(tree + "/a/b/c.txt") << "rsynced\n";
  std::ofstream(tree + "/top.txt") << "top\n";
  auto rsync =
      run_command({"/bin/sh", "-c",
                   "rsync -a -e \"ssh " + opts + "\" " + tree + "/ dev@ssh1:tree/ && ssh " + opts +
                       " dev@ssh1 cat tree/a/b/c.txt tree/top.txt"},
                  120s);
  EXPECT_EQ(rsync.exit_code, 0) << rsync.output;
  EXPECT_NE(rsync.output.find("rsynced\ntop\n"), std::string::npos) << rsync.output;

  // port-forward: a local port to the workspace's sshd, whose banner comes back through it.
  ChildProcess forward({"/usr/bin/env", "USER=alice", CVMCTL_BIN, "--nats-url", nats_.url(),
                        "port-forward", "ssh1", "0:22"},
                       work_ + "/forward.log");
  uint16_t port = 0;
  ASSERT_TRUE(wait_until(
      [&] {
        const auto text = read_file(forward.log_path());
        const auto at = text.find("127.0.0.1:");
        if (at == std::string::npos) return false;
        port = static_cast<uint16_t>(std::stoi(text.substr(at + 10)));
        return port != 0;
      },
      10s))
      << read_file(forward.log_path());
  auto banner = run_command({"/bin/sh", "-c",
                             "ssh " + opts.substr(opts.find("-o StrictHostKeyChecking")) + " -p " +
                                 std::to_string(port) + " dev@127.0.0.1 echo via-forward 2>&1"},
                            60s);
  EXPECT_EQ(banner.exit_code, 0) << banner.output << read_file(forward.log_path());
  EXPECT_NE(banner.output.find("via-forward"), std::string::npos) << banner.output;
  // Nothing listens on a port: a clear refusal, not a hang.
  auto refused = shell_as("alice", "$CVMCTL proxy ssh1 1 < /dev/null");
  EXPECT_EQ(refused.exit_code, 255) << refused.output;
  EXPECT_NE(refused.output.find("nothing answers on port 1"), std::string::npos) << refused.output;
  // Another user's proxy is refused like an exec.
  auto bob = shell_as("bob", "$CVMCTL proxy ssh1 22 < /dev/null");
  EXPECT_EQ(bob.exit_code, 255);
  EXPECT_NE(bob.output.find("belongs to alice"), std::string::npos) << bob.output;
  forward.stop();
  auto del = cvmctl({"build", "delete", "--workspace", "ssh1", "--watch", "--timeout", "60"});
  EXPECT_EQ(del.exit_code, 0) << del.output;
}

}  // namespace
}  // namespace cvm::test
