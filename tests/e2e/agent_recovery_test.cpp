// The node agent as a process against a real nats-server and real runc: assignments published
// straight onto its work subject (no scheduler), events read back from CVM_EVENTS.
//   - kill -9 mid-launch, restart: exactly one running container or a FAILED event, and no orphan
//     bundle or ID range, well before the assignment's 120 s redelivery;
//   - restart reconciles runc with KV: adopts what runs, removes orphans, reports what was lost;
//   - docker:// images from Debian's docker-registry on a free loopback port: the node cache with
//     Caching on (reused with the registry gone), nothing kept with it off, IMAGE_UNAVAILABLE with
//     the tool's message.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "agent_helpers.h"
#include "child_process.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"
#include "cvm/test/build_events.h"
#include "cvm/test/files.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class AgentProcess : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    images_ =
        new TestImages(build_test_images(CVM_BUILD_IMAGE_SCRIPT, "cvm-agent-e2e-image", true));
  }
  static void TearDownTestSuite() {
    remove_test_images(*images_);
    delete images_;
  }

  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root to run containers";
    if (run_command({"runc", "--version"}).exit_code != 0) GTEST_SKIP() << "runc is missing";
    ASSERT_TRUE(images_->error.empty()) << images_->error;
    work_ = fs::temp_directory_path() / ("cvm-agent-e2e-" + std::to_string(getpid()));
    fs::remove_all(work_);
    fs::create_directories(work_);
    fs::permissions(work_, fs::perms(0755));
    ASSERT_TRUE(nats_.start().ok());
    auto conn = bus::Connection::connect({.url = nats_.url()}, io_.get_executor());
    ASSERT_TRUE(conn.ok());
    conn_ = *conn;
    ASSERT_TRUE(conn_->ensure_stream(service::node_work_stream()).ok());
    ASSERT_TRUE(conn_->ensure_stream(service::events_stream()).ok());
    auto kv = conn_->ensure_kv(service::workspaces_bucket());
    ASSERT_TRUE(kv.ok());
    workspaces_.emplace(std::move(*kv));
  }

  void TearDown() override {
    if (agent_) agent_->stop();
    auto list = run_command({"runc", "--root", runc_root(), "list", "-q"});
    std::istringstream ids(list.output);
    for (std::string id; std::getline(ids, id);) {
      if (!id.empty()) run_command({"runc", "--root", runc_root(), "delete", "-f", id});
    }
    if (registry_) registry_->stop();
    // Overlays of workspaces left running (Caching on): detached before the tree goes.
    for (const auto& m : mounts_below(work_)) run_command({"umount", "-l", m});
    std::error_code ec;
    if (!HasFailure()) fs::remove_all(work_, ec);
  }

  std::string runc_root() const { return work_ + "/runc"; }
  std::string state_dir() const { return work_ + "/agent"; }
  std::string image_ref() const { return "oci:" + images_->dir + ":latest"; }

  void start_agent(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {
        CVM_AGENT_BIN, "--nats-url",       nats_.url(), "--node-id",
        "n1",          "--state-dir",      state_dir(), "--runc-root",
        runc_root(),   "--metrics-listen", "off",       "--heartbeat-interval",
        "1",           "--stop-grace",     "2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    agent_ = std::make_unique<ChildProcess>(argv,
                                            work_ + "/agent-" + std::to_string(++starts_) + ".log");
  }

  // Waits until the agent started last has finished start() (reconcile included): its NodeStatus
  // carries a start time from after `since_ms`.
  bool wait_agent_ready(int64_t since_ms) {
    return cvm::test::wait_agent_ready(*conn_, "n1", since_ms);
  }
  static int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  std::string logs() const { return agent_ ? "\n--- agent log\n" + agent_->log_tail(6000) : ""; }

  void assign(const std::string& build, const std::string& ws, const std::string& image,
              bool caching = false, cvm::v1::Transition t = cvm::v1::START) {
    cvm::v1::NodeAssignment a;
    auto* req = a.mutable_request();
    req->set_build_id(build);
    req->set_workspace_id(ws);
    req->set_image(image);
    req->set_transition(t);
    req->mutable_resources()->set_memory_bytes(128ULL << 20);
    a.set_node_id("n1");
    a.set_cvm(true);
    a.set_caching(caching);
    ASSERT_TRUE(
        conn_->js_publish(wire::node_work_subject("n1"), a.SerializeAsString(), build).ok());
  }

  // The latest event of a build, if any.
  std::optional<cvm::v1::BuildEvent> last_event(const std::string& build) {
    return last_build_event(*conn_, build);
  }
  std::optional<cvm::v1::BuildEvent> wait_phase(const std::string& build,
                                                std::initializer_list<cvm::v1::Phase> phases,
                                                std::chrono::milliseconds timeout) {
    return wait_build_phase(*conn_, build, phases, timeout);
  }

  std::vector<std::string> containers() {
    auto r = run_command({"runc", "--root", runc_root(), "list", "-q"});
    std::vector<std::string> out;
    std::istringstream in(r.output);
    for (std::string id; std::getline(in, id);) {
      if (!id.empty()) out.push_back(id);
    }
    return out;
  }
  std::string container_status(const std::string& id) {
    auto r = run_command({"runc", "--root", runc_root(), "state", id});
    if (r.exit_code != 0) return "";
    return nlohmann::json::parse(r.output, nullptr, false).value("status", "");
  }
  int container_pid(const std::string& id) {
    auto r = run_command({"runc", "--root", runc_root(), "state", id});
    if (r.exit_code != 0) return 0;
    return nlohmann::json::parse(r.output, nullptr, false).value("pid", 0);
  }
  nlohmann::json id_ranges() {
    return nlohmann::json::parse(read_file(state_dir() + "/id-ranges.json"), nullptr, false);
  }
  std::optional<cvm::v1::WorkspaceRecord> record(const std::string& ws) {
    auto e = workspaces_->get(ws);
    if (!e.ok() || !e->has_value()) return std::nullopt;
    cvm::v1::WorkspaceRecord r;
    if (!r.ParseFromString((*e)->value)) return std::nullopt;
    return r;
  }
  // Mount points in the host's table at or below `dir` (the agent runs in this mount namespace).
  static std::vector<std::string> mounts_below(const std::string& dir) {
    std::vector<std::string> out;
    std::error_code ec;
    const std::string prefix = fs::weakly_canonical(dir, ec).string() + "/";
    std::istringstream in(read_file("/proc/self/mountinfo"));
    for (std::string line; std::getline(in, line);) {
      std::istringstream f(line);
      std::string id, parent, devno, root, point;
      f >> id >> parent >> devno >> root >> point;
      if (point.rfind(prefix, 0) == 0) out.push_back(point);
    }
    return out;
  }
  std::vector<std::string> unfinished_cache_entries() const {
    std::vector<std::string> out;
    std::error_code ec;
    for (fs::directory_iterator it(state_dir() + "/image-cache/rootfs", ec);
         !ec && it != fs::directory_iterator(); it.increment(ec)) {
      if (it->path().filename().string().rfind(".tmp-", 0) == 0) out.push_back(it->path());
    }
    return out;
  }
  bool inflight_empty() {
    std::error_code ec;
    return !fs::exists(state_dir() + "/inflight", ec) || fs::is_empty(state_dir() + "/inflight");
  }

  // Kill -9 once `phase` of the build is published (or one of `also`, when the launch is too quick
  // to be caught there), restart, and check the invariant. The big image keeps the launch busy:
  // with Caching on its first launch fills the node cache while PREPARING, with Caching off its
  // layers are applied while STARTING.
  void kill_at_and_restart(cvm::v1::Phase phase, const std::string& ws, bool caching = false,
                           std::initializer_list<cvm::v1::Phase> also = {}) {
    start_agent();
    const std::string build = "b-" + ws;
    assign(build, ws, "oci:" + images_->dir + ":big", caching);
    std::vector<cvm::v1::Phase> phases = {phase};
    phases.insert(phases.end(), also.begin(), also.end());
    ASSERT_TRUE(wait_until(
        [&] {
          auto e = last_event(build);
          return e && std::find(phases.begin(), phases.end(), e->phase()) != phases.end();
        },
        60s))
        << logs();
    agent_->kill9();
    const auto t0 = std::chrono::steady_clock::now();
    start_agent();
    // Well inside the 120 s ack wait: the restarted agent settles it without a redelivery.
    auto end = wait_phase(build, {cvm::v1::RUNNING, cvm::v1::FAILED}, 60s);
    ASSERT_TRUE(end) << logs();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 60s);
    const auto ranges = id_ranges()["ranges"];
    if (end->phase() == cvm::v1::RUNNING) {
      EXPECT_EQ(containers(), std::vector<std::string>{"cvm-" + ws}) << logs();
      EXPECT_EQ(container_status("cvm-" + ws), "running");
      EXPECT_EQ(ranges.size(), 1u) << ranges.dump();
      EXPECT_TRUE(ranges.contains(ws));
      auto r = record(ws);
      ASSERT_TRUE(r);
      EXPECT_EQ(r->phase(), cvm::v1::RUNNING);
    } else {
      EXPECT_EQ(end->reason(), cvm::v1::RUNTIME_ERROR);
      EXPECT_NE(end->message().find("restarted during the launch"), std::string::npos)
          << end->message();
      EXPECT_TRUE(containers().empty()) << logs();
      EXPECT_FALSE(fs::exists(state_dir() + "/workspaces/" + ws)) << "orphan bundle";
      EXPECT_TRUE(ranges.empty()) << "orphan ID range: " << ranges.dump();
    }
    EXPECT_TRUE(inflight_empty());
    // No mount of a failed launch stays behind (Caching on mounts an overlay per workspace); a
    // running one keeps exactly its rootfs.
    const auto mounts = mounts_below(state_dir() + "/workspaces");
    if (end->phase() == cvm::v1::RUNNING) {
      EXPECT_LE(mounts.size(), 1u);
    } else {
      EXPECT_TRUE(mounts.empty()) << mounts.front();
    }
    std::cout << "kill -9 at " << cvm::v1::Phase_Name(phase) << ": the build ended "
              << cvm::v1::Phase_Name(end->phase()) << "\n";
  }

  static inline TestImages* images_ = nullptr;
  std::string work_;
  NatsServer nats_;
  boost::asio::io_context io_;
  bus::ConnectionPtr conn_;
  std::optional<bus::KeyValue> workspaces_;
  std::unique_ptr<ChildProcess> agent_;
  std::unique_ptr<ChildProcess> registry_;
  int starts_ = 0;
};

