#pragma once
// The fleet simulator: N simulated node agents in one process, to load the real scheduler and
// GPU broker at fleet scale. Each simulated node has its own capability profile, registers and
// heartbeats in KV cvm_nodes like cvm-node-agent, has its own NATS subscription on its work
// subject, takes a simulated launch delay and reports the build's events.
//
// What is simulated, and why: there is no container launch (the delay stands in for it) and no
// durable consumer per node (5,000 fetch loops would measure the simulator, not the scheduler):
// each node subscribes to cvm.v1.node.<id>.work, which receives what the scheduler publishes to
// CVM_NODE_WORK. Heartbeats and events are published without waiting for the JetStream ack
// (KV is a stream; a publish on $KV.<bucket>.<key> is a put), so one io thread can play 5,000
// agents. The simulator checks the invariant the scheduler must keep: a node is never asked to run
// more than its capacity, and no build is launched twice.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/clock.h"
#include "cvm/bus/bus.h"
#include "cvm/v1/node.pb.h"

namespace cvm::fleetsim {

struct Profile {
  std::string name;
  uint32_t weight = 1;  // relative share of the fleet
  uint64_t cpu_millicores = 16'000;
  uint64_t memory_bytes = 64ULL << 30;
  bool runtime_ready = true;
  bool selinux_enabled = false;
  bool selinux_enforcing = false;
  bool shiftfs = false;
  bool idmapped_mounts = true;
  bool kernel_headers = true;
  bool bare_metal = false;
  uint32_t gpus = 0;
  uint64_t gpu_memory_bytes = 0;
};

// A mixed fleet: mostly CVM-capable VMs, some bare metal with GPUs, and the profiles placement
// must avoid (SELinux enforcing, runtime not ready).
std::vector<Profile> default_profiles();

struct FleetConfig {
  int nodes = 10;
  std::string prefix = "sim";  // node ids are <prefix>-<index>
  std::vector<Profile> profiles = default_profiles();
  std::chrono::milliseconds launch_delay{20};
  std::chrono::milliseconds heartbeat_interval{5000};
  bool progress_events = true;      // PREPARING and STARTING as well as RUNNING
  bool write_workspaces = true;     // WorkspaceRecord in cvm_workspaces once RUNNING
  bool heartbeat_on_change = true;  // a NodeStatus right after a launch or stop, as the agent does
  // Builds of this image fail at launch, as a real agent's do when the runtime fails: the room is
  // freed, the record says FAILED, then the event.
  std::string fail_image;
  // One subscription per node, as each agent has its own. cnats gives every async subscription
  // its own delivery thread, so for tens of thousands of nodes use one wildcard subscription
  // (cvm.v1.node.*.work) demultiplexed by node id instead.
  bool per_node_subscriptions = true;
};

struct FleetStats {
  uint64_t assignments = 0;
  uint64_t launched = 0;
  uint64_t stopped = 0;
  uint64_t over_capacity = 0;       // assignments that would have put a node over its capacity
  uint64_t duplicate_launches = 0;  // a START of a build already launched on this node
  uint64_t launched_twice = 0;      // a build launched on two different nodes
  uint64_t ignored_dead = 0;        // assignments to killed nodes
  uint64_t heartbeats = 0;
  uint64_t bad_messages = 0;
};

class Fleet {
 public:
  Fleet(boost::asio::io_context& io, bus::ConnectionPtr conn, const Clock& clock,
        FleetConfig config);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // Registers every node, subscribes to each node's work subject, starts heartbeats. Run it on
  // the io thread.
  Status start();
  void stop();

  // Makes the node stop heartbeating and ignore its work, as a crashed host would.
  void kill(const std::string& node_id);

  [[nodiscard]] const FleetStats& stats() const { return stats_; }
  [[nodiscard]] std::vector<std::string> node_ids() const;
  // The build ids launched on a node (for tests).
  [[nodiscard]] std::vector<std::string> launched_on(const std::string& node_id) const;
  [[nodiscard]] std::optional<std::string> node_of_build(const std::string& build_id) const;

 private:
  struct Workspace {
    std::string build_id;
    uint64_t cpu = 0;
    uint64_t memory = 0;
    bool running = false;
    uint64_t seq = 0;  // launch order on the fleet (for NodeStatus.allocated_builds)
  };
  struct Node {
    cvm::v1::NodeStatus status;
    bool dead = false;
    uint64_t used_cpu = 0;
    uint64_t used_memory = 0;
    std::unordered_map<std::string, Workspace> workspaces;  // by workspace id
    std::optional<bus::Subscription> sub;
  };

  void on_work(Node& node, const bus::Message& m);
  void launched(const std::string& node_id, const cvm::v1::NodeAssignment& a);
  void heartbeat(Node& node);
  void tick();
  void event(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase, cvm::v1::Reason reason,
             const std::string& message);

  boost::asio::io_context& io_;
  uint64_t launches_ = 0;
  bus::ConnectionPtr conn_;
  const Clock& clock_;
  FleetConfig config_;
  FleetStats stats_;
  std::vector<std::unique_ptr<Node>> nodes_;
  std::unordered_map<std::string, Node*> by_id_;
  std::unordered_map<std::string, std::string> build_node_;  // build id -> node it launched on
  std::optional<bus::Subscription> shared_sub_;
  boost::asio::steady_timer tick_timer_;
  size_t next_heartbeat_ = 0;
  bool stopped_ = false;
};

}  // namespace cvm::fleetsim
