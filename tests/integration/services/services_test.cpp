// The scheduler and the broker in-process against a real nats-server, with NodeStatus written to
// KV by the test as an agent would: placement, refusals and GPU leases over the real bus.
#include <atomic>
#include <chrono>
#include <future>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/wire.h"
#include "cvm/broker/broker_service.h"
#include "cvm/bus/bus.h"
#include "cvm/scheduler/scheduler_service.h"
#include "cvm/service/streams.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/test/build_events.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm {
namespace {

using namespace std::chrono_literals;

cvm::v1::NodeStatus node(const std::string& id, int64_t heartbeat_ms) {
  cvm::v1::NodeStatus n;
  n.set_node_id(id);
  n.mutable_host()->set_kernel_version("6.1.0");
  n.mutable_host()->set_bare_metal(true);
  n.mutable_runtime()->set_runtime("runc");
  n.mutable_runtime()->set_ready(true);
  n.mutable_capacity()->set_cpu_millicores(4000);
  n.mutable_capacity()->set_memory_bytes(8ULL << 30);
  n.set_heartbeat_unix_ms(heartbeat_ms);
  return n;
}

class Services : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.start().ok());
    auto conn = bus::Connection::connect({.url = nats_.url()}, io_.get_executor());
    ASSERT_TRUE(conn.ok()) << conn.error().message;
    conn_ = *conn;
    auto broker_conn = bus::Connection::connect({.url = nats_.url()}, broker_io_.get_executor());
    ASSERT_TRUE(broker_conn.ok()) << broker_conn.error().message;
    broker_conn_ = *broker_conn;
    scheduler_ = std::make_unique<scheduler::SchedulerService>(io_, conn_, metrics_, clock_,
                                                               scheduler::SchedulerConfig{});
    broker_ = std::make_unique<broker::BrokerService>(broker_conn_, broker_metrics_, clock_);
    // spdlog's registry (a function-local static in libspdlog.so) is made here, before the two
    // service threads log for the first time: in production each service is its own process,
    // and under TSan two threads racing into the uninstrumented library's static init read as
    // a data race (its guard's fast path is invisible to TSan).
    spdlog::default_logger();
    // Each service runs on its own io thread with its own connection, as the separate processes
    // of production do (the scheduler's GPU request blocks its thread until the broker answers).
    std::promise<Status> scheduler_started;
    std::promise<Status> broker_started;
    thread_ = std::thread([&] {
      boost::asio::post(io_, [&] { scheduler_started.set_value(scheduler_->start()); });
      auto guard = boost::asio::make_work_guard(io_);
      io_.run();
    });
    broker_thread_ = std::thread([&] {
      boost::asio::post(broker_io_, [&] { broker_started.set_value(broker_->start()); });
      auto guard = boost::asio::make_work_guard(broker_io_);
      broker_io_.run();
    });
    for (auto* p : {&scheduler_started, &broker_started}) {
      auto st = p->get_future().get();
      ASSERT_TRUE(st.ok()) << st.error().message;
    }
    auto client = bus::Connection::connect({.url = nats_.url()}, client_io_.get_executor());
    ASSERT_TRUE(client.ok());
    client_ = *client;
    auto nodes = client_->ensure_kv(service::nodes_bucket());
    ASSERT_TRUE(nodes.ok());
    nodes_.emplace(std::move(*nodes));
  }

  void TearDown() override {
    boost::asio::post(io_, [&] {
      scheduler_->stop();
      io_.stop();
    });
    boost::asio::post(broker_io_, [&] {
      broker_->stop();
      broker_io_.stop();
    });
    if (thread_.joinable()) thread_.join();
    if (broker_thread_.joinable()) broker_thread_.join();
  }

  void put_node(const cvm::v1::NodeStatus& n) {
    ASSERT_TRUE(nodes_->put(n.node_id(), n.SerializeAsString()).ok());
  }

  // A STOP of `workspace` as build `id`: its first SCHEDULED or FAILED event.
  std::optional<cvm::v1::BuildEvent> stop_workspace(const std::string& id,
                                                    const std::string& workspace) {
    auto r = request(id, workspace);
    r.set_transition(cvm::v1::STOP);
    submit(r);
    return wait_event(id, {cvm::v1::FAILED, cvm::v1::SCHEDULED});
  }

  // A cvm_workspaces record of a RUNNING workspace on `node`, as an agent writes it.
  void put_running_workspace(const std::string& workspace, const std::string& node) {
    auto workspaces = client_->ensure_kv(service::workspaces_bucket());
    ASSERT_TRUE(workspaces.ok());
    cvm::v1::WorkspaceRecord rec;
    rec.set_workspace_id(workspace);
    rec.set_node_id(node);
    rec.set_phase(cvm::v1::RUNNING);
    ASSERT_TRUE(workspaces->put(workspace, rec.SerializeAsString()).ok());
  }

  void submit(const cvm::v1::BuildRequest& r) {
    ASSERT_TRUE(
        client_->js_publish(std::string(wire::kBuildsSubmit), r.SerializeAsString(), r.build_id())
            .ok());
  }

  // The newest event of a build, once its phase is one of `phases`.
  std::optional<cvm::v1::BuildEvent> wait_event(const std::string& build_id,
                                                std::initializer_list<cvm::v1::Phase> phases) {
    return test::wait_build_phase(*client_, build_id, phases, 15s);
  }

  // Free GPUs of `node_id` in the scheduler's own index, read on its thread.
  size_t scheduler_free_gpus(const std::string& node_id) {
    std::promise<size_t> free;
    boost::asio::post(io_, [&] {
      size_t n = 0;
      if (const auto* rec = scheduler_->node(node_id)) {
        for (const auto& g : rec->gpus) n += g.leased ? 0 : 1;
      }
      free.set_value(n);
    });
    return free.get_future().get();
  }

  cvm::v1::BuildRequest request(const std::string& build, const std::string& ws) {
    cvm::v1::BuildRequest r;
    r.set_build_id(build);
    r.set_workspace_id(ws);
    r.set_image("oci:/x:latest");
    return r;
  }

  test::NatsServer nats_;
  boost::asio::io_context io_;
  boost::asio::io_context client_io_;
  boost::asio::io_context broker_io_;
  std::thread thread_;
  std::thread broker_thread_;
  telemetry::Metrics metrics_;
  telemetry::Metrics broker_metrics_;
  SystemClock clock_;
  bus::ConnectionPtr conn_;
  bus::ConnectionPtr client_;
  bus::ConnectionPtr broker_conn_;
  std::optional<bus::KeyValue> nodes_;
  std::unique_ptr<scheduler::SchedulerService> scheduler_;
  std::unique_ptr<broker::BrokerService> broker_;
  int probes_ = 0;
};

