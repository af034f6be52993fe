#pragma once
// A real cvm-node-agent ("n1", real runc containers, its own state directory and runc root) under
// the real scheduler and broker, with a simulated second node that joins on demand.

#include <signal.h>

#include <filesystem>
#include <sstream>

#include "agent_helpers.h"
#include "cvm/base/clock.h"
#include "cvm/fleetsim/harness.h"
#include "cvm/test/build_events.h"
#include "cvm/test/files.h"
#include "cvm/v1/node.pb.h"
#include "fault_fixture.h"

namespace cvm::fault {

namespace fs = std::filesystem;

class AgentFault : public FaultTest {
 protected:
  static void SetUpTestSuite() {
    images_ = new test::TestImages(
        test::build_test_images(CVM_BUILD_IMAGE_SCRIPT, "cvm-fault-image", true));
  }
  static void TearDownTestSuite() {
    test::remove_test_images(*images_);
    delete images_;
  }

  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root to run containers";
    if (test::run_command({"runc", "--version"}).exit_code != 0) GTEST_SKIP() << "no runc";
    ASSERT_TRUE(images_->error.empty()) << images_->error;
    FaultTest::SetUp();
    fs::permissions(work_, fs::perms(0755));
    ASSERT_NO_FATAL_FAILURE(start_nats(nats_));
  }

  void TearDown() override {
    harness_.reset();
    if (agent_ != nullptr && agent_->pid() > 0) ::kill(agent_->pid(), SIGCONT);
    processes_.clear();
    agent_ = nullptr;
    auto list = test::run_command({"runc", "--root", runc_root(), "list", "-q"});
    std::istringstream ids(list.output);
    for (std::string id; std::getline(ids, id);) {
      if (!id.empty()) test::run_command({"runc", "--root", runc_root(), "delete", "-f", id});
    }
    FaultTest::TearDown();
  }

  std::string runc_root() const { return work_ + "/runc"; }
  std::string state_dir() const { return work_ + "/agent"; }
  AgentHost host() const { return {"n1", runc_root(), state_dir()}; }

  // The ledger of one build, with n1's host checked for orphans.
  void expect_agent_ledger(const std::string& build) {
    LedgerOptions lo;
    lo.acknowledged_builds = {build};
    lo.timeout = 30s;
    lo.agents = {host()};
    expect_ledger(lo);
  }

  void start_agent() {
    agent_ =
        &spawn("agent", {CVM_AGENT_BIN, "--nats-url", nats_.url(), "--node-id", "n1", "--state-dir",
                         state_dir(), "--runc-root", runc_root(), "--metrics-listen", "off",
                         "--heartbeat-interval", "1", "--stop-grace", "2"});
  }
  static int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  // Until the agent started last has registered (its NodeStatus carries a later start time).
  bool wait_agent_ready(int64_t since_ms) {
    return test::wait_agent_ready(*client_, "n1", since_ms);
  }

  // Broker, agent, then the scheduler once the agent has registered, and until the scheduler's
  // first load of the node index holds it. A build submitted before the scheduler's node watch
  // delivered n1 fails at once, rightly, with "0/0 nodes fit"; under load that race was lost now
  // and then and the test waited in vain for SCHEDULED (seen in loaded runs).
  void start_services_with_agent(std::vector<std::string> scheduler_args = {}) {
    start_broker(nats_.url());
    start_agent();
    ASSERT_TRUE(wait_agent_ready(0)) << logs();
    const auto& scheduler = start_scheduler(nats_.url(), std::move(scheduler_args));
    ASSERT_TRUE(test::wait_until(
        [&] {
          return test::read_file(scheduler.log_path()).find("node index loaded: 1 nodes") !=
                 std::string::npos;
        },
        60s, 50ms))
        << "the scheduler never loaded the agent's node" << logs();
  }

  cvm::v1::BuildRequest agent_request(const std::string& build) {
    auto r = request(build, 500, 128 * kMiB);
    r.set_image("oci:" + images_->dir + ":big");  // slow to unpack: faults land mid-launch
    return r;
  }

  std::optional<cvm::v1::BuildEvent> wait_phase(const std::string& build,
                                                std::initializer_list<cvm::v1::Phase> phases,
                                                std::chrono::milliseconds timeout) {
    return test::wait_build_phase(*client_, build, phases, timeout);
  }

  // A simulated node that comes up only now, so the scheduler could not have chosen it before.
  void start_other_node() {
    harness_ = std::make_unique<fleetsim::Harness>(nats_.url(), clock_);
    fleetsim::FleetConfig fleet;
    fleet.nodes = 1;
    fleet.prefix = "other";
    fleet.heartbeat_interval = 500ms;
    fleet.profiles = {{.name = "vm", .cpu_millicores = 16'000, .memory_bytes = 32 * kGiB}};
    ASSERT_TRUE(harness_->start_fleet(fleet).ok());
  }

  std::vector<std::string> containers() {
    auto r = test::run_command({"runc", "--root", runc_root(), "list", "-q"});
    std::vector<std::string> out;
    std::istringstream in(r.output);
    for (std::string id; std::getline(in, id);) {
      if (!id.empty()) out.push_back(id);
    }
    return out;
  }

  // Every value KV cvm_workspaces held for the workspace, oldest first.
  std::vector<cvm::v1::WorkspaceRecord> record_history(const std::string& ws) {
    std::vector<cvm::v1::WorkspaceRecord> out;
    auto kv = client_->ensure_kv(service::workspaces_bucket());
    if (!kv.ok()) return out;
    auto h = kv->history(ws);
    if (!h.ok()) return out;
    for (const auto& e : *h) {
      cvm::v1::WorkspaceRecord r;
      if (e.op == bus::KvOp::kPut && r.ParseFromString(e.value)) out.push_back(r);
    }
    return out;
  }

  static inline test::TestImages* images_ = nullptr;
  test::NatsServer nats_;
  SystemClock clock_;
  std::unique_ptr<fleetsim::Harness> harness_;
  test::ChildProcess* agent_ = nullptr;
};

}  // namespace cvm::fault
