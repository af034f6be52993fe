#pragma once
// The GPU broker's wiring: keeps the GPU inventory (KV cvm_nodes) and the lease ledger (KV
// cvm_gpu_leases) in memory from watches, and answers cvm.v1.gpu.reserve / release. The ledger's
// create-if-absent per GPU key is what makes a double lease impossible, even with several broker
// replicas: the in-memory view only picks candidates.

#include <map>
#include <memory>
#include <optional>
#include <string>

#include "cvm/base/clock.h"
#include "cvm/broker/allocator.h"
#include "cvm/bus/bus.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/gpu.pb.h"

namespace cvm::broker {

class BrokerService {
 public:
  BrokerService(bus::ConnectionPtr conn, telemetry::Metrics& metrics, const Clock& clock);
  ~BrokerService();
  BrokerService(const BrokerService&) = delete;
  BrokerService& operator=(const BrokerService&) = delete;

  Status start();
  void stop();

  // The request handlers, exposed for tests: a reply for a request.
  cvm::v1::GpuReserveReply reserve(const cvm::v1::GpuReserveRequest& request);
  cvm::v1::GpuReleaseReply release(const cvm::v1::GpuReleaseRequest& request);

 private:
  struct Meters;
  void on_node(const std::optional<bus::KvEntry>& entry);
  void on_lease(const std::optional<bus::KvEntry>& entry);
  void reply(const bus::Message& msg, const google::protobuf::Message& body);

  bus::ConnectionPtr conn_;
  const Clock& clock_;
  std::unique_ptr<Meters> meters_;
  std::optional<bus::KeyValue> leases_kv_;
  std::map<std::string, NodeGpuInventory> inventory_;  // by node id
  std::map<std::string, cvm::v1::GpuLease> leases_;    // by lease key
  std::unique_ptr<bus::KvWatch> nodes_watch_;
  std::unique_ptr<bus::KvWatch> leases_watch_;
  std::optional<bus::Subscription> reserve_sub_;
  std::optional<bus::Subscription> release_sub_;
};

}  // namespace cvm::broker
