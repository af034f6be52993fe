#pragma once
// cvm-exporter's wiring: keeps a ClusterSnapshot current from the bus (KV watches on cvm_nodes and
// cvm_gpu_leases, consumer states polled) and refreshes its gauges from cluster_samples().

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/result.h"
#include "cvm/bus/bus.h"
#include "cvm/exporter/exporter.h"
#include "cvm/telemetry/metrics.h"

namespace cvm::exporter {

struct ExporterConfig {
  std::chrono::milliseconds interval{2000};     // how often consumer states are read
  std::chrono::milliseconds lost_after{30000};  // heartbeat age that counts as a lost node
};

class ExporterService {
 public:
  ExporterService(boost::asio::io_context& io, bus::ConnectionPtr conn, telemetry::Metrics& metrics,
                  Clock& clock, ExporterConfig config);
  ~ExporterService();
  ExporterService(const ExporterService&) = delete;
  ExporterService& operator=(const ExporterService&) = delete;

  Status start();  // binds the buckets, starts the watches and the refresh timer
  void stop();

 private:
  void refresh();
  void schedule();
  void publish(const std::vector<Sample>& samples);

  boost::asio::io_context& io_;
  bus::ConnectionPtr conn_;
  telemetry::Metrics& metrics_;
  Clock& clock_;
  ExporterConfig config_;
  ClusterSnapshot snapshot_;
  std::unique_ptr<bus::KvWatch> nodes_watch_;
  std::unique_ptr<bus::KvWatch> leases_watch_;
  std::optional<boost::asio::steady_timer> timer_;
  bool stopped_ = false;
  prometheus::Counter* read_errors_ = nullptr;
  std::map<std::string, prometheus::Family<prometheus::Gauge>*> families_;
  // The series each family has now, so that those of vanished nodes are removed.
  std::map<std::string, std::map<std::map<std::string, std::string>, prometheus::Gauge*>> series_;
};

}  // namespace cvm::exporter
