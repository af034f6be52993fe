// The GPU broker against a real nats-server: two replicas, each on its own connection and io
// thread as separate processes would be, racing over one ledger; release, reclaim, quarantine,
// recovery, policy refusals, node placement and the gauges, all over the real bus.
#include <atomic>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nats/nats.h>
#include <prometheus/text_serializer.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/wire.h"
#include "cvm/broker/broker_service.h"
#include "cvm/bus/bus.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/test/atomic_clock.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/run_on.h"
#include "cvm/test/wait.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/settings.pb.h"
#include "dgx_fixture.h"

namespace cvm {
namespace {

using namespace std::chrono_literals;
using broker::fixture::dgx;
using broker::fixture::gpu_uuid;

// One broker replica: its own io thread, connection and metrics registry.
struct Replica {
  boost::asio::io_context io;
  std::thread thread;
  telemetry::Metrics metrics;
  bus::ConnectionPtr conn;
  std::unique_ptr<broker::BrokerService> service;

  // Runs f on the replica's io thread (where the service lives) and returns its result.
  template <class F>
  auto on(F f) -> decltype(f()) {
    return cvm::test::run_on(io, std::move(f));
  }
};

class Broker : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.start().ok());
    auto client = bus::Connection::connect({.url = nats_.url()}, client_io_.get_executor());
    ASSERT_TRUE(client.ok()) << client.error().message;
    client_ = *client;
    client_thread_ = std::thread([this] {
      auto guard = boost::asio::make_work_guard(client_io_);
      client_io_.run();
    });
    auto nodes = client_->ensure_kv(service::nodes_bucket());
    ASSERT_TRUE(nodes.ok());
    nodes_.emplace(std::move(*nodes));
    auto leases = client_->ensure_kv(service::gpu_leases_bucket());
    ASSERT_TRUE(leases.ok());
    leases_.emplace(std::move(*leases));
    auto ws = client_->ensure_kv(service::workspaces_bucket());
    ASSERT_TRUE(ws.ok());
    workspaces_.emplace(std::move(*ws));
    ASSERT_TRUE(client_->ensure_stream(service::events_stream()).ok());
  }

  void TearDown() override {
    for (auto& r : replicas_) {
      boost::asio::post(r->io, [&r] {
        r->service->stop();
        r->io.stop();
      });
      if (r->thread.joinable()) r->thread.join();
    }
    client_io_.stop();
    if (client_thread_.joinable()) client_thread_.join();
  }

  Replica& start_replica(broker::BrokerConfig config = {}) {
    auto r = std::make_unique<Replica>();
    auto conn = bus::Connection::connect({.url = nats_.url()}, r->io.get_executor());
    EXPECT_TRUE(conn.ok());
    r->conn = *conn;
    r->service = std::make_unique<broker::BrokerService>(r->conn, r->metrics, clock_, config);
    r->thread = std::thread([&io = r->io] {
      auto guard = boost::asio::make_work_guard(io);
      io.run();
    });
    auto& ref = *r;
    replicas_.push_back(std::move(r));
    const auto st = ref.on([&] { return ref.service->start(); });
    EXPECT_TRUE(st.ok()) << st.error().message;
    EXPECT_TRUE(test::wait_until([&] { return ref.on([&] { return ref.service->synced(); }); }));
    return ref;
  }

  void put_node(broker::NodeGpuInventory inv, bool bare_metal = true) {
    cvm::v1::NodeStatus s;
    s.set_node_id(inv.node_id);
    s.mutable_host()->set_bare_metal(bare_metal);
    s.set_heartbeat_unix_ms(clock_.now_unix_ms());
    for (auto& g : inv.gpus) *s.add_gpus() = std::move(g);
    ASSERT_TRUE(nodes_->put(s.node_id(), s.SerializeAsString()).ok());
  }

  // Waits until every replica reports `free` free GPUs on the node.
  bool wait_seen(const std::string& node, int free) {
    const std::string expect =
        "node " + node + " has " + std::to_string(free) + " free GPU" + (free == 1 ? "" : "s");
    return test::wait_until([&] {
      for (auto& r : replicas_) {
        cvm::v1::GpuReserveRequest probe;
        probe.set_node_id(node);
        probe.set_workspace_id("probe");
        probe.set_count(1000);
        auto reply = r->on([&] { return r->service->reserve(probe); });
        if (reply.message().rfind(expect, 0) != 0) return false;
      }
      return true;
    });
  }

  cvm::v1::GpuReserveReply reserve(const cvm::v1::GpuReserveRequest& req) {
    auto reply = client_->request(std::string(wire::kGpuReserve), req.SerializeAsString(), 5s);
    EXPECT_TRUE(reply.ok()) << reply.error().message;
    cvm::v1::GpuReserveReply r;
    EXPECT_TRUE(reply.ok() && r.ParseFromString(reply->data));
    return r;
  }

  cvm::v1::GpuReserveReply reserve(const std::string& node, const std::string& ws, uint32_t count,
                                   const std::string& build = {}) {
    cvm::v1::GpuReserveRequest req;
    req.set_node_id(node);
    req.set_workspace_id(ws);
    req.set_build_id(build);
    req.set_count(count);
    return reserve(req);
  }

  cvm::v1::GpuReleaseReply release(const std::string& ws) {
    cvm::v1::GpuReleaseRequest req;
    req.set_workspace_id(ws);
    auto reply = client_->request(std::string(wire::kGpuRelease), req.SerializeAsString(), 5s);
    EXPECT_TRUE(reply.ok());
    cvm::v1::GpuReleaseReply r;
    EXPECT_TRUE(reply.ok() && r.ParseFromString(reply->data));
    return r;
  }

  std::set<std::string> lease_keys() {
    auto keys = leases_->keys();
    EXPECT_TRUE(keys.ok());
    return keys.ok() ? std::set<std::string>(keys->begin(), keys->end()) : std::set<std::string>{};
  }

  test::NatsServer nats_;
  test::AtomicClock clock_;
  boost::asio::io_context client_io_;
  std::thread client_thread_;
  bus::ConnectionPtr client_;
  std::optional<bus::KeyValue> nodes_;
  std::optional<bus::KeyValue> leases_;
  std::optional<bus::KeyValue> workspaces_;
  std::vector<std::unique_ptr<Replica>> replicas_;
};

