// cvm-exporter's samples as a function of the cluster snapshot.
#include <gtest/gtest.h>

#include <optional>

#include "cvm/exporter/exporter.h"

namespace cvm::exporter {
namespace {

std::optional<double> value(const std::vector<Sample>& samples, const std::string& name,
                            const std::map<std::string, std::string>& labels) {
  for (const auto& s : samples) {
    if (s.name == name && s.labels == labels) return s.value;
  }
  return std::nullopt;
}

size_t count(const std::vector<Sample>& samples, const std::string& name) {
  size_t n = 0;
  for (const auto& s : samples) n += s.name == name ? 1 : 0;
  return n;
}

cvm::v1::NodeStatus node(const std::string& id, int64_t heartbeat) {
  cvm::v1::NodeStatus n;
  n.set_node_id(id);
  n.set_heartbeat_unix_ms(heartbeat);
  n.mutable_runtime()->set_ready(true);
  n.mutable_host()->set_idmapped_mounts(true);
  n.mutable_capacity()->set_cpu_millicores(4000);
  n.mutable_allocated()->set_cpu_millicores(500);
  return n;
}

TEST(Exporter, AnEmptyClusterStillHasEveryAggregateSeries) {
  const auto s = cluster_samples({}, 1000, 30'000);
  EXPECT_EQ(value(s, "cvm_cluster_nodes", {{"state", "live"}}), 0);
  EXPECT_EQ(value(s, "cvm_cluster_nodes", {{"state", "lost"}}), 0);
  EXPECT_EQ(count(s, "cvm_cluster_nodes_with_capability"), 7u);
  EXPECT_EQ(count(s, "cvm_cluster_gpus"), 3u);
  EXPECT_EQ(value(s, "cvm_cluster_gpu_leases", {}), 0);
  EXPECT_EQ(count(s, "cvm_cluster_consumer_pending_messages"), 0u) << "consumers unknown";
  // Every sample belongs to a documented family.
  for (const auto& sample : s) {
    bool known = false;
    for (const auto& f : cluster_families()) known |= f.name == sample.name;
    EXPECT_TRUE(known) << sample.name;
  }
}

TEST(Exporter, NodesAreLiveUntilTheirHeartbeatIsTooOld) {
  ClusterSnapshot snap;
  snap.nodes["fresh"] = node("fresh", 95'000);
  snap.nodes["stale"] = node("stale", 60'000);
  snap.nodes["never"] = node("never", 0);
  snap.nodes["stale"].mutable_host()->set_selinux_enforcing(true);
  const auto s = cluster_samples(snap, 100'000, 30'000);
  EXPECT_EQ(value(s, "cvm_cluster_nodes", {{"state", "live"}}), 1);
  EXPECT_EQ(value(s, "cvm_cluster_nodes", {{"state", "lost"}}), 2);
  EXPECT_EQ(value(s, "cvm_cluster_node_up", {{"node", "fresh"}}), 1);
  EXPECT_EQ(value(s, "cvm_cluster_node_up", {{"node", "stale"}}), 0);
  EXPECT_EQ(value(s, "cvm_cluster_node_heartbeat_age_seconds", {{"node", "fresh"}}), 5.0);
  EXPECT_EQ(value(s, "cvm_cluster_node_heartbeat_age_seconds", {{"node", "stale"}}), 40.0);
  // Exactly at the limit is still live.
  EXPECT_EQ(
      value(cluster_samples(snap, 90'000, 30'000), "cvm_cluster_node_up", {{"node", "stale"}}), 1);
  // Capabilities count live nodes only: the lost SELinux node is not capacity.
  EXPECT_EQ(value(s, "cvm_cluster_nodes_with_capability", {{"capability", "idmapped_mounts"}}), 1);
  EXPECT_EQ(value(s, "cvm_cluster_nodes_with_capability", {{"capability", "selinux_enforcing"}}),
            0);
  EXPECT_EQ(value(s, "cvm_cluster_node_cpu_millicores", {{"node", "fresh"}, {"kind", "capacity"}}),
            4000);
  EXPECT_EQ(value(s, "cvm_cluster_node_cpu_millicores", {{"node", "fresh"}, {"kind", "allocated"}}),
            500);
}

TEST(Exporter, GpusAreFreeLeasedOrUnhealthyAndUnhealthyWins) {
  ClusterSnapshot snap;
  auto n = node("g1", 100'000);
  for (const char* uuid : {"GPU-0", "GPU-1", "GPU-2", "GPU-3"}) {
    auto* g = n.add_gpus();
    g->set_uuid(uuid);
    g->set_healthy(std::string(uuid) != "GPU-3" && std::string(uuid) != "GPU-2");
  }
  snap.nodes["g1"] = n;
  for (const char* uuid : {"GPU-1", "GPU-2"}) {
    cvm::v1::GpuLease l;
    l.set_node_id("g1");
    l.set_gpu_uuid(uuid);
    snap.leases[std::string("g1.") + uuid] = l;
  }
  const auto s = cluster_samples(snap, 100'000, 30'000);
  EXPECT_EQ(value(s, "cvm_cluster_gpus", {{"state", "free"}}), 1);
  EXPECT_EQ(value(s, "cvm_cluster_gpus", {{"state", "leased"}}), 1);
  EXPECT_EQ(value(s, "cvm_cluster_gpus", {{"state", "unhealthy"}}), 2);
  EXPECT_EQ(value(s, "cvm_cluster_node_gpus", {{"node", "g1"}, {"state", "unhealthy"}}), 2);
  EXPECT_EQ(value(s, "cvm_cluster_gpu_leases", {}), 2);
  // Once the node is lost its GPUs leave the cluster totals but stay visible per node.
  const auto later = cluster_samples(snap, 200'000, 30'000);
  EXPECT_EQ(value(later, "cvm_cluster_gpus", {{"state", "unhealthy"}}), 0);
  EXPECT_EQ(value(later, "cvm_cluster_node_gpus", {{"node", "g1"}, {"state", "unhealthy"}}), 2);
}

TEST(Exporter, ConsumerBacklogsAreLabelledByStreamAndConsumer) {
  ClusterSnapshot snap;
  snap.consumers_ok = true;
  snap.build_consumers.push_back(
      {.name = "scheduler", .pending = 7, .ack_pending = 2, .waiting = 1});
  snap.work_consumers.push_back({.name = "agent-n1", .pending = 3});
  const auto s = cluster_samples(snap, 0, 30'000);
  EXPECT_EQ(value(s, "cvm_cluster_consumer_pending_messages",
                  {{"stream", "CVM_BUILDS"}, {"consumer", "scheduler"}}),
            7);
  EXPECT_EQ(value(s, "cvm_cluster_consumer_ack_pending_messages",
                  {{"stream", "CVM_BUILDS"}, {"consumer", "scheduler"}}),
            2);
  EXPECT_EQ(value(s, "cvm_cluster_consumer_waiting_pulls",
                  {{"stream", "CVM_BUILDS"}, {"consumer", "scheduler"}}),
            1);
  EXPECT_EQ(value(s, "cvm_cluster_consumer_pending_messages",
                  {{"stream", "CVM_NODE_WORK"}, {"consumer", "agent-n1"}}),
            3);
  // A failed read drops the backlog series rather than repeating stale numbers.
  snap.consumers_ok = false;
  EXPECT_EQ(count(cluster_samples(snap, 0, 30'000), "cvm_cluster_consumer_pending_messages"), 0u);
}

}  // namespace
}  // namespace cvm::exporter
