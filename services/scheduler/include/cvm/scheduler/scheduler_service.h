#pragma once
// The scheduler's wiring: CVM_BUILDS in, NodeAssignments and BuildEvents out. The decisions are in
// placement.h; this class only moves data between the bus and them, on one executor thread.

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/clock.h"
#include "cvm/bus/bus.h"
#include "cvm/scheduler/placement.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm::scheduler {

struct SchedulerConfig {
  std::chrono::milliseconds node_ttl{kDefaultLivenessTtlMs};
  // How long a placement's reservation is held before the node's own NodeStatus.allocated is
  // trusted to include it (the agent reports after each launch and on every heartbeat).
  std::chrono::milliseconds reservation_hold{30000};
  std::chrono::milliseconds gpu_reserve_timeout{2000};
  std::chrono::milliseconds retry_delay{2000};  // nak delay when a peer or the bus is down
  int max_deliver = 20;
  uint32_t max_candidates = 3;
};

class SchedulerService {
 public:
  SchedulerService(boost::asio::io_context& io, bus::ConnectionPtr conn,
                   telemetry::Metrics& metrics, const Clock& clock, SchedulerConfig config);
  ~SchedulerService();
  SchedulerService(const SchedulerService&) = delete;
  SchedulerService& operator=(const SchedulerService&) = delete;

  // Ensures streams and buckets, starts the watches and the consumer.
  Status start();
  void stop();

 private:
  struct Meters;

  void on_build(const bus::JsMessagePtr& msg);
  void handle_start(const cvm::v1::BuildRequest& req, const bus::JsMessagePtr& msg);
  void handle_transition(const cvm::v1::BuildRequest& req, const bus::JsMessagePtr& msg);
  // Publishes the terminal FAILED event and acks; naks for a retry if the event cannot be sent.
  void fail(const cvm::v1::BuildRequest& req, cvm::v1::Reason reason, const std::string& message,
            const bus::JsMessagePtr& msg);
  void retry_later(const bus::JsMessagePtr& msg, const std::string& why);
  bool already_handled(const std::string& build_id);
  void hold_reservation(const std::string& build_id, const std::string& node_id,
                        const Reservation& amount);

  void on_node(const std::optional<bus::KvEntry>& entry);
  void on_settings(const std::optional<bus::KvEntry>& entry);
  void on_lease(const std::optional<bus::KvEntry>& entry);

  boost::asio::io_context& io_;
  bus::ConnectionPtr conn_;
  const Clock& clock_;
  SchedulerConfig config_;
  std::unique_ptr<Meters> meters_;

  NodeIndex index_;
  std::optional<cvm::v1::InfrastructureSettings> settings_;
  std::optional<bus::KeyValue> workspaces_;
  std::unique_ptr<bus::KvWatch> nodes_watch_;
  std::unique_ptr<bus::KvWatch> settings_watch_;
  std::unique_ptr<bus::KvWatch> leases_watch_;
  std::unique_ptr<bus::PullConsumer> consumer_;
  uint64_t decisions_ = 0;
};

}  // namespace cvm::scheduler
