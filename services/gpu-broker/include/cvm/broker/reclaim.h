#pragma once
// Which leases the broker's reconcile gives back: leases on nodes that are gone or lost, and
// leases of workspaces that no longer exist or stopped without releasing. Pure: the service feeds
// it its watched views of cvm_gpu_leases, cvm_nodes and cvm_workspaces and deletes each planned
// key only if its revision is unchanged, so replicas reconciling at once cannot free a lease that
// was granted again in between.

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"

namespace cvm::broker {

struct LeaseEntry {
  std::string key;
  uint64_t revision = 0;
  cvm::v1::GpuLease lease;
};

struct WorkspaceView {
  cvm::v1::Phase phase = cvm::v1::PHASE_UNSPECIFIED;
  int64_t updated_unix_ms = 0;
};

struct ReclaimOptions {
  int64_t now_unix_ms = 0;
  // A node whose last heartbeat is older than this is lost (0: never by heartbeat).
  int64_t node_ttl_ms = 30'000;
  // A workspace record appears only once its agent starts the build, and a stopped workspace
  // has its agent release on its own: leases younger than this are never reclaimed for a
  // missing or stopped workspace.
  int64_t lease_grace_ms = 10 * 60'000;
};

enum class ReclaimCause { kNodeGone, kNodeLost, kWorkspaceGone, kWorkspaceStopped };
std::string_view reclaim_cause_name(ReclaimCause cause);

struct Reclaim {
  std::string key;
  uint64_t revision = 0;
  ReclaimCause cause = ReclaimCause::kNodeGone;
  std::string workspace_id;
  std::string message;
};

// node_heartbeats: every node in cvm_nodes (with or without GPUs) -> heartbeat_unix_ms.
// workspaces: every record in cvm_workspaces.
std::vector<Reclaim> plan_reclaims(
    std::span<const LeaseEntry> leases,
    const std::map<std::string, int64_t, std::less<>>& node_heartbeats,
    const std::map<std::string, WorkspaceView, std::less<>>& workspaces,
    const ReclaimOptions& options);

}  // namespace cvm::broker
