// A GPU reserve's round trip through the broker against the raw NATS request-reply round trip,
// measured in the same run on the same server (a real nats-server on a free port): the client
// asks an echo responder (same adapter, same payload size, its own io thread, as the broker has)
// and then the broker for one GPU of an 8-GPU node, which it releases untimed. The counters give
// both round trips' p50/p99 and their ratio: what the decision, the ledger write
// (a JetStream KV create) and the reply cost on top of NATS itself.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/wire.h"
#include "cvm/broker/broker_service.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/run_on.h"
#include "cvm/test/wait.h"
#include "cvm/v1/gpu.pb.h"
#include "dgx_fixture.h"

namespace {

using namespace std::chrono_literals;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const auto k = static_cast<size_t>(p * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

struct Loop {
  boost::asio::io_context io;
  std::thread thread;
  Loop() {
    thread = std::thread([this] {
      auto guard = boost::asio::make_work_guard(io);
      io.run();
    });
  }
  ~Loop() {
    io.stop();
    thread.join();
  }
  template <class F>
  auto on(F f) -> decltype(f()) {
    return cvm::test::run_on(io, std::move(f));
  }
};

void BM_ReserveVsRawRequestReply(benchmark::State& state) {
  cvm::test::NatsServer nats;
  if (!nats.start().ok()) {
    state.SkipWithError("nats-server did not start");
    return;
  }
  cvm::SystemClock clock;
  cvm::telemetry::Metrics metrics;
  Loop broker_loop;
  Loop echo_loop;
  Loop client_loop;
  auto broker_conn =
      cvm::bus::Connection::connect({.url = nats.url()}, broker_loop.io.get_executor());
  auto echo_conn = cvm::bus::Connection::connect({.url = nats.url()}, echo_loop.io.get_executor());
  auto client = cvm::bus::Connection::connect({.url = nats.url()}, client_loop.io.get_executor());
  if (!broker_conn || !echo_conn || !client) {
    state.SkipWithError("cannot connect");
    return;
  }
  cvm::broker::BrokerService broker(*broker_conn, metrics, clock);
  if (!broker_loop.on([&] { return broker.start(); }).ok()) {
    state.SkipWithError("broker did not start");
    return;
  }
  auto echo = echo_loop.on([&] {
    return (*echo_conn)->subscribe("bench.echo", "", [&](cvm::bus::Message m) {
      (void)(*echo_conn)->publish(m.reply, m.data);
    });
  });
  auto nodes = (*client)->ensure_kv(cvm::service::nodes_bucket());
  cvm::v1::NodeStatus s;
  s.set_node_id("dgx");
  s.mutable_host()->set_bare_metal(true);
  s.set_heartbeat_unix_ms(clock.now_unix_ms() + 3'600'000);  // alive for the whole run
  for (const auto& g : cvm::broker::fixture::dgx("dgx").gpus) *s.add_gpus() = g;
  if (!echo || !nodes || !nodes->put("dgx", s.SerializeAsString()).ok() ||
      !(*echo_conn)->flush().ok()) {
    state.SkipWithError("setup failed");
    return;
  }
  cvm::test::wait_until([&] {
    return broker_loop.on([&] {
      cvm::v1::GpuReserveRequest probe;
      probe.set_node_id("dgx");
      probe.set_workspace_id("probe");
      probe.set_count(100);
      return broker.reserve(probe).message().find("8 free") != std::string::npos;
    });
  });

  std::vector<double> raw_us;
  std::vector<double> reserve_us;
  int64_t i = 0;
  for (auto _ : state) {
    cvm::v1::GpuReserveRequest req;
    req.set_node_id("dgx");
    req.set_workspace_id("w-" + std::to_string(i));
    req.set_build_id("b-" + std::to_string(i));
    req.set_count(1);
    ++i;
    const auto body = req.SerializeAsString();

    const auto t0 = std::chrono::steady_clock::now();
    auto raw = (*client)->request("bench.echo", body, 5s);
    const auto t1 = std::chrono::steady_clock::now();
    auto reply = (*client)->request(std::string(cvm::wire::kGpuReserve), body, 5s);
    const auto t2 = std::chrono::steady_clock::now();
    cvm::v1::GpuReserveReply r;
    if (!raw || !reply || !r.ParseFromString(reply->data) || !r.ok()) {
      state.SkipWithError("a request failed");
      break;
    }
    raw_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    reserve_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
    state.SetIterationTime(std::chrono::duration<double>(t2 - t1).count());

    cvm::v1::GpuReleaseRequest rel;
    rel.set_workspace_id(req.workspace_id());
    rel.set_lease_id(r.lease_id());
    rel.set_node_id("dgx");
    for (const auto& g : r.gpus()) rel.add_gpu_uuids(g.uuid());
    (void)(*client)->request(std::string(cvm::wire::kGpuRelease), rel.SerializeAsString(), 5s);
  }
  const double raw50 = percentile(raw_us, 0.5);
  const double res50 = percentile(reserve_us, 0.5);
  state.counters["raw_p50_us"] = raw50;
  state.counters["raw_p99_us"] = percentile(raw_us, 0.99);
  state.counters["reserve_p50_us"] = res50;
  state.counters["reserve_p99_us"] = percentile(reserve_us, 0.99);
  state.counters["p50_ratio"] = raw50 > 0 ? res50 / raw50 : 0;
  broker_loop.on([&] {
    echo_loop.on([&] {
      echo->unsubscribe();
      return 0;
    });
    broker.stop();
    return 0;
  });
}
BENCHMARK(BM_ReserveVsRawRequestReply)
    ->UseManualTime()
    ->Iterations(2000)
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
