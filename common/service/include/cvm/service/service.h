#pragma once
// What every cvm-control process shares: the common flags of the wire contract (--nats-url,
// --metrics-listen, --log-format), connecting to the bus with logged, counted connection events,
// and running an io_context until SIGINT/SIGTERM.

#include <chrono>
#include <functional>
#include <string>

#include <iostream>
#include <string_view>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/result.h"
#include "cvm/bus/bus.h"
#include "cvm/telemetry/metrics.h"

namespace cvm::service {

struct CommonOptions {
  std::string nats_url = "nats://127.0.0.1:4222";
  std::string nats_user;
  std::string nats_password;
  std::string metrics_listen;  // each binary sets its own default port
  std::string log_format = "text";
  std::string log_level = "info";
};

void add_common_flags(CLI::App& app, CommonOptions& options);

// Sets up logging and metrics from the options; returns an error for a bad --log-format or a
// metrics address that cannot be bound.
Status init_telemetry(std::string_view service, const CommonOptions& options,
                      telemetry::Metrics& metrics);

// Connects with reconnect-forever; disconnects, reconnects and async errors are logged and counted
// in cvm_nats_connection_events_total{event=...} (slow_consumer: messages were dropped).
// on_closed (on the io thread) runs after cnats has closed the connection for good.
Result<bus::ConnectionPtr> connect_bus(std::string_view service, const CommonOptions& options,
                                       boost::asio::io_context& io, telemetry::Metrics& metrics,
                                       std::function<void()> on_closed = {});

// The exit code of a service whose NATS connection was closed for good (see run_service).
inline constexpr int kExitConnectionClosed = 3;

// Calls start() on the io thread until it succeeds, waiting `delay` between tries, so a service
// that comes up before NATS (or while JetStream is still electing) waits instead of exiting.
void start_with_retry(boost::asio::io_context& io, std::function<Status()> start,
                      std::chrono::milliseconds delay = std::chrono::milliseconds{1000});

// Runs `io` on this thread until SIGINT or SIGTERM, then calls on_stop (on the io thread) and
// lets the context drain. Returns the process exit code.
int run_until_signal(boost::asio::io_context& io, const std::function<void()>& on_stop);

// What a service is built from.
struct ServiceContext {
  boost::asio::io_context& io;
  bus::ConnectionPtr conn;
  telemetry::Metrics& metrics;
  const Clock& clock;
};

// The whole life of a service process after flag parsing: telemetry, the bus connection, the
// service `make(ctx)` builds (anything with Status start() and void stop()), started with retry
// and run until SIGINT/SIGTERM. Returns the exit code: 2 for bad telemetry flags, 1 when NATS
// cannot even be dialled, kExitConnectionClosed when cnats closed the connection for good, else 0.
//
// A closed connection is never retried on: cnats reconnects forever, so it only closes one it
// gave up on (the server died during the first handshake, authorization refused on reconnect),
// and every later call on it fails with "Connection Closed" (docs/reliability.md, "Closed
// connection"). Rather than rebuild every subscription, consumer and watch on a fresh connection
// inside the process, the service stops and exits non-zero with a critical log line, so that its
// supervisor (systemd Restart=on-failure, Kubernetes) starts it again from scratch, like after a
// crash.
template <class MakeService>
int run_service(std::string_view name, const CommonOptions& common, MakeService make) {
  telemetry::Metrics metrics;
  if (auto st = init_telemetry(name, common, metrics); !st) {
    std::cerr << name << ": " << st.error().message << "\n";
    return 2;
  }
  boost::asio::io_context io;
  bool stopping = false;
  int exit_code = 0;
  std::function<void()> stop_service;
  auto conn = connect_bus(name, common, io, metrics, [&] {
    if (stopping) return;  // our own close at shutdown
    stopping = true;
    spdlog::critical(
        "the NATS connection is closed for good (cnats gave up on it); exiting with status {} so "
        "that the supervisor restarts the service",
        kExitConnectionClosed);
    exit_code = kExitConnectionClosed;
    if (stop_service) stop_service();
    io.stop();
  });
  if (!conn) {
    spdlog::critical("cannot connect to NATS at {}: {}", common.nats_url, conn.error().message);
    return 1;
  }
  SystemClock clock;
  auto service = make(ServiceContext{io, *conn, metrics, clock});
  stop_service = [&] { service->stop(); };
  start_with_retry(io, [&] { return service->start(); });
  const int rc = run_until_signal(io, [&] {
    if (stopping) return;
    stopping = true;
    service->stop();
  });
  return exit_code != 0 ? exit_code : rc;
}

}  // namespace cvm::service
