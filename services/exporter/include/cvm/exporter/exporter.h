#pragma once
// cvm-exporter's metrics: the cluster as the bus holds it (node heartbeats and capabilities, GPU
// health and leases, consumer backlogs), which no single service can report (a dead agent cannot
// say it is dead). Pure: a snapshot and a time in, samples out; exporter_service.cpp reads the bus.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cvm/bus/bus.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::exporter {

struct ClusterSnapshot {
  std::map<std::string, cvm::v1::NodeStatus> nodes;  // by node id
  std::map<std::string, cvm::v1::GpuLease> leases;   // by ledger key
  std::vector<bus::ConsumerState> build_consumers;   // CVM_BUILDS
  std::vector<bus::ConsumerState> work_consumers;    // CVM_NODE_WORK
  bool consumers_ok = false;  // false: the last read of consumer states failed
};

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct Family {
  std::string name;
  std::string help;
};

// Every family cluster_samples() may emit, with its help text.
const std::vector<Family>& cluster_families();

// lost_after_ms: a node whose heartbeat is older counts as lost. Families that dashboards and
// alerts aggregate (node counts, GPU counts, capabilities) always have every label value, zeros
// included, so their queries return a result on an idle or empty cluster.
std::vector<Sample> cluster_samples(const ClusterSnapshot& snapshot, int64_t now_ms,
                                    int64_t lost_after_ms);

}  // namespace cvm::exporter
