// cvm-gpu-broker: leases NVIDIA GPUs to workspaces. main() parses flags and runs BrokerService.
#include <chrono>
#include <cstdint>
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
  cvm::broker::BrokerConfig config;
  int64_t node_ttl_s = config.node_ttl.count() / 1000;
  int64_t lease_grace_s = config.lease_grace.count() / 1000;
  int64_t healthy_period_s = config.healthy_period.count() / 1000;
  int64_t reconcile_s = config.reconcile_interval.count() / 1000;
  app.add_option("--node-ttl", node_ttl_s,
                 "seconds without a heartbeat after which a node's GPU leases are reclaimed")
      ->capture_default_str()
      ->check(CLI::Range(1, 86400));
  app.add_option("--lease-grace", lease_grace_s,
                 "seconds a lease is kept although its workspace is missing or stopped")
      ->capture_default_str()
      ->check(CLI::Range(0, 86400 * 7));
  app.add_option("--gpu-healthy-period", healthy_period_s,
                 "seconds a GPU must stay free of XID/ECC events before it leaves quarantine")
      ->capture_default_str()
      ->check(CLI::Range(0, 86400 * 7));
  app.add_option("--reconcile-interval", reconcile_s, "seconds between lease reconciles")
      ->capture_default_str()
      ->check(CLI::Range(1, 86400));
  CLI11_PARSE(app, argc, argv);
  config.node_ttl = std::chrono::seconds(node_ttl_s);
  config.lease_grace = std::chrono::seconds(lease_grace_s);
  config.healthy_period = std::chrono::seconds(healthy_period_s);
  config.reconcile_interval = std::chrono::seconds(reconcile_s);

  return cvm::service::run_service("cvm-gpu-broker", common,
                                   [&](const cvm::service::ServiceContext& ctx) {
                                     return std::make_unique<cvm::broker::BrokerService>(
                                         ctx.conn, ctx.metrics, ctx.clock, config);
                                   });
}
