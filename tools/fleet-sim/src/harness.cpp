#include "cvm/fleetsim/harness.h"

namespace cvm::fleetsim {

Harness::~Harness() { stop_all(); }

Status Harness::start_schedulers(int replicas, const scheduler::SchedulerConfig& config) {
  for (int i = 0; i < replicas; ++i) {
    auto h = std::make_unique<Hosted<scheduler::SchedulerService>>();
    auto st = host(*h, "scheduler-" + std::to_string(schedulers_.size()), [&](auto& hosted) {
      return std::make_unique<scheduler::SchedulerService>(hosted.io, hosted.conn, hosted.metrics,
                                                           clock_, config);
    });
    if (!st) return st;
    schedulers_.push_back(std::move(h));
  }
  return {};
}

Status Harness::start_broker() {
  broker_ = std::make_unique<Hosted<broker::BrokerService>>();
  return host(*broker_, "gpu-broker", [&](auto& hosted) {
    return std::make_unique<broker::BrokerService>(hosted.conn, hosted.metrics, clock_);
  });
}

Status Harness::start_fleet(const FleetConfig& config) {
  fleet_ = std::make_unique<Hosted<Fleet>>();
  // Thousands of per-node subscriptions: a shared pool of delivery threads, not one each.
  return host(
      *fleet_, "fleet-sim",
      [&](auto& hosted) { return std::make_unique<Fleet>(hosted.io, hosted.conn, clock_, config); },
      /*shared_delivery=*/true);
}

void Harness::stop_scheduler(size_t i) { unhost(*schedulers_.at(i)); }

void Harness::stop_all() {
  // The fleet first: once its heartbeats stop, no message is in flight to the services' watches
  // while their subscriptions are destroyed (cnats 3.4.1 can race a message being dispatched
  // against its subscription's destruction, nats.c#637, fixed upstream in 3.6).
  if (fleet_) unhost(*fleet_);
  for (auto& s : schedulers_) unhost(*s);
  if (broker_) unhost(*broker_);
}

}  // namespace cvm::fleetsim