TEST_F(Services, PlacesOnTheEligibleNodeAndSendsItTheAssignment) {
  auto bad = node("enforcing", clock_.now_unix_ms());
  bad.mutable_host()->set_selinux_enabled(true);
  bad.mutable_host()->set_selinux_enforcing(true);
  put_node(bad);
  put_node(node("good", clock_.now_unix_ms()));
  // The KV watch delivers asynchronously: until the scheduler has seen both nodes a build may
  // fail with "0/0" or "0/1"; retry with fresh build ids until one is placed.
  std::optional<cvm::v1::BuildEvent> e;
  std::string build;
  for (int i = 0; i < 20; ++i) {
    build = "b" + std::to_string(i);
    submit(request(build, "ws1"));
    e = wait_event(build, {cvm::v1::SCHEDULED, cvm::v1::FAILED});
    ASSERT_TRUE(e.has_value());
    if (e->phase() == cvm::v1::SCHEDULED) break;
  }
  ASSERT_EQ(e->phase(), cvm::v1::SCHEDULED) << e->message();
  EXPECT_EQ(e->node_id(), "good");
  auto work =
      client_->last_message(std::string(wire::kStreamNodeWork), wire::node_work_subject("good"));
  ASSERT_TRUE(work.ok() && work->has_value());
  cvm::v1::NodeAssignment a;
  ASSERT_TRUE(a.ParseFromString((*work)->data));
  EXPECT_EQ(a.request().build_id(), build);
  EXPECT_TRUE(a.cvm()) << "CVMs are the default";
}

