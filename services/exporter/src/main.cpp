// cvm-exporter: Prometheus metrics of the cluster as NATS holds it (node liveness and
// capabilities, GPU health and leases, stream backlogs). main() parses flags and runs
// ExporterService.
#include <iostream>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/exporter/exporter_service.h"
#include "cvm/service/service.h"

int main(int argc, char** argv) {
  CLI::App app{"cvm-exporter: cluster metrics (nodes, GPUs, backlogs) read from NATS"};
  cvm::service::CommonOptions common;
  common.metrics_listen = "127.0.0.1:9464";
  cvm::service::add_common_flags(app, common);
  cvm::exporter::ExporterConfig config;
  double interval_s = 2;
  double lost_after_s = 30;
  app.add_option("--interval", interval_s, "seconds between reads of the stream backlogs")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));
  app.add_option("--node-lost-after", lost_after_s,
                 "heartbeat age in seconds after which a node counts as lost")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 86400.0));
  CLI11_PARSE(app, argc, argv);
  config.interval = std::chrono::milliseconds(static_cast<int64_t>(interval_s * 1000));
  config.lost_after = std::chrono::milliseconds(static_cast<int64_t>(lost_after_s * 1000));

  cvm::telemetry::Metrics metrics;
  if (auto st = cvm::service::init_telemetry("cvm-exporter", common, metrics); !st) {
    std::cerr << "cvm-exporter: " << st.error().message << "\n";
    return 2;
  }
  boost::asio::io_context io;
  auto conn = cvm::service::connect_bus("cvm-exporter", common, io, metrics);
  if (!conn) {
    spdlog::critical("cannot connect to NATS at {}: {}", common.nats_url, conn.error().message);
    return 1;
  }
  cvm::SystemClock clock;
  cvm::exporter::ExporterService service(io, *conn, metrics, clock, config);
  cvm::service::start_with_retry(io, [&] { return service.start(); });
  return cvm::service::run_until_signal(io, [&] { service.stop(); });
}
