// Item 3: a 3-server NATS cluster on loopback (distinct ports, server names, routes) with R3
// streams and buckets, pre-created by the test (ensure_stream keeps an existing stream's replica
// count, so the services bind to them); one server is killed during a burst.
#include <fstream>
#include <sstream>

#include "fault_fixture.h"

namespace cvm::fault {
namespace {

std::string server_logs(const std::vector<std::unique_ptr<test::NatsServer>>& servers) {
  std::string out;
  for (const auto& s : servers) {
    std::ifstream f(s->log_path());
    std::stringstream all;
    all << f.rdbuf();
    const std::string text = all.str();
    out += "\n--- " + s->log_path() + "\n" +
           (text.size() > 3000 ? text.substr(text.size() - 3000) : text);
  }
  return out;
}

TEST_F(FaultTest, ClusterOfThreeLosesOneServerDuringBurst) {
  std::vector<uint16_t> routes;
  for (int i = 0; i < 3; ++i) routes.push_back(test::free_port());
  std::string route_list;
  for (auto p : routes) {
    route_list += (route_list.empty() ? "" : ", ") + std::string("nats-route://127.0.0.1:") +
                  std::to_string(p);
  }
  std::vector<std::unique_ptr<test::NatsServer>> servers;
  for (int i = 0; i < 3; ++i) {
    test::NatsServerOptions o;
    o.server_name = "fault-n" + std::to_string(i);
    o.extra_config =
        "cluster {\n  name: cvm-fault\n  listen: 127.0.0.1:" + std::to_string(routes[i]) +
        "\n  routes: [" + route_list + "]\n}\n";
    servers.push_back(std::make_unique<test::NatsServer>(o));
  }
  for (auto& s : servers) ASSERT_TRUE(s->start().ok());
  std::string urls;
  for (auto& s : servers) urls += (urls.empty() ? "" : ",") + s->url();
  connect_client(urls);

  // R3 everything, once JetStream has a meta leader (the cluster forms in the background).
  auto r3 = [](bus::StreamConfig c) {
    c.replicas = 3;
    return c;
  };
  ASSERT_TRUE(test::wait_until(
      [&] { return client_->ensure_stream(r3(service::builds_stream())).ok(); }, 30s, 250ms))
      << "no JetStream meta leader";
  ASSERT_TRUE(client_->ensure_stream(r3(service::node_work_stream())).ok());
  ASSERT_TRUE(client_->ensure_stream(r3(service::events_stream())).ok());
  for (auto kv :
       {service::nodes_bucket(), service::settings_bucket(), service::workspaces_bucket(),
        service::gpu_leases_bucket(), service::capacity_bucket(), service::placements_bucket()}) {
    kv.replicas = 3;
    auto b = client_->ensure_kv(kv);
    ASSERT_TRUE(b.ok()) << kv.bucket << ": " << b.error().message;
  }

  // Each R3 stream elects its own leader after creation: wait until the events stream takes a
  // write (a PENDING event of a probe build, which the ledger does not count).
  ASSERT_TRUE(test::wait_until(
      [&] {
        return client_->js_publish(wire::build_events_subject("probe"), "", "probe", {}, 1s).ok();
      },
      30s, 250ms))
      << server_logs(servers);

  DurableNodes nodes({.nats_url = urls, .prefix = "c", .nodes = 4});
  ASSERT_TRUE(nodes.start().ok());
  start_broker(urls);
  start_scheduler(urls);

  // A cluster starts slower than one server: the services are up before the burst.
  wait_services_ready();
  auto b = burst("c3", 400, 0, 100, 128 * kMiB);
  ASSERT_TRUE(test::wait_until([&] { return b->submitted.load() >= 150; }, 60s)) << logs();
  servers[0]->kill();  // the first server: every client's first URL, likely a stream leader too
  std::printf("server 0 killed after %d submits\n", b->submitted.load());
  expect_burst_ran_once(*b, nodes, server_logs(servers));
  // How often a redelivered START found its build SCHEDULED but read no placement record (a read
  // behind the write, docs/reliability.md "Record read behind the write"): retried, not dropped as
  // a duplicate.
  size_t behind = 0;
  for (const auto& p : processes_) {
    std::ifstream f(p->log_path());
    for (std::string line; std::getline(f, line);) {
      behind += line.find("placement record cannot be read") != std::string::npos;
    }
  }
  std::printf("redelivered STARTs whose record read was behind: %zu\n", behind);
}

}  // namespace
}  // namespace cvm::fault