TEST_F(AgentProcess, KillNineWhileStartingWithCachingOnLeavesNoMount) {
  // STARTING is short with a warm cache (runc only): RUNNING may come first.
  kill_at_and_restart(cvm::v1::STARTING, "k-cache", /*caching=*/true, {cvm::v1::RUNNING});
}

TEST_F(AgentProcess, KillNineWhilePreparingThenRestart) {
  // Caching on: the first launch of the big image fills the node cache while PREPARING.
  kill_at_and_restart(cvm::v1::PREPARING, "k-prep", /*caching=*/true);
  EXPECT_TRUE(unfinished_cache_entries().empty()) << "a half-unpacked cache entry was kept";
}

TEST_F(AgentProcess, KillNineWhileStartingThenRestart) {
  kill_at_and_restart(cvm::v1::STARTING, "k-start");
}

TEST_F(AgentProcess, RestartAdoptsRemovesOrphansAndReportsLost) {
  start_agent();
  for (const std::string ws : {"keep", "orphan", "lost"}) {
    assign("b-" + ws, ws, image_ref());
    auto e = wait_phase("b-" + ws, {cvm::v1::RUNNING, cvm::v1::FAILED}, 60s);
    ASSERT_TRUE(e && e->phase() == cvm::v1::RUNNING) << ws << logs();
  }
  const int keep_pid = container_pid("cvm-keep");
  ASSERT_GT(keep_pid, 0);
  agent_->stop();
  // While the agent is away: one workspace's desired state disappears (its container is now an
  // orphan), another's container is killed (lost).
  ASSERT_TRUE(workspaces_->erase("orphan").ok());
  ASSERT_EQ(run_command({"runc", "--root", runc_root(), "delete", "-f", "cvm-lost"}).exit_code, 0);

  const int64_t restart_ms = now_ms();
  start_agent();
  ASSERT_TRUE(wait_agent_ready(restart_ms)) << logs();
  auto lost = record("lost");
  ASSERT_TRUE(lost);
  EXPECT_EQ(lost->phase(), cvm::v1::FAILED);
  EXPECT_EQ(lost->reason(), cvm::v1::NODE_LOST);
  EXPECT_NE(lost->message().find("no longer running"), std::string::npos) << lost->message();
  EXPECT_EQ(containers(), std::vector<std::string>{"cvm-keep"});
  EXPECT_EQ(container_pid("cvm-keep"), keep_pid) << "adopted, not relaunched";
  EXPECT_FALSE(fs::exists(state_dir() + "/workspaces/orphan"));
  const auto ranges = id_ranges()["ranges"];
  EXPECT_TRUE(ranges.contains("keep"));
  EXPECT_TRUE(ranges.contains("lost")) << "the lost workspace keeps its files and range";
  EXPECT_FALSE(ranges.contains("orphan"));

  // The adopted workspace is still managed: STOP and DELETE work, the range is freed.
  assign("b-keep-del", "keep", "", false, cvm::v1::DELETE);
  auto del = wait_phase("b-keep-del", {cvm::v1::STOPPED, cvm::v1::FAILED}, 60s);
  ASSERT_TRUE(del && del->phase() == cvm::v1::STOPPED) << logs();
  EXPECT_TRUE(containers().empty());
  EXPECT_FALSE(fs::exists(state_dir() + "/workspaces/keep"));
  EXPECT_FALSE(id_ranges()["ranges"].contains("keep"));
}

