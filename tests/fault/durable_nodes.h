#pragma once
// Simulated nodes that keep the agent's durability promises, for faults of NATS itself: each node
// has its own durable pull consumer on CVM_NODE_WORK ("agent-<node>", as cvm-node-agent), publishes
// RUNNING with a JetStream ack (retrying on a nak), writes the WorkspaceRecord, and acks the
// assignment only after both. The fleet simulator (tools/fleet-sim) uses core subscriptions and
// unacknowledged publishes so one thread can play thousands of nodes; those lose work when the
// server goes away, which would blame the services for the simulator's shortcut.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/result.h"
#include "cvm/bus/bus.h"

namespace cvm::fault {

struct DurableNodesConfig {
  std::string nats_url;
  std::string prefix = "d";
  int nodes = 4;
  uint64_t cpu_millicores = 16'000;
  uint64_t memory_bytes = 64ULL << 30;
  std::chrono::milliseconds heartbeat{1000};
};

class DurableNodes {
 public:
  explicit DurableNodes(DurableNodesConfig config);
  ~DurableNodes();
  DurableNodes(const DurableNodes&) = delete;
  DurableNodes& operator=(const DurableNodes&) = delete;

  Status start();  // registers, starts consumers and heartbeats on its own io thread

  [[nodiscard]] uint64_t over_capacity() const { return over_capacity_.load(); }
  [[nodiscard]] uint64_t launched_twice() const { return launched_twice_.load(); }
  [[nodiscard]] uint64_t launched() const { return launched_.load(); }
  // build -> the node that launched it (a copy, taken on the nodes' own thread).
  [[nodiscard]] std::map<std::string, std::string> launched_builds();

 private:
  struct Node {
    std::string id;
    uint64_t used_cpu = 0;
    uint64_t used_memory = 0;
    std::set<std::string> workspaces;
    std::unique_ptr<bus::PullConsumer> consumer;
  };
  void on_work(Node& node, const bus::JsMessagePtr& msg);
  void heartbeat();
  void schedule_heartbeat();

  DurableNodesConfig config_;
  boost::asio::io_context io_;
  std::thread thread_;
  bus::ConnectionPtr conn_;
  std::unique_ptr<bus::KeyValue> nodes_kv_;
  std::unique_ptr<bus::KeyValue> workspaces_kv_;
  std::vector<std::unique_ptr<Node>> nodes_;
  std::map<std::string, std::string> build_node_;  // build -> node that ran it
  std::unique_ptr<boost::asio::steady_timer> timer_;
  std::atomic<uint64_t> over_capacity_{0};
  std::atomic<uint64_t> launched_twice_{0};
  std::atomic<uint64_t> launched_{0};
};

}  // namespace cvm::fault