// ---- the race ---------------------------------------------------------------------------------

// The race's load generator, driven from cnats' callback thread: a refused request is sent again
// (as a scheduler would retry) up to kMaxAttempts times, and a grant is released at once unless
// the request is one of the holders, so GPUs keep changing hands while all requests are in flight.
struct Load {
  static constexpr int kMaxAttempts = 40;
  static bool holder(int i) { return i % 100 == 1; }

  natsConnection* nc = nullptr;
  natsSubscription* sub = nullptr;
  std::mutex mu;
  std::vector<std::string> bodies;                  // request i, serialized
  std::vector<int> attempts;                        // sends of request i
  std::map<int, cvm::v1::GpuReserveReply> replies;  // the last answer to request i
  int sends = 0;
  int answers = 0;
  int retries_done = 0;
  int releases_sent = 0;
  int releases_answered = 0;
  int releases_failed = 0;
  std::map<int, int> granted_gpus;  // request i -> GPUs in its grant
  std::vector<std::string> release_errors;

  ~Load() {
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
  }

  natsStatus send(int i) {
    const std::string reply = "_INBOX.race.res." + std::to_string(i);
    ++attempts[static_cast<size_t>(i)];
    ++sends;
    return natsConnection_PublishRequest(nc, std::string(wire::kGpuReserve).c_str(), reply.c_str(),
                                         bodies[static_cast<size_t>(i)].data(),
                                         static_cast<int>(bodies[static_cast<size_t>(i)].size()));
  }

  [[nodiscard]] bool done() const {
    return replies.size() == bodies.size() && answers == sends &&
           releases_answered + releases_failed == releases_sent;
  }