TEST_F(Services, NothingFitsSaysWhyPerFilter) {
  auto bad = node("enforcing", clock_.now_unix_ms());
  bad.mutable_host()->set_selinux_enabled(true);
  bad.mutable_host()->set_selinux_enforcing(true);
  put_node(bad);
  put_node(node("stale", clock_.now_unix_ms() - 60'000));
  ASSERT_TRUE(test::wait_until(
      [&] {
        auto k = nodes_->keys();
        return k.ok() && k->size() == 2;
      },
      5s));
  // Give the scheduler's watch a moment by retrying with fresh build ids until both are seen.
  std::optional<cvm::v1::BuildEvent> e;
  for (int i = 0; i < 20; ++i) {
    const std::string id = "nf" + std::to_string(i);
    submit(request(id, "ws"));
    e = wait_event(id, {cvm::v1::FAILED, cvm::v1::SCHEDULED});
    ASSERT_TRUE(e.has_value());
    if (e->message().rfind("0/2", 0) == 0) break;
  }
  EXPECT_EQ(e->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e->reason(), cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_NE(e->message().find("0/2 nodes fit"), std::string::npos) << e->message();
  EXPECT_NE(e->message().find("SELinux enforcing"), std::string::npos) << e->message();
}

TEST_F(Services, CvmsDisabledRefusesACvmButNotAPlainContainer) {
  auto settings = client_->ensure_kv(service::settings_bucket());
  ASSERT_TRUE(settings.ok());
  cvm::v1::InfrastructureSettings s;
  s.set_cvm_enabled(false);
  ASSERT_TRUE(settings->put(std::string(wire::kSettingsKey), s.SerializeAsString()).ok());
  put_node(node("good", clock_.now_unix_ms()));
  std::optional<cvm::v1::BuildEvent> e;
  for (int i = 0; i < 20; ++i) {  // until the settings watch has delivered
    auto r = request("cvm" + std::to_string(i), "ws");
    r.set_use_cvm(true);
    submit(r);
    e = wait_event(r.build_id(), {cvm::v1::FAILED, cvm::v1::SCHEDULED});
    ASSERT_TRUE(e.has_value());
    if (e->reason() == cvm::v1::CVM_DISABLED) break;
  }
  EXPECT_EQ(e->reason(), cvm::v1::CVM_DISABLED);
  auto plain = request("plain", "ws2");
  plain.set_use_cvm(false);
  submit(plain);
  e = wait_event("plain", {cvm::v1::FAILED, cvm::v1::SCHEDULED});
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::SCHEDULED) << e->message();
}

TEST_F(Services, StopOfAnUnknownWorkspaceFails) {
  auto e = stop_workspace("stop1", "nobody");
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->reason(), cvm::v1::WORKSPACE_NOT_FOUND);
}

// An order for an existing workspace goes only to a node that registered: a record naming any
// other node fails the build at once (an order there would wait for nobody), while the same order
// for a registered node is sent.
TEST_F(Services, AnOrderForAWorkspaceOnANodeThatNeverRegisteredFailsAtOnce) {
  put_running_workspace("moved", "ghost-node");
  auto e = stop_workspace("stop-ghost", "moved");
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e->reason(), cvm::v1::WORKSPACE_NOT_FOUND);
  EXPECT_NE(e->message().find("ghost-node, which has never registered"), std::string::npos)
      << e->message();

  // Registered: the scheduler finds its report in KV even before its watch shows it.
  put_node(node("real-node", clock_.now_unix_ms()));
  put_running_workspace("moved", "real-node");
  e = stop_workspace("stop-real", "moved");
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::SCHEDULED) << e->message();
  EXPECT_EQ(e->node_id(), "real-node");
}

