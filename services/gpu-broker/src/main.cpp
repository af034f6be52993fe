// cvm-gpu-broker: leases NVIDIA GPUs to workspaces. main() parses flags and runs BrokerService.
#include <iostream>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/broker/broker_service.h"
#include "cvm/service/service.h"

int main(int argc, char** argv) {
  CLI::App app{"cvm-gpu-broker: assigns NVIDIA GPUs to workspaces, each to one at a time"};
  cvm::service::CommonOptions common;
  common.metrics_listen = "127.0.0.1:9462";
  cvm::service::add_common_flags(app, common);
  CLI11_PARSE(app, argc, argv);

  cvm::telemetry::Metrics metrics;
  if (auto st = cvm::service::init_telemetry("cvm-gpu-broker", common, metrics); !st) {
    std::cerr << "cvm-gpu-broker: " << st.error().message << "\n";
    return 2;
  }
  boost::asio::io_context io;
  auto conn = cvm::service::connect_bus("cvm-gpu-broker", common, io, metrics);
  if (!conn) {
    spdlog::critical("cannot connect to NATS at {}: {}", common.nats_url, conn.error().message);
    return 1;
  }
  cvm::SystemClock clock;
  cvm::broker::BrokerService service(*conn, metrics, clock);
  cvm::service::start_with_retry(io, [&] { return service.start(); });
  return cvm::service::run_until_signal(io, [&] { service.stop(); });
}