  static void on_msg(natsConnection* nc, natsSubscription*, natsMsg* msg, void* closure) {
    auto* self = static_cast<Load*>(closure);
    const std::string subject = natsMsg_GetSubject(msg);
    const std::string data(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    natsMsg_Destroy(msg);
    std::lock_guard lock(self->mu);
    if (subject.rfind("_INBOX.race.rel.", 0) == 0) {
      cvm::v1::GpuReleaseReply r;
      const int i = std::stoi(subject.substr(std::string("_INBOX.race.rel.").size()));
      // Exactly the GPUs granted: fewer means the grant was not really in the ledger.
      if (r.ParseFromString(data) && r.ok() &&
          static_cast<int>(r.released()) == self->granted_gpus[i]) {
        ++self->releases_answered;
      } else {
        ++self->releases_failed;
        self->release_errors.push_back(subject + ": " + r.ShortDebugString());
      }
      return;
    }
    ++self->answers;
    const int i = std::stoi(subject.substr(std::string("_INBOX.race.res.").size()));
    cvm::v1::GpuReserveReply r;
    if (!r.ParseFromString(data)) return;
    if (!r.ok() && r.reason() == cvm::v1::INSUFFICIENT_CAPACITY &&
        self->attempts[static_cast<size_t>(i)] < kMaxAttempts) {
      ++self->retries_done;
      (void)self->send(i);
      return;
    }
    if (r.ok() && !holder(i)) {
      // Give it straight back, naming the GPUs, to whichever replica takes the release.
      cvm::v1::GpuReleaseRequest rel;
      rel.set_workspace_id("ws-" + std::to_string(i));
      rel.set_lease_id(r.lease_id());
      rel.set_node_id(r.node_id());
      for (const auto& g : r.gpus()) rel.add_gpu_uuids(g.uuid());
      self->granted_gpus[i] = r.gpus_size();
      const auto body = rel.SerializeAsString();
      const std::string reply = "_INBOX.race.rel." + std::to_string(i);
      if (natsConnection_PublishRequest(nc, std::string(wire::kGpuRelease).c_str(), reply.c_str(),
                                        body.data(), static_cast<int>(body.size())) == NATS_OK) {
        ++self->releases_sent;
      }
    }
    self->replies[i] = std::move(r);
  }
};

// 1,000 reserves in flight at once over 64 GPUs on 8 nodes, answered by two replicas, with GPUs
// changing hands throughout (see Load). Every write to the ledger is audited from its stream (a
// KV watch started before the first request, checked to have seen every revision): no key is
// ever written while it is held, and every request gets an answer.
TEST_F(Broker, TwoReplicasThousandConcurrentReservesNeverLeaseAGpuTwice) {
  constexpr int kNodes = 8;
  constexpr int kRequests = 1000;
  broker::BrokerConfig config;
  config.reconcile_interval = 1h;  // nothing but the requests writes the ledger
  start_replica(config);
  start_replica(config);
  for (int n = 0; n < kNodes; ++n) put_node(dgx("node-" + std::to_string(n)));
  for (int n = 0; n < kNodes; ++n) ASSERT_TRUE(wait_seen("node-" + std::to_string(n), 8));

  struct Audit {
    std::mutex mu;
    std::vector<bus::KvEntry> entries;
  } audit;
  auto watch = leases_->watch(">", [&](std::optional<bus::KvEntry> e) {
    if (!e) return;
    std::lock_guard lock(audit.mu);
    audit.entries.push_back(std::move(*e));
  });
  ASSERT_TRUE(watch.ok());

  // The load generator speaks cnats directly: the adapter's request() blocks one thread per
  // request, and here all 1,000 must be in flight at once, each with its own reply subject.
  Load load;
  ASSERT_EQ(natsConnection_ConnectTo(&load.nc, nats_.url().c_str()), NATS_OK);
  ASSERT_EQ(natsConnection_Subscribe(&load.sub, load.nc, "_INBOX.race.>", &Load::on_msg, &load),
            NATS_OK);
  ASSERT_EQ(natsConnection_Flush(load.nc), NATS_OK);

  std::mt19937 rng(2024);
  {
    std::lock_guard lock(load.mu);
    load.attempts.assign(kRequests, 0);
    for (int i = 0; i < kRequests; ++i) {
      cvm::v1::GpuReserveRequest req;
      // One request in nine leaves the node to the broker (packed placement over all nodes).
      const int node = static_cast<int>(rng() % (kNodes + 1));
      if (node < kNodes) req.set_node_id("node-" + std::to_string(node));
      req.set_count(1 + rng() % 3);
      req.set_workspace_id("ws-" + std::to_string(i));
      req.set_build_id("b-" + std::to_string(i));
      load.bodies.push_back(req.SerializeAsString());
    }
    for (int i = 0; i < kRequests; ++i) ASSERT_EQ(load.send(i), NATS_OK);
  }
  ASSERT_EQ(natsConnection_Flush(load.nc), NATS_OK);

  // Every request answered, and every release of a grant answered.
  ASSERT_TRUE(test::wait_until(
      [&] {
        std::lock_guard lock(load.mu);
        return load.done();
      },
      150s))
      <<
      [&] {
        std::lock_guard lock(load.mu);
        return "sends " + std::to_string(load.sends) + ", answers " + std::to_string(load.answers) +
               ", final replies " + std::to_string(load.replies.size()) + ", releases sent " +
               std::to_string(load.releases_sent) + ", answered " +
               std::to_string(load.releases_answered) + ", failed " +
               std::to_string(load.releases_failed);
      }();
  for (const auto& e : load.release_errors) ADD_FAILURE() << "release not done: " << e;

  // A sentinel write marks the end: the audit must have seen every revision up to it.
  auto end_rev = leases_->put("audit.end", "");
  ASSERT_TRUE(end_rev.ok());
  ASSERT_TRUE(test::wait_until([&] {
    std::lock_guard lock(audit.mu);
    return !audit.entries.empty() && audit.entries.back().revision >= *end_rev;
  }));
  std::lock_guard audit_lock(audit.mu);
  std::lock_guard load_lock(load.mu);
  // The bucket was empty when the watch started, so the audit holds the ledger's whole history.
  for (size_t k = 0; k < audit.entries.size(); ++k) {
    ASSERT_EQ(audit.entries[k].revision, k + 1) << "the audit missed a ledger write";
  }

  // Replay: a key written while held is a GPU in two leases at once.
  std::map<std::string, cvm::v1::GpuLease> held;
  std::map<std::string, std::set<std::string>> ever_by_lease;  // lease id -> keys it held
  size_t creates = 0;
  for (const auto& e : audit.entries) {
    if (e.key == "audit.end") continue;
    if (e.op == bus::KvOp::kPut) {
      cvm::v1::GpuLease lease;
      ASSERT_TRUE(lease.ParseFromString(e.value));
      auto [it, fresh] = held.emplace(e.key, lease);
      ASSERT_TRUE(fresh) << e.key << " leased to " << lease.workspace_id() << " while held by "
                         << it->second.workspace_id() << " (revision " << e.revision << ")";
      ever_by_lease[lease.lease_id()].insert(e.key);
      ++creates;
    } else {
      held.erase(e.key);
    }
  }

  // Every grant is in the ledger, no two outstanding grants share a GPU, and what is left in the
  // ledger is exactly the grants that were not released.
  size_t granted = 0;
  std::set<std::string> outstanding;
  for (const auto& [i, r] : load.replies) {
    if (!r.ok()) {
      EXPECT_EQ(r.reason(), cvm::v1::INSUFFICIENT_CAPACITY) << r.message();
      continue;
    }
    ++granted;
    EXPECT_EQ(r.lease_id(), "b-" + std::to_string(i));
    EXPECT_FALSE(r.node_id().empty());
    for (const auto& g : r.gpus()) {
      const auto key = broker::lease_key(r.node_id(), g.uuid());
      EXPECT_TRUE(ever_by_lease[r.lease_id()].contains(key)) << key << " granted, never written";
      if (Load::holder(i)) {
        EXPECT_TRUE(outstanding.insert(key).second) << key << " granted twice";
      }
    }
  }
  std::set<std::string> left;
  for (const auto& [key, lease] : held) left.insert(key);
  EXPECT_EQ(left, outstanding);
  EXPECT_GT(granted, 200u);  // GPUs changed hands many times over during the race
  EXPECT_GE(creates, granted);
  double conflicts = 0;
  for (auto& r : replicas_) {
    conflicts += r->on(
        [&] { return r->metrics.counter("cvm_gpu_broker_lease_conflicts_total", "").Value(); });
  }
  std::printf(
      "race: %d requests (%d sends with retries), %zu granted, %d released, %zu ledger "
      "writes audited, %.0f create conflicts between the replicas\n",
      kRequests, load.sends, granted, load.releases_sent, audit.entries.size(), conflicts);

  natsSubscription_Destroy(load.sub);
  load.sub = nullptr;
}

// ---- release and reclaim ------------------------------------------------------------------------

TEST_F(Broker, ReleaseOnStopFreesTheGpusForTheNextWorkspace) {
  start_replica();
  put_node(dgx("n1"));
  ASSERT_TRUE(wait_seen("n1", 8));
  auto a = reserve("n1", "ws-a", 4, "b-a");
  ASSERT_TRUE(a.ok()) << a.message();
  EXPECT_EQ(a.node_id(), "n1");
  EXPECT_EQ(a.gpus_size(), 4);
  // A retry of the same build gets the same lease, not four more GPUs.
  auto again = reserve("n1", "ws-a", 4, "b-a");
  ASSERT_TRUE(again.ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(again.gpus(i).uuid(), a.gpus(i).uuid());
  EXPECT_EQ(lease_keys().size(), 4u);
  auto b = reserve("n1", "ws-b", 4, "b-b");
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(reserve("n1", "ws-c", 1, "b-c").ok());
  // What the agent does after stopping ws-a: release by workspace (and lease).
  auto rel = release("ws-a");
  EXPECT_TRUE(rel.ok()) << rel.message();
  EXPECT_EQ(rel.released(), 4u);
  EXPECT_EQ(lease_keys().size(), 4u);
  auto c = reserve("n1", "ws-c", 4, "b-c");
  ASSERT_TRUE(c.ok()) << c.message();
  std::set<std::string> got;
  for (const auto& g : c.gpus()) got.insert(g.uuid());
  for (const auto& g : a.gpus()) EXPECT_TRUE(got.contains(g.uuid()));
  // Releasing again is a no-op, not an error.
  EXPECT_EQ(release("ws-a").released(), 0u);
}

// A node agent releases on cvm.v1.gpu.release.<its node>: its own node's leases only. Another
// node's agent cannot free them, by workspace or by naming the node and GPUs; the owner can.
TEST_F(Broker, ANodeReleasesOnlyItsOwnNodesLeases) {
  auto& replica = start_replica();
  put_node(dgx("n1"));
  ASSERT_TRUE(wait_seen("n1", 8));
  auto a = reserve("n1", "ws-a", 2, "b-a");
  ASSERT_TRUE(a.ok()) << a.message();
  const auto release_from = [&](const std::string& node, const cvm::v1::GpuReleaseRequest& req) {
    auto reply = client_->request(wire::gpu_release_subject(node), req.SerializeAsString(), 5s);
    EXPECT_TRUE(reply.ok()) << reply.error().message;
    cvm::v1::GpuReleaseReply r;
    EXPECT_TRUE(reply.ok() && r.ParseFromString(reply->data));
    return r;
  };
  cvm::v1::GpuReleaseRequest by_workspace;
  by_workspace.set_workspace_id("ws-a");
  auto foreign = release_from("n2", by_workspace);
  EXPECT_FALSE(foreign.ok());
  EXPECT_EQ(foreign.released(), 0u);
  EXPECT_NE(foreign.message().find("are on node n1: node n2 may release only its own"),
            std::string::npos)
      << foreign.message();
  cvm::v1::GpuReleaseRequest named = by_workspace;
  named.set_node_id("n1");
  for (const auto& g : a.gpus()) named.add_gpu_uuids(g.uuid());
  auto forged = release_from("n2", named);
  EXPECT_FALSE(forged.ok());
  EXPECT_NE(forged.message().find("node n2 may release only its own GPUs"), std::string::npos)
      << forged.message();
  EXPECT_EQ(lease_keys().size(), 2u) << "another node's agent freed the leases";
  EXPECT_EQ(replica.on([&] {
    return replica.metrics.counter("cvm_gpu_broker_foreign_releases_total", "").Value();
  }),
            2.0);
  auto own = release_from("n1", named);
  EXPECT_TRUE(own.ok()) << own.message();
  EXPECT_EQ(own.released(), 2u);
  EXPECT_TRUE(lease_keys().empty());
}

TEST_F(Broker, ReclaimsLeasesOfALostOrDeletedNode) {
  broker::BrokerConfig config;
  config.node_ttl = 60s;
  config.reconcile_interval = 50ms;
  start_replica(config);
  put_node(dgx("n1"));
  put_node(dgx("n2"));
  ASSERT_TRUE(wait_seen("n1", 8));
  ASSERT_TRUE(wait_seen("n2", 8));
  ASSERT_TRUE(reserve("n1", "ws-1", 2, "b-1").ok());
  ASSERT_TRUE(reserve("n2", "ws-2", 2, "b-2").ok());
  for (const char* ws : {"ws-1", "ws-2"}) {
    cvm::v1::WorkspaceRecord rec;
    rec.set_workspace_id(ws);
    rec.set_phase(cvm::v1::RUNNING);
    rec.set_updated_unix_ms(clock_.now_unix_ms());
    ASSERT_TRUE(workspaces_->put(ws, rec.SerializeAsString()).ok());
  }
  ASSERT_EQ(lease_keys().size(), 4u);
  // The node deregisters: its leases go at once.
  ASSERT_TRUE(nodes_->erase("n2").ok());
  ASSERT_TRUE(test::wait_until([&] { return lease_keys().size() == 2u; }));
  for (const auto& k : lease_keys()) EXPECT_EQ(k.rfind("n1.", 0), 0u) << k;
  // The other stops heartbeating: within the TTL nothing happens, past it the leases go.
  clock_.advance(59s);
  put_node(dgx("n3"));  // a write the broker must see before judging: proves it looked
  ASSERT_TRUE(wait_seen("n3", 8));
  ASSERT_TRUE(replicas_[0]->on([&] { return replicas_[0]->service->reconcile(); }) == 0u);
  EXPECT_EQ(lease_keys().size(), 2u);
  clock_.advance(2s);
  ASSERT_TRUE(test::wait_until([&] { return lease_keys().empty(); }));
}

TEST_F(Broker, ReclaimsLeasesOfMissingWorkspacesAfterTheGraceOnStartUp) {
  // Leases written while no broker ran: one for a workspace that exists, one for a workspace
  // that was deleted, one too young to judge.
  put_node(dgx("n1"));
  auto write = [&](const std::string& uuid, const std::string& ws, int64_t age_ms) {
    cvm::v1::GpuLease l;
    l.set_lease_id("b-" + ws);
    l.set_node_id("n1");
    l.set_gpu_uuid(uuid);
    l.set_workspace_id(ws);
    l.set_build_id("b-" + ws);
    l.set_leased_unix_ms(clock_.now_unix_ms() - age_ms);
    ASSERT_TRUE(leases_->create(broker::lease_key("n1", uuid), l.SerializeAsString()).ok());
  };
  write(gpu_uuid(0), "alive", 3'600'000);
  write(gpu_uuid(1), "deleted", 3'600'000);
  write(gpu_uuid(2), "young", 1'000);
  cvm::v1::WorkspaceRecord rec;
  rec.set_workspace_id("alive");
  rec.set_phase(cvm::v1::RUNNING);
  ASSERT_TRUE(workspaces_->put("alive", rec.SerializeAsString()).ok());

  broker::BrokerConfig config;
  config.lease_grace = 10min;
  config.reconcile_interval = 50ms;
  start_replica(config);
  ASSERT_TRUE(test::wait_until([&] { return lease_keys().size() == 2u; }));
  EXPECT_EQ(lease_keys(), (std::set<std::string>{broker::lease_key("n1", gpu_uuid(0)),
                                                 broker::lease_key("n1", gpu_uuid(2))}));
  clock_.advance(11min);
  put_node(dgx("n1"));  // keep the node alive under the moved clock
  ASSERT_TRUE(test::wait_until([&] { return lease_keys().size() == 1u; }));
  EXPECT_TRUE(lease_keys().contains(broker::lease_key("n1", gpu_uuid(0))));
}

// ---- health -------------------------------------------------------------------------------------

TEST_F(Broker, QuarantineWarnsTheWorkspaceAndTheGpuReturnsAfterTheHealthyPeriod) {
  broker::BrokerConfig config;
  config.healthy_period = 5min;
  start_replica(config);
  start_replica(config);  // both see the report; the stream keeps one notice
  auto node = dgx("n1");
  node.gpus.resize(2);
  put_node(node);
  ASSERT_TRUE(wait_seen("n1", 2));
  auto lease = reserve("n1", "ws", 1, "b-gpu");
  ASSERT_TRUE(lease.ok());
  const std::string sick = lease.gpus(0).uuid();
  // The build is running (as its agent would have said).
  auto running = service::make_event("b-gpu", "ws", cvm::v1::RUNNING, clock_, "node-agent");
  ASSERT_TRUE(service::publish_event(*client_, running).ok());

  // The agent reports an XID on the leased GPU.
  for (auto& g : node.gpus) {
    if (g.uuid() == sick) {
      g.set_last_health_event_unix_ms(clock_.now_unix_ms());
      g.set_last_xid(79);
      g.set_health_reason("XID 79: GPU has fallen off the bus");
    }
  }
  put_node(node);
  std::optional<cvm::v1::BuildEvent> notice;
  ASSERT_TRUE(test::wait_until([&] {
    auto m = client_->last_message(std::string(wire::kStreamEvents),
                                   wire::build_events_subject("b-gpu"));
    if (!m.ok() || !m->has_value()) return false;
    cvm::v1::BuildEvent e;
    if (!e.ParseFromString((*m)->data) || !e.notice()) return false;
    notice = e;
    return true;
  }));
  EXPECT_EQ(notice->phase(), cvm::v1::RUNNING);  // repeated, not changed
  EXPECT_EQ(notice->source(), "gpu-broker");
  ASSERT_EQ(notice->warnings_size(), 1);
  EXPECT_NE(notice->warnings(0).find("XID 79"), std::string::npos);
  EXPECT_NE(notice->warnings(0).find("quarantined"), std::string::npos);
  ASSERT_EQ(notice->gpu_uuids_size(), 1);
  EXPECT_EQ(notice->gpu_uuids(0), sick);

  // Released, it is still out of service: both GPUs cannot be had.
  ASSERT_EQ(release("ws").released(), 1u);
  // Either replica may answer; one whose lease watch has not seen the release yet still counts
  // the sick GPU as leased ("1 free GPU"), so wait for the views to converge.
  cvm::v1::GpuReserveReply two;
  EXPECT_TRUE(test::wait_until([&] {
    two = reserve("n1", "ws2", 2, "b-2");
    return !two.ok() && two.message().find("1 more quarantined") != std::string::npos;
  })) << two.message();
  auto one = reserve("n1", "ws2", 1, "b-2");
  ASSERT_TRUE(one.ok());
  EXPECT_NE(one.gpus(0).uuid(), sick);
  ASSERT_EQ(release("ws2").released(), 1u);
  // Healthy for the whole period: back in service.
  clock_.advance(5min);
  cvm::v1::GpuReserveReply back;
  EXPECT_TRUE(test::wait_until([&] {  // both replicas must have seen ws2's release
    back = reserve("n1", "ws3", 2, "b-3");
    return back.ok();
  })) << back.message();
}

TEST_F(Broker, AnUnhealthyGpuStaysOutUntilItAnswersAgain) {
  start_replica();
  auto node = dgx("n1");
  node.gpus.resize(1);
  node.gpus[0].set_healthy(false);
  node.gpus[0].set_health_reason("GPU is lost");
  put_node(node);
  ASSERT_TRUE(test::wait_until([&] {
    auto r = reserve("n1", "ws", 1);
    return !r.ok() && r.message().find("(1 more quarantined)") != std::string::npos;
  }));
  clock_.advance(24h);
  EXPECT_FALSE(reserve("n1", "ws", 1).ok());
  node.gpus[0].set_healthy(true);
  put_node(node);
  ASSERT_TRUE(test::wait_until([&] { return reserve("n1", "ws", 1).ok(); }));
}

// ---- policy and placement -----------------------------------------------------------------------

TEST_F(Broker, EveryPolicyRefusalOverTheBus) {
  start_replica();
  put_node(dgx("metal"));
  put_node(dgx("cloud-vm"), false);
  ASSERT_TRUE(wait_seen("metal", 8));

  cvm::v1::GpuReserveRequest req;
  req.set_node_id("metal");
  req.set_workspace_id("ws");
  req.set_count(1);
  req.set_vendor(cvm::v1::AMD);
  auto r = reserve(req);
  EXPECT_EQ(r.reason(), cvm::v1::GPU_VENDOR_UNSUPPORTED) << r.message();
  req.set_vendor(cvm::v1::NVIDIA);
  req.set_cached_cvm(true);
  r = reserve(req);
  EXPECT_EQ(r.reason(), cvm::v1::GPU_WITH_CACHING_UNSUPPORTED) << r.message();
  req.set_cached_cvm(false);
  req.set_node_id("cloud-vm");
  ASSERT_TRUE(
      test::wait_until([&] { return reserve(req).reason() == cvm::v1::GPU_REQUIRES_BARE_METAL; }));
  req.set_node_id("metal");
  req.set_count(9);
  r = reserve(req);
  EXPECT_EQ(r.reason(), cvm::v1::INSUFFICIENT_CAPACITY);
  EXPECT_EQ(r.message(), "node metal has 8 free GPUs, 9 requested");
  req.set_count(0);
  EXPECT_EQ(reserve(req).reason(), cvm::v1::INVALID_REQUEST);
  req.set_count(1);
  req.set_workspace_id("not a valid id");
  EXPECT_EQ(reserve(req).reason(), cvm::v1::INVALID_REQUEST);
  // Garbage does not stop it.
  auto garbage = client_->request(std::string(wire::kGpuReserve), "\xff\x01garbage", 5s);
  ASSERT_TRUE(garbage.ok());
  cvm::v1::GpuReserveReply g;
  ASSERT_TRUE(g.ParseFromString(garbage->data));
  EXPECT_EQ(g.reason(), cvm::v1::INVALID_REQUEST);
  req.set_workspace_id("ws");
  EXPECT_TRUE(reserve(req).ok());
}

TEST_F(Broker, PackedOrSpreadAcrossNodesFollowsTheSetting) {
  start_replica();
  put_node(dgx("a"));
  put_node(dgx("b"));
  ASSERT_TRUE(wait_seen("a", 8));
  ASSERT_TRUE(wait_seen("b", 8));
  ASSERT_TRUE(reserve("a", "first", 2, "b-first").ok());  // a: 6 free, b: 8 free

  cvm::v1::GpuReserveRequest req;
  req.set_workspace_id("ws");
  req.set_count(2);
  req.set_build_id("b-packed");
  auto packed = reserve(req);
  ASSERT_TRUE(packed.ok()) << packed.message();
  EXPECT_EQ(packed.node_id(), "a");

  auto settings = client_->ensure_kv(service::settings_bucket());
  ASSERT_TRUE(settings.ok());
  cvm::v1::InfrastructureSettings s;
  s.set_gpu_placement(cvm::v1::GPU_PLACEMENT_SPREAD);
  ASSERT_TRUE(settings->put(std::string(wire::kSettingsKey), s.SerializeAsString()).ok());
  int n = 0;
  ASSERT_TRUE(test::wait_until([&] {
    req.set_workspace_id("spread-" + std::to_string(n));
    req.set_build_id("b-spread-" + std::to_string(n++));
    auto r = reserve(req);
    return r.ok() && r.node_id() == "b";
  }));
  // Candidates narrow the choice.
  req.set_workspace_id("only-a");
  req.set_build_id("b-only-a");
  req.add_candidate_nodes("a");
  auto only = reserve(req);
  ASSERT_TRUE(only.ok());
  EXPECT_EQ(only.node_id(), "a");
}

// ---- metrics ------------------------------------------------------------------------------------

TEST_F(Broker, GaugesByNodeAndModelAndAReserveLatencyHistogram) {
  auto& r = start_replica();
  auto node = dgx("n1");
  node.gpus[7].set_healthy(false);
  put_node(node);
  ASSERT_TRUE(wait_seen("n1", 7));
  ASSERT_TRUE(reserve("n1", "ws", 3, "b-1").ok());
  const std::string model = "NVIDIA H100 80GB HBM3";
  auto text = [&] {
    return r.on(
        [&] { return prometheus::TextSerializer().Serialize(r.metrics.registry().Collect()); });
  };
  auto has = [&](const std::string& state, int v) {
    const std::string line = "cvm_gpu_broker_node_gpus{model=\"" + model +
                             "\",node=\"n1\",state=\"" + state + "\"} " + std::to_string(v) + "\n";
    return text().find(line) != std::string::npos;
  };
  ASSERT_TRUE(test::wait_until([&] { return has("leased", 3); })) << text();
  EXPECT_TRUE(has("total", 8));
  EXPECT_TRUE(has("free", 4));
  EXPECT_TRUE(has("unhealthy", 1));
  EXPECT_NE(text().find("cvm_gpu_broker_reserve_seconds_count"), std::string::npos);
  // The node goes away: its gauges read 0, not their last value.
  ASSERT_TRUE(nodes_->erase("n1").ok());
  ASSERT_TRUE(test::wait_until([&] { return has("total", 0); })) << text();
}

}  // namespace
}  // namespace cvm