// ... and not to a node the scheduler declared lost (no heartbeat for the TTL).
TEST_F(Services, AnOrderForAWorkspaceOnALostNodeFailsAtOnce) {
  put_node(node("dead-node", clock_.now_unix_ms() - 60'000));
  put_running_workspace("stranded", "dead-node");
  std::optional<cvm::v1::BuildEvent> e;
  for (int i = 0; i < 20; ++i) {  // until the liveness sweep (every second) declared it lost
    e = stop_workspace("stop-dead" + std::to_string(i), "stranded");
    ASSERT_TRUE(e.has_value());
    if (e->phase() == cvm::v1::FAILED) break;
    std::this_thread::sleep_for(500ms);
  }
  EXPECT_EQ(e->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e->reason(), cvm::v1::NODE_LOST);
  EXPECT_NE(e->message().find("dead-node, which is lost"), std::string::npos) << e->message();
}

TEST_F(Services, GpuBuildsGetLeasesAndNoGpuIsLeasedTwice) {
  auto n = node("gpu-node", clock_.now_unix_ms());
  for (int i = 0; i < 2; ++i) {
    auto* g = n.add_gpus();
    g->set_uuid("GPU-" + std::to_string(i));
    g->set_vendor(cvm::v1::NVIDIA);
    g->set_memory_bytes(16ULL << 30);
    g->set_minor(i);
    g->set_healthy(true);
  }
  put_node(n);
  // Both services learn of the node through KV watches; wait until each has seen it.
  ASSERT_TRUE(test::wait_until(
      [&] {
        auto r = request("probe" + std::to_string(probes_++), "probe");
        submit(r);
        auto e = wait_event(r.build_id(), {cvm::v1::FAILED, cvm::v1::SCHEDULED});
        return e && e->phase() == cvm::v1::SCHEDULED;
      },
      10s));
  ASSERT_TRUE(test::wait_until(
      [&] {
        cvm::v1::GpuReserveRequest too_many;
        too_many.set_node_id("gpu-node");
        too_many.set_workspace_id("probe");
        too_many.set_count(3);
        auto reply =
            client_->request(std::string(wire::kGpuReserve), too_many.SerializeAsString(), 5s);
        cvm::v1::GpuReserveReply r;
        return reply.ok() && r.ParseFromString(reply->data) &&
               r.message().find("2 free GPUs") != std::string::npos;
      },
      10s));

  std::set<std::string> leased;
  for (int i = 0; i < 2; ++i) {
    auto r = request("g" + std::to_string(i), "gws" + std::to_string(i));
    r.mutable_resources()->mutable_gpu()->set_count(1);
    r.mutable_resources()->set_cpu_millicores(100);
    submit(r);
    auto e = wait_event(r.build_id(), {cvm::v1::FAILED, cvm::v1::SCHEDULED});
    ASSERT_TRUE(e.has_value());
    ASSERT_EQ(e->phase(), cvm::v1::SCHEDULED) << e->message();
    ASSERT_EQ(e->gpu_uuids_size(), 1);
    EXPECT_TRUE(leased.insert(e->gpu_uuids(0)).second) << "GPU leased twice";
  }
  // Both GPUs are leased: the third is refused with the broker's reason.
  auto third = request("g2", "gws2");
  third.mutable_resources()->mutable_gpu()->set_count(1);
  submit(third);
  auto refused = wait_event("g2", {cvm::v1::FAILED, cvm::v1::SCHEDULED});
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->phase(), cvm::v1::FAILED);
  const int scheduled = 2;
  auto leases = client_->ensure_kv(service::gpu_leases_bucket());
  ASSERT_TRUE(leases.ok());
  auto keys = leases->keys();
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(keys->size(), static_cast<size_t>(scheduled));

  // Release frees one; the next build gets it.
  cvm::v1::GpuReleaseRequest rel;
  rel.set_workspace_id("gws0");
  auto reply = client_->request(std::string(wire::kGpuRelease), rel.SerializeAsString(), 5s);
  ASSERT_TRUE(reply.ok());
  cvm::v1::GpuReleaseReply released;
  ASSERT_TRUE(released.ParseFromString(reply->data));
  EXPECT_EQ(released.released(), 1u);
  // The scheduler learns of the release through its cvm_gpu_leases watch; a build submitted
  // before that is decided on a view with no free GPU and fails (the likely cause of this test's
  // one failure under parallel load). Wait until its view has the GPU back.
  ASSERT_TRUE(test::wait_until([&] { return scheduler_free_gpus("gpu-node") == 1; }, 10s))
      << "the scheduler never saw the release";
  auto fourth = request("g3", "gws3");
  fourth.mutable_resources()->mutable_gpu()->set_count(1);
  submit(fourth);
  auto e = wait_event("g3", {cvm::v1::FAILED, cvm::v1::SCHEDULED});
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::SCHEDULED) << e->message();
}

TEST_F(Services, BrokerAnswersGarbageWithoutDying) {
  auto reply = client_->request(std::string(wire::kGpuReserve), "\xff\xff", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  cvm::v1::GpuReserveReply r;
  ASSERT_TRUE(r.ParseFromString(reply->data));
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.reason(), cvm::v1::INVALID_REQUEST);
  // Still answering.
  cvm::v1::GpuReserveRequest req;
  req.set_node_id("none");
  req.set_workspace_id("w");
  req.set_count(1);
  reply = client_->request(std::string(wire::kGpuReserve), req.SerializeAsString(), 5s);
  ASSERT_TRUE(reply.ok());
  ASSERT_TRUE(r.ParseFromString(reply->data));
  EXPECT_EQ(r.reason(), cvm::v1::INSUFFICIENT_CAPACITY);
}

}  // namespace
}  // namespace cvm