TEST_F(AgentProcess, RestartAdoptsALaunchThatHadStartedAndAnswersTheRedelivery) {
  start_agent();
  assign("b-adopt", "adopt", image_ref());
  auto e = wait_phase("b-adopt", {cvm::v1::RUNNING, cvm::v1::FAILED}, 60s);
  ASSERT_TRUE(e && e->phase() == cvm::v1::RUNNING) << logs();
  const int pid = container_pid("cvm-adopt");
  agent_->kill9();
  // The state of a crash right after the container started: the in-flight record is still there
  // and the outcome never reached KV.
  ASSERT_TRUE(workspaces_->erase("adopt").ok());
  cvm::v1::NodeAssignment a;
  a.mutable_request()->set_build_id("b-adopt");
  a.mutable_request()->set_workspace_id("adopt");
  a.mutable_request()->set_image(image_ref());
  a.mutable_request()->set_transition(cvm::v1::START);
  a.set_node_id("n1");
  a.set_cvm(true);
  std::ofstream(state_dir() + "/inflight/adopt.pb", std::ios::binary) << a.SerializeAsString();

  const int64_t restart_ms = now_ms();
  start_agent();
  ASSERT_TRUE(wait_agent_ready(restart_ms)) << logs();
  auto r = record("adopt");
  ASSERT_TRUE(r) << logs();
  EXPECT_EQ(r->phase(), cvm::v1::RUNNING);
  EXPECT_EQ(r->build_id(), "b-adopt");
  EXPECT_EQ(container_pid("cvm-adopt"), pid) << "adopted, not launched again";
  EXPECT_TRUE(inflight_empty());
  EXPECT_EQ(last_event("b-adopt")->phase(), cvm::v1::RUNNING);

  // The same assignment delivered again: answered from the record, still one container.
  ASSERT_TRUE(
      conn_->js_publish(wire::node_work_subject("n1"), a.SerializeAsString(), "b-adopt-2").ok());
  // Work is handled in order: once a later STOP is answered, the redelivery has been handled.
  assign("b-probe", "probe", "", false, cvm::v1::STOP);
  ASSERT_TRUE(wait_phase("b-probe", {cvm::v1::STOPPED}, 30s)) << logs();
  EXPECT_EQ(containers(), std::vector<std::string>{"cvm-adopt"});
  EXPECT_EQ(container_pid("cvm-adopt"), pid);
}

