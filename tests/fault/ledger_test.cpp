// The ledger check itself: every promise it checks must be able to fail. A history written by
// hand breaks each one once; a clean history passes.
#include <fstream>

#include "cvm/service/events.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"
#include "fault_fixture.h"

namespace cvm::fault {
namespace {

class LedgerCheck : public FaultTest {
 protected:
  void SetUp() override {
    FaultTest::SetUp();
    ASSERT_TRUE(nats_.start().ok());
    connect_client(nats_.url());
    ASSERT_TRUE(service::ensure_streams(*client_).ok());
  }

  void event(const std::string& build, cvm::v1::Phase phase, const std::string& node) {
    cvm::v1::BuildEvent e;
    e.set_build_id(build);
    e.set_workspace_id("ws-" + build);
    e.set_phase(phase);
    e.set_node_id(node);
    ASSERT_TRUE(service::publish_event(*client_, e).ok());
  }
  void assign(const std::string& build, const std::string& node, uint64_t cpu) {
    cvm::v1::NodeAssignment a;
    *a.mutable_request() = request(build, cpu, 128 * kMiB);
    a.set_node_id(node);
    ASSERT_TRUE(
        client_->js_publish(wire::node_work_subject(node), a.SerializeAsString(), build).ok());
  }
  void node(const std::string& id, uint64_t cpu) {
    cvm::v1::NodeStatus s;
    s.set_node_id(id);
    s.mutable_capacity()->set_cpu_millicores(cpu);
    s.mutable_capacity()->set_memory_bytes(64 * kGiB);
    auto kv = client_->ensure_kv(service::nodes_bucket());
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(kv->put(id, s.SerializeAsString()).ok());
  }
  void lease(const std::string& key, const std::string& lease_id, const std::string& uuid) {
    cvm::v1::GpuLease l;
    l.set_lease_id(lease_id);
    l.set_gpu_uuid(uuid);
    l.set_workspace_id("ws-" + lease_id);
    auto kv = client_->ensure_kv(service::gpu_leases_bucket());
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(kv->put(key, l.SerializeAsString()).ok());
  }
  void record(const std::string& ws, const std::string& node, const std::string& build) {
    cvm::v1::WorkspaceRecord r;
    r.set_workspace_id(ws);
    r.set_node_id(node);
    r.set_build_id(build);
    r.set_phase(cvm::v1::RUNNING);
    auto kv = client_->ensure_kv(service::workspaces_bucket());
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(kv->put(ws, r.SerializeAsString()).ok());
  }
  LedgerReport check(const LedgerOptions& o) {
    auto r = check_ledger(*client_, o);
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? *r : LedgerReport{};
  }
  static bool has(const LedgerReport& r, const std::string& needle) {
    for (const auto& p : r.problems) {
      if (p.find(needle) != std::string::npos) return true;
    }
    return false;
  }

  test::NatsServer nats_;
};

TEST_F(LedgerCheck, ACleanHistoryPasses) {
  node("n", 4000);
  assign("ok", "n", 1000);
  event("ok", cvm::v1::SCHEDULED, "n");
  event("ok", cvm::v1::RUNNING, "n");
  record("ws-ok", "n", "ok");
  lease("n.GPU-1", "L1", "GPU-1");
  auto kv = client_->ensure_kv(service::gpu_leases_bucket());
  ASSERT_TRUE(kv.ok());
  ASSERT_TRUE(kv->erase("n.GPU-1").ok());
  lease("n.GPU-1", "L2", "GPU-1");  // released, then leased again: fine
  LedgerOptions o;
  o.acknowledged_builds = {"ok"};
  o.quiet = 200ms;
  o.timeout = 10s;
  auto r = check(o);
  EXPECT_TRUE(r.problems.empty()) << r.summary();
  EXPECT_EQ(r.terminal_phase["ok"], "RUNNING");
}

TEST_F(LedgerCheck, EachBrokenPromiseIsFound) {
  event("twice", cvm::v1::RUNNING, "n");
  event("twice", cvm::v1::FAILED, "n");
  node("small", 1000);
  assign("big1", "small", 800);
  assign("big2", "small", 800);
  lease("n.GPU-7", "L1", "GPU-7");
  lease("n.GPU-7", "L2", "GPU-7");  // no release in between
  event("moved", cvm::v1::RUNNING, "b");
  record("ws-moved", "a", "moved");  // a stale write: the build ran on b
  const std::string state = work_ + "/agent";
  std::filesystem::create_directories(state + "/workspaces/ghost");
  std::ofstream(state + "/id-ranges.json") << R"({"ranges":{"ghost":{"base":100000}}})";

  LedgerOptions o;
  o.acknowledged_builds = {"twice", "never"};
  o.quiet = 200ms;
  o.timeout = 3s;
  o.sim_over_capacity = 2;
  o.agents = {{"a", work_ + "/runc", state}};
  auto r = check(o);
  EXPECT_TRUE(has(r, "build twice has 2 terminal events")) << r.summary();
  EXPECT_TRUE(has(r, "build never has 0 terminal events")) << r.summary();
  EXPECT_TRUE(has(r, "node small over capacity after assigning build big2")) << r.summary();
  EXPECT_TRUE(has(r, "GPU GPU-7 in two leases at once")) << r.summary();
  EXPECT_TRUE(has(r, "workspace ws-moved is recorded RUNNING on a but its build moved ran on b"))
      << r.summary();
  EXPECT_TRUE(has(r, "workspace ws-moved is recorded RUNNING on a but no container runs there"))
      << r.summary();
  EXPECT_TRUE(has(r, "orphan ID range of ghost on a")) << r.summary();
  EXPECT_TRUE(has(r, "orphan bundle")) << r.summary();
  EXPECT_TRUE(has(r, "the fleet simulator counted 2 assignments over")) << r.summary();
}

}  // namespace
}  // namespace cvm::fault
