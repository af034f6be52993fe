#include "cvm/exporter/exporter.h"

#include <algorithm>
#include <set>

namespace cvm::exporter {

const std::vector<Family>& cluster_families() {
  static const std::vector<Family> kFamilies = {
      {"cvm_cluster_nodes", "Registered nodes by state: live (heartbeat recent) or lost."},
      {"cvm_cluster_node_up", "1 while the node's heartbeat is recent, 0 once it is lost."},
      {"cvm_cluster_node_heartbeat_age_seconds",
       "Seconds since the node's last heartbeat in KV cvm_nodes."},
      {"cvm_cluster_node_runtime_ready",
       "1 when the node's container runtime is ready for workspaces."},
      {"cvm_cluster_nodes_with_capability",
       "Live nodes that have a capability (sysbox, shiftfs, selinux_enforcing, ...)."},
      {"cvm_cluster_node_cpu_millicores", "Node CPU: capacity, and allocated to workspaces."},
      {"cvm_cluster_node_memory_bytes", "Node memory: capacity, and allocated to workspaces."},
      {"cvm_cluster_node_workspaces", "Workspaces the node's agent runs."},
      {"cvm_cluster_gpus", "GPUs of live nodes by state: free, leased or unhealthy."},
      {"cvm_cluster_node_gpus", "GPUs of one node by state: free, leased or unhealthy."},
      {"cvm_cluster_gpu_leases", "GPU leases held in KV cvm_gpu_leases."},
      {"cvm_cluster_consumer_pending_messages",
       "Messages a stream consumer has not been delivered yet (its backlog)."},
      {"cvm_cluster_consumer_ack_pending_messages",
       "Messages a stream consumer was delivered and has not acknowledged yet."},
      {"cvm_cluster_consumer_waiting_pulls",
       "Pull requests a stream consumer has outstanding: 0 means nobody is fetching."},
  };
  return kFamilies;
}

std::vector<Sample> cluster_samples(const ClusterSnapshot& snap, int64_t now_ms,
                                    int64_t lost_after_ms) {
  std::vector<Sample> out;
  auto add = [&out](std::string name, std::map<std::string, std::string> labels, double v) {
    out.push_back({std::move(name), std::move(labels), v});
  };
  static const std::vector<std::string> kCapabilities = {
      "sysbox",          "runtime_ready",  "selinux_enforcing", "shiftfs",
      "idmapped_mounts", "kernel_headers", "bare_metal"};
  std::map<std::string, double> capabilities;
  for (const auto& c : kCapabilities) capabilities[c] = 0;
  std::map<std::string, double> gpus = {{"free", 0}, {"leased", 0}, {"unhealthy", 0}};
  std::set<std::pair<std::string, std::string>> leased;
  for (const auto& [key, l] : snap.leases) leased.insert({l.node_id(), l.gpu_uuid()});

  double live = 0;
  double lost = 0;
  for (const auto& [id, n] : snap.nodes) {
    const std::map<std::string, std::string> node{{"node", id}};
    const int64_t age_ms =
        n.heartbeat_unix_ms() > 0 ? std::max<int64_t>(0, now_ms - n.heartbeat_unix_ms()) : now_ms;
    const bool up = n.heartbeat_unix_ms() > 0 && age_ms <= lost_after_ms;
    (up ? live : lost) += 1;
    add("cvm_cluster_node_up", node, up ? 1 : 0);
    add("cvm_cluster_node_heartbeat_age_seconds", node, static_cast<double>(age_ms) / 1000.0);
    add("cvm_cluster_node_runtime_ready", node, n.runtime().ready() ? 1 : 0);
    add("cvm_cluster_node_workspaces", node, n.workspaces());
    add("cvm_cluster_node_cpu_millicores", {{"node", id}, {"kind", "capacity"}},
        static_cast<double>(n.capacity().cpu_millicores()));
    add("cvm_cluster_node_cpu_millicores", {{"node", id}, {"kind", "allocated"}},
        static_cast<double>(n.allocated().cpu_millicores()));
    add("cvm_cluster_node_memory_bytes", {{"node", id}, {"kind", "capacity"}},
        static_cast<double>(n.capacity().memory_bytes()));
    add("cvm_cluster_node_memory_bytes", {{"node", id}, {"kind", "allocated"}},
        static_cast<double>(n.allocated().memory_bytes()));
    std::map<std::string, double> node_gpus = {{"free", 0}, {"leased", 0}, {"unhealthy", 0}};
    for (const auto& g : n.gpus()) {
      // Unhealthy wins over leased: a leased GPU that failed is what an operator must see.
      const char* state = !g.healthy()                       ? "unhealthy"
                          : leased.count({id, g.uuid()}) > 0 ? "leased"
                                                             : "free";
      node_gpus[state] += 1;
    }
    for (const auto& [state, count] : node_gpus) {
      add("cvm_cluster_node_gpus", {{"node", id}, {"state", state}}, count);
    }
    if (!up) continue;  // a lost node's capabilities and GPUs are not available capacity
    for (const auto& [state, count] : node_gpus) gpus[state] += count;
    const auto& h = n.host();
    capabilities["sysbox"] += n.runtime().sysbox() ? 1 : 0;
    capabilities["runtime_ready"] += n.runtime().ready() ? 1 : 0;
    capabilities["selinux_enforcing"] += h.selinux_enforcing() ? 1 : 0;
    capabilities["shiftfs"] += h.shiftfs_loaded() || h.shiftfs_module_available() ? 1 : 0;
    capabilities["idmapped_mounts"] += h.idmapped_mounts() ? 1 : 0;
    capabilities["kernel_headers"] += h.kernel_headers() ? 1 : 0;
    capabilities["bare_metal"] += h.bare_metal() ? 1 : 0;
  }
  add("cvm_cluster_nodes", {{"state", "live"}}, live);
  add("cvm_cluster_nodes", {{"state", "lost"}}, lost);
  for (const auto& [c, count] : capabilities) {
    add("cvm_cluster_nodes_with_capability", {{"capability", c}}, count);
  }
  for (const auto& [state, count] : gpus) add("cvm_cluster_gpus", {{"state", state}}, count);
  add("cvm_cluster_gpu_leases", {}, static_cast<double>(snap.leases.size()));
  if (snap.consumers_ok) {
    for (const auto* group : {&snap.build_consumers, &snap.work_consumers}) {
      const std::string stream = group == &snap.build_consumers ? "CVM_BUILDS" : "CVM_NODE_WORK";
      for (const auto& c : *group) {
        const std::map<std::string, std::string> labels{{"stream", stream}, {"consumer", c.name}};
        add("cvm_cluster_consumer_pending_messages", labels, static_cast<double>(c.pending));
        add("cvm_cluster_consumer_ack_pending_messages", labels,
            static_cast<double>(c.ack_pending));
        add("cvm_cluster_consumer_waiting_pulls", labels, static_cast<double>(c.waiting));
      }
    }
  }
  return out;
}

}  // namespace cvm::exporter
