#pragma once
// The real services in-process for the simulator and the integration tests: scheduler replicas and
// a GPU broker, each on its own io thread with its own NATS connection, as separate processes
// would have. Only the process boundary is missing.

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "cvm/base/clock.h"
#include "cvm/broker/broker_service.h"
#include "cvm/bus/bus.h"
#include "cvm/fleetsim/fleet.h"
#include "cvm/scheduler/scheduler_service.h"
#include "cvm/telemetry/metrics.h"

namespace cvm::fleetsim {

// One service (or the fleet) with its io_context, thread and connection.
template <class Service>
struct Hosted {
  boost::asio::io_context io;
  std::thread thread;
  bus::ConnectionPtr conn;
  telemetry::Metrics metrics;
  std::unique_ptr<Service> service;
  bool running = false;
};

class Harness {
 public:
  explicit Harness(std::string nats_url, const Clock& clock)
      : url_(std::move(nats_url)), clock_(clock) {}
  ~Harness();
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  Status start_schedulers(int replicas, const scheduler::SchedulerConfig& config);
  Status start_broker();
  Status start_fleet(const FleetConfig& config);

  // Stops replica i as a crash would (no goodbye): its unacked requests are redelivered.
  void stop_scheduler(size_t i);
  void stop_all();

  // Runs fn on the fleet's io thread and waits for it (the fleet is single-threaded).
  template <class Fn>
  auto on_fleet(Fn&& fn) -> decltype(fn(std::declval<Fleet&>()));
  template <class Fn>
  auto on_scheduler(size_t i, Fn&& fn)
      -> decltype(fn(std::declval<scheduler::SchedulerService&>()));

  [[nodiscard]] size_t schedulers() const { return schedulers_.size(); }

 private:
  template <class Service, class Make>
  Status host(Hosted<Service>& h, const std::string& name, Make&& make,
              bool shared_delivery = false);
  template <class Service>
  void unhost(Hosted<Service>& h);
  template <class Service, class Fn>
  auto run_on(Hosted<Service>& h, Fn&& fn) -> decltype(fn(std::declval<Service&>()));

  std::string url_;
  const Clock& clock_;
  std::vector<std::unique_ptr<Hosted<scheduler::SchedulerService>>> schedulers_;
  std::unique_ptr<Hosted<broker::BrokerService>> broker_;
  std::unique_ptr<Hosted<Fleet>> fleet_;
};

}  // namespace cvm::fleetsim

#include "cvm/fleetsim/harness_inl.h"
