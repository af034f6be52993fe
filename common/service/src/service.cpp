#include "cvm/service/service.h"

#include <csignal>
#include <string>

#include <spdlog/spdlog.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/telemetry/logging.h"

namespace cvm::service {

void add_common_flags(CLI::App& app, CommonOptions& options) {
  app.add_option("--nats-url", options.nats_url, "NATS server URL(s), comma-separated")
      ->capture_default_str()
      ->envname("CVM_NATS_URL");
  app.add_option("--nats-user", options.nats_user, "NATS user")->envname("CVM_NATS_USER");
  app.add_option("--nats-password", options.nats_password, "NATS password")
      ->envname("CVM_NATS_PASSWORD");
  app.add_option("--metrics-listen", options.metrics_listen,
                 "HOST:PORT serving Prometheus /metrics ('off' disables)")
      ->capture_default_str();
  app.add_option("--log-format", options.log_format, "text or json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  app.add_option("--log-level", options.log_level, "trace, debug, info, warn or error")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
}

Status init_telemetry(std::string_view service, const CommonOptions& options,
                      telemetry::Metrics& metrics) {
  auto format = telemetry::parse_log_format(options.log_format);
  if (!format) return format.error();
  telemetry::init_logging(service, *format, options.log_level);
  if (auto st = metrics.listen(options.metrics_listen); !st) return st;
  if (metrics.port() != 0) spdlog::info("serving /metrics on port {}", metrics.port());
  return {};
}

Result<bus::ConnectionPtr> connect_bus(std::string_view service, const CommonOptions& options,
                                       boost::asio::io_context& io, telemetry::Metrics& metrics,
                                       std::function<void()> on_closed) {
  const std::string events = "cvm_nats_connection_events_total";
  const std::string help =
      "NATS connection events: disconnected, reconnected, closed, error, slow_consumer";
  auto& disconnected = metrics.counter(events, help, {{"event", "disconnected"}});
  auto& reconnected = metrics.counter(events, help, {{"event", "reconnected"}});
  auto& closed = metrics.counter(events, help, {{"event", "closed"}});
  auto& errors = metrics.counter(events, help, {{"event", "error"}});
  auto& slow = metrics.counter(events, help, {{"event", "slow_consumer"}});

  bus::ConnectOptions co;
  co.url = options.nats_url;
  co.name = std::string(service);
  co.user = options.nats_user;
  co.password = options.nats_password;
  co.on_disconnected = [&disconnected] {
    disconnected.Increment();
    spdlog::warn("disconnected from NATS; reconnecting");
  };
  co.on_reconnected = [&reconnected] {
    reconnected.Increment();
    spdlog::info("reconnected to NATS");
  };
  co.on_closed = [&closed, on_closed = std::move(on_closed)] {
    closed.Increment();
    spdlog::info("NATS connection closed");
    if (on_closed) on_closed();
  };
  co.on_error = [&errors, &slow](const Error& e) {
    errors.Increment();
    // Messages were dropped (by cnats or, once it cut us, by the server): say so by name, since
    // whoever relied on them must now count on redelivery.
    if (bus::is_slow_consumer(e)) {
      slow.Increment();
      spdlog::error("NATS: slow consumer, messages were dropped: {}", e.message);
      return;
    }
    spdlog::error("NATS: {}", e.message);
  };
  return bus::Connection::connect(co, io.get_executor());
}

namespace {
// Owns itself through the pending timer handler only, so it is freed once start() succeeds or the
// io_context is destroyed.
struct StartRetry : std::enable_shared_from_this<StartRetry> {
  StartRetry(boost::asio::io_context& io, std::function<Status()> fn, std::chrono::milliseconds d)
      : start(std::move(fn)), delay(d), timer(io) {}
  void attempt() {
    auto st = start();
    if (st) return;
    spdlog::warn("start failed, retrying in {} ms: {}", delay.count(), st.error().message);
    timer.expires_after(delay);
    timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (!ec) self->attempt();
    });
  }
  std::function<Status()> start;
  std::chrono::milliseconds delay;
  boost::asio::steady_timer timer;
};
}  // namespace

void start_with_retry(boost::asio::io_context& io, std::function<Status()> start,
                      std::chrono::milliseconds delay) {
  auto retry = std::make_shared<StartRetry>(io, std::move(start), delay);
  boost::asio::post(io, [retry] { retry->attempt(); });
}

int run_until_signal(boost::asio::io_context& io, const std::function<void()>& on_stop) {
  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  auto guard = boost::asio::make_work_guard(io);
  signals.async_wait([&](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    spdlog::info("signal {} received; stopping", signo);
    if (on_stop) on_stop();
    guard.reset();
    // Background threads (fetch loops, watches) may keep posting; stop rather than drain forever.
    io.stop();
  });
  io.run();
  return 0;
}

}  // namespace cvm::service
