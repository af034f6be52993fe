// cvm-scheduler: places workspace builds on nodes. main() parses flags and runs SchedulerService.
#include <iostream>
#include <string>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/scheduler/scheduler_service.h"
#include "cvm/service/service.h"

int main(int argc, char** argv) {
  CLI::App app{"cvm-scheduler: places CVM workspace builds on capable nodes"};
  cvm::service::CommonOptions common;
  common.metrics_listen = "127.0.0.1:9461";
  cvm::service::add_common_flags(app, common);
  cvm::scheduler::SchedulerConfig config;
  double node_ttl_s = static_cast<double>(config.node_ttl.count()) / 1000.0;
  app.add_option("--node-ttl", node_ttl_s, "seconds without a heartbeat before a node is not live")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-deliver", config.max_deliver, "deliveries of one request before giving up")
      ->capture_default_str();
  double hold_s = static_cast<double>(config.reservation_hold.count()) / 1000.0;
  app.add_option("--reservation-hold", hold_s,
                 "seconds a capacity hold counts on top of what the node reports allocated")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  std::string sampling = "none";
  app.add_option("--sampling", sampling,
                 "candidate sampling: none (score every feasible node), log2 (Nomad), percent")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "log2", "percent"}));
  app.add_option("--sample-percent", config.sample_percent, "for --sampling percent, 1..100")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  CLI11_PARSE(app, argc, argv);
  config.node_ttl = std::chrono::milliseconds(static_cast<int64_t>(node_ttl_s * 1000));
  config.reservation_hold = std::chrono::milliseconds(static_cast<int64_t>(hold_s * 1000));
  config.sampling = sampling == "log2"      ? cvm::scheduler::Sampling::kLog2
                    : sampling == "percent" ? cvm::scheduler::Sampling::kPercent
                                            : cvm::scheduler::Sampling::kNone;

  return cvm::service::run_service("cvm-scheduler", common,
                                   [&](const cvm::service::ServiceContext& ctx) {
                                     return std::make_unique<cvm::scheduler::SchedulerService>(
                                         ctx.io, ctx.conn, ctx.metrics, ctx.clock, config);
                                   });
}
