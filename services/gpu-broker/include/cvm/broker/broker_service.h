#pragma once
// The GPU broker's wiring: keeps the GPU inventory (KV cvm_nodes), the lease ledger (KV
// cvm_gpu_leases), the workspaces (KV cvm_workspaces) and the settings (KV cvm_settings) in memory
// from watches, and answers cvm.v1.gpu.reserve / release. The ledger's create-if-absent per GPU
// key is what makes a double lease impossible, even with several broker replicas: the in-memory
// view only picks candidates. Every delete of a lease names the revision it read, so a replica
// acting on a stale view can never free a GPU that was leased again in between.
//
// Health: agents report XID/ECC events on each GpuDevice; a GPU is quarantined (no new leases)
// while unhealthy and for `healthy_period` after its last event, and the workspace holding it gets
// a notice BuildEvent with a warning. A periodic reconcile (and one right after start) reclaims
// leases on nodes that are gone or lost and of workspaces that no longer exist.

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <boost/asio/steady_timer.hpp>

#include "cvm/base/clock.h"
#include "cvm/broker/allocator.h"
#include "cvm/broker/reclaim.h"
#include "cvm/bus/bus.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/gpu.pb.h"

namespace cvm::broker {

struct BrokerConfig {
  // Longer than the scheduler's liveness TTL on purpose: the scheduler marks a silent node's
  // workspaces LOST first; the broker frees their GPUs only once the node is clearly gone.
  std::chrono::milliseconds node_ttl{60'000};
  std::chrono::milliseconds lease_grace{10 * 60'000};
  std::chrono::milliseconds healthy_period{10 * 60'000};
  std::chrono::milliseconds reconcile_interval{30'000};
};

class BrokerService {
 public:
  BrokerService(bus::ConnectionPtr conn, telemetry::Metrics& metrics, const Clock& clock,
                BrokerConfig config = {});
  ~BrokerService();
  BrokerService(const BrokerService&) = delete;
  BrokerService& operator=(const BrokerService&) = delete;

  // Call on the connection's executor.
  Status start();
  void stop();

  // The request handlers, exposed for tests: a reply for a request. On the executor.
  cvm::v1::GpuReserveReply reserve(const cvm::v1::GpuReserveRequest& request);
  // `from_node`: the node whose agent asks (the token of cvm.v1.gpu.release.<node>): only that
  // node's leases are released, and a request naming another node is refused. Empty: the
  // scheduler's subject, any node.
  cvm::v1::GpuReleaseReply release(const cvm::v1::GpuReleaseRequest& request,
                                   const std::string& from_node = {});
  // One reconcile pass now (once every watch has delivered its initial values; before that it
  // does nothing and returns 0). Returns the number of leases freed. On the executor.
  size_t reconcile();
  // Every watch has delivered its initial values. On the executor.
  [[nodiscard]] bool synced() const;

 private:
  struct Meters;
  void on_node(const std::optional<bus::KvEntry>& entry);
  void on_lease(const std::optional<bus::KvEntry>& entry);
  void on_workspace(const std::optional<bus::KvEntry>& entry);
  void on_settings(const std::optional<bus::KvEntry>& entry);
  void on_synced();
  void schedule_reconcile();
  void reply(const bus::Message& msg, const google::protobuf::Message& body);

  // The lease this build already holds, confirmed against the ledger (a retried reserve).
  std::optional<cvm::v1::GpuReserveReply> held_lease(const cvm::v1::GpuReserveRequest& req,
                                                     const std::string& lease_id);
  cvm::v1::GpuReserveReply reserve_on(const std::string& node_id,
                                      const cvm::v1::GpuReserveRequest& req,
                                      const std::string& lease_id);
  // Deletes a lease key only if it is still at `revision`; kConflict when it changed.
  Status erase_lease(const std::string& key, uint64_t revision);
  GpuLeases leases_of(const std::string& node_id) const;
  HealthOptions health_now() const;
  void notify_health(const NodeGpuInventory* before, const NodeGpuInventory& now);
  // Every node's gauges, or only `only_node`'s.
  void update_gauges(const std::string* only_node = nullptr);

  bus::ConnectionPtr conn_;
  const Clock& clock_;
  BrokerConfig config_;
  std::unique_ptr<Meters> meters_;
  telemetry::Metrics& metrics_;
  std::optional<bus::KeyValue> leases_kv_;
  std::map<std::string, NodeGpuInventory> inventory_;       // by node id, nodes with GPUs
  std::map<std::string, int64_t, std::less<>> heartbeats_;  // every node: last heartbeat
  std::map<std::string, LeaseEntry> leases_;                // by lease key
  std::map<std::string, WorkspaceView, std::less<>> workspaces_;
  NodePlacement placement_ = NodePlacement::kPacked;
  std::set<std::string> gauge_labels_;  // "node\nmodel" pairs with gauges set
  bool nodes_synced_ = false;
  bool leases_synced_ = false;
  bool workspaces_synced_ = false;
  bool stopped_ = false;
  std::unique_ptr<bus::KvWatch> nodes_watch_;
  std::unique_ptr<bus::KvWatch> leases_watch_;
  std::unique_ptr<bus::KvWatch> workspaces_watch_;
  std::unique_ptr<bus::KvWatch> settings_watch_;
  std::optional<bus::Subscription> reserve_sub_;
  std::optional<bus::Subscription> release_sub_;
  std::optional<bus::Subscription> node_release_sub_;  // cvm.v1.gpu.release.<node>
  std::unique_ptr<boost::asio::steady_timer> reconcile_timer_;
};

}  // namespace cvm::broker