TEST_F(AgentProcess, DockerImagesCachedWithCachingOnAndNotKeptWithItOff) {
  auto which = run_command({"sh", "-c", "command -v docker-registry"});
  if (which.exit_code != 0) {
    GTEST_SKIP() << "docker-registry is not installed (scripts/install-deps.sh installs it)";
  }
  const std::string registry_bin = which.output.substr(0, which.output.find('\n'));
  const uint16_t port = free_port();
  const std::string registry_dir = work_ + "/registry";
  fs::create_directories(registry_dir);
  std::ofstream(registry_dir + "/config.yml")
      << "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " << registry_dir
      << "/data\nhttp:\n  addr: 127.0.0.1:" << port << "\n";
  registry_ = std::make_unique<ChildProcess>(
      std::vector<std::string>{registry_bin, "serve", registry_dir + "/config.yml"},
      registry_dir + "/registry.log");
  const std::string repo = "127.0.0.1:" + std::to_string(port) + "/cvm/busybox";
  ASSERT_TRUE(wait_until(
      [&] {
        return run_command({"skopeo", "copy", "--quiet", "--dest-tls-verify=false", image_ref(),
                            "docker://" + repo + ":latest"},
                           60s)
                   .exit_code == 0;
      },
      30s))
      << registry_->log_tail();
  const std::string cache = work_ + "/cache";
  start_agent({"--image-cache", cache, "--registry-tls-verify", "false"});

  // Caching on: pulled into the node cache.
  assign("b-c1", "c1", "docker://" + repo + ":latest", true);
  auto e1 = wait_phase("b-c1", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(e1 && e1->phase() == cvm::v1::RUNNING) << (e1 ? e1->message() : "") << logs();
  ASSERT_TRUE(fs::exists(cache + "/layout/index.json"));
  EXPECT_NE(read_file(cache + "/layout/index.json").find("cvm_busybox_latest"), std::string::npos);

  // Caching off: pulled, unpacked, and nothing kept (staging empty, cache unchanged).
  const auto cache_index = read_file(cache + "/layout/index.json");
  assign("b-n1", "n1", "docker://" + repo + ":latest", false);
  auto e2 = wait_phase("b-n1", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(e2 && e2->phase() == cvm::v1::RUNNING) << (e2 ? e2->message() : "") << logs();
  EXPECT_TRUE(fs::is_empty(state_dir() + "/staging")) << "a pull was kept with Caching off";
  EXPECT_EQ(read_file(cache + "/layout/index.json"), cache_index);

  // A tag the registry does not have: IMAGE_UNAVAILABLE with skopeo's own words.
  assign("b-missing", "missing", "docker://" + repo + ":nope", true);
  auto e3 = wait_phase("b-missing", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(e3) << logs();
  EXPECT_EQ(e3->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e3->reason(), cvm::v1::IMAGE_UNAVAILABLE);
  EXPECT_NE(e3->message().find("manifest unknown"), std::string::npos) << e3->message();

  // The registry goes away: the cached image still builds, an uncached pull fails.
  registry_->stop();
  assign("b-c2", "c2", "docker://" + repo + ":latest", true);
  auto e4 = wait_phase("b-c2", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(e4 && e4->phase() == cvm::v1::RUNNING) << (e4 ? e4->message() : "") << logs();
  assign("b-n2", "n2", "docker://" + repo + ":latest", false);
  auto e5 = wait_phase("b-n2", {cvm::v1::RUNNING, cvm::v1::FAILED}, 90s);
  ASSERT_TRUE(e5) << logs();
  EXPECT_EQ(e5->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e5->reason(), cvm::v1::IMAGE_UNAVAILABLE);
  EXPECT_NE(e5->message().find("skopeo"), std::string::npos) << e5->message();
  EXPECT_TRUE(fs::is_empty(state_dir() + "/staging"));
}

// The host pid of the inner init: the supervisor's child.
int inner_pid_of(int supervisor_pid) {
  std::istringstream in(read_file("/proc/" + std::to_string(supervisor_pid) + "/task/" +
                                  std::to_string(supervisor_pid) + "/children"));
  int pid = 0;
  in >> pid;
  return pid;
}

// The agent tells the truth about a running workspace: its init killed -> FAILED at once, with
// the exit status, the container gone and capacity free; START then works again.
TEST_F(AgentProcess, InitKilledIsFailedAtOnceWithItsStatus) {
  start_agent();
  assign("b-killed", "killed", image_ref());
  ASSERT_TRUE(wait_phase("b-killed", {cvm::v1::RUNNING}, 60s)) << logs();
  const int inner = inner_pid_of(container_pid("cvm-killed"));
  ASSERT_GT(inner, 0);
  ASSERT_EQ(::kill(inner, SIGKILL), 0);
  const auto t0 = std::chrono::steady_clock::now();
  auto failed = wait_phase("b-killed", {cvm::v1::FAILED, cvm::v1::STOPPED}, 20s);
  ASSERT_TRUE(failed) << logs();
  EXPECT_EQ(failed->phase(), cvm::v1::FAILED);
  EXPECT_EQ(failed->reason(), cvm::v1::RUNTIME_ERROR);
  EXPECT_NE(failed->message().find("status 137"), std::string::npos) << failed->message();
  std::cout
      << "init killed -> FAILED in "
      << std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count()
      << " ms\n";
  ASSERT_TRUE(wait_until([&] { return containers().empty(); }, 10s)) << logs();
  auto r = record("killed");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->phase(), cvm::v1::FAILED);
  // The ID range stays (the files do, as after STOP); a new START runs it again.
  assign("b-killed-2", "killed", image_ref());
  ASSERT_TRUE(wait_phase("b-killed-2", {cvm::v1::RUNNING}, 60s)) << logs();
}

// An init that ends cleanly (exit 0: the sleep entrypoint's TERM trap, as systemd's poweroff
// ends with the kernel's SIGINT) is a shutdown: STOPPED, not FAILED.
TEST_F(AgentProcess, InitShutDownFromInsideIsStopped) {
  start_agent();
  assign("b-down", "down", image_ref());
  ASSERT_TRUE(wait_phase("b-down", {cvm::v1::RUNNING}, 60s)) << logs();
  const int inner = inner_pid_of(container_pid("cvm-down"));
  ASSERT_GT(inner, 0);
  ASSERT_EQ(::kill(inner, SIGTERM), 0);
  auto stopped = wait_phase("b-down", {cvm::v1::FAILED, cvm::v1::STOPPED}, 20s);
  ASSERT_TRUE(stopped) << logs();
  EXPECT_EQ(stopped->phase(), cvm::v1::STOPPED) << stopped->message();
  ASSERT_TRUE(wait_until(
      [&] {
        auto r = record("down");
        return r && r->phase() == cvm::v1::STOPPED && r->desired() == cvm::v1::STOP;
      },
      10s));
}

// A state directory below one that other users cannot search: every launch would fail inside
// runc (the workspace's mapped root cannot reach its bundle), so the agent says so in its node
// status, not ready, instead of taking work and failing it.
TEST_F(AgentProcess, AStateDirTheMappedRootCannotReachIsReportedNotReady) {
  const std::string closed = work_ + "/closed";
  fs::create_directories(closed);
  fs::permissions(closed, fs::perms(0700));
  agent_ = std::make_unique<ChildProcess>(
      std::vector<std::string>{CVM_AGENT_BIN, "--nats-url", nats_.url(), "--node-id", "n1",
                               "--state-dir", closed + "/agent", "--runc-root", runc_root(),
                               "--metrics-listen", "off", "--heartbeat-interval", "1"},
      work_ + "/agent-closed.log");
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  ASSERT_TRUE(nodes.ok());
  cvm::v1::NodeStatus status;
  ASSERT_TRUE(wait_until(
      [&] {
        auto e = nodes->get("n1");
        return e.ok() && e->has_value() && status.ParseFromString((*e)->value);
      },
      30s))
      << logs();
  EXPECT_FALSE(status.runtime().ready());
  EXPECT_NE(status.runtime().detail().find(closed + " is mode 0700"), std::string::npos)
      << status.runtime().detail();
  EXPECT_TRUE(agent_->running()) << "a node that is not ready still reports; it does not exit";
}

}  // namespace
}  // namespace cvm::test
