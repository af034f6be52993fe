#include "cvm/broker/reclaim.h"

namespace cvm::broker {

std::string_view reclaim_cause_name(ReclaimCause cause) {
  switch (cause) {
    case ReclaimCause::kNodeGone:
      return "node-gone";
    case ReclaimCause::kNodeLost:
      return "node-lost";
    case ReclaimCause::kWorkspaceGone:
      return "workspace-gone";
    case ReclaimCause::kWorkspaceStopped:
      return "workspace-stopped";
  }
  return "unknown";
}

std::vector<Reclaim> plan_reclaims(
    std::span<const LeaseEntry> leases,
    const std::map<std::string, int64_t, std::less<>>& node_heartbeats,
    const std::map<std::string, WorkspaceView, std::less<>>& workspaces,
    const ReclaimOptions& options) {
  std::vector<Reclaim> out;
  for (const auto& entry : leases) {
    const auto& lease = entry.lease;
    Reclaim r{.key = entry.key, .revision = entry.revision, .workspace_id = lease.workspace_id()};
    const auto node = node_heartbeats.find(lease.node_id());
    if (node == node_heartbeats.end()) {
      r.cause = ReclaimCause::kNodeGone;
      r.message = "node " + lease.node_id() + " is no longer registered";
      out.push_back(std::move(r));
      continue;
    }
    if (options.node_ttl_ms > 0 && options.now_unix_ms - node->second > options.node_ttl_ms) {
      r.cause = ReclaimCause::kNodeLost;
      r.message = "node " + lease.node_id() + " has not heartbeated for " +
                  std::to_string((options.now_unix_ms - node->second) / 1000) + " s";
      out.push_back(std::move(r));
      continue;
    }
    const bool old_enough = options.now_unix_ms - lease.leased_unix_ms() > options.lease_grace_ms;
    if (!old_enough) continue;
    const auto ws = workspaces.find(lease.workspace_id());
    if (ws == workspaces.end()) {
      r.cause = ReclaimCause::kWorkspaceGone;
      r.message = "workspace " + lease.workspace_id() + " no longer exists";
      out.push_back(std::move(r));
      continue;
    }
    // Stopped (or failed) after the lease was granted, and it has stayed so past the grace: the
    // release that should have followed never came. A lease granted after the stop belongs to a
    // newer start whose agent has not written the record yet.
    const auto phase = ws->second.phase;
    if ((phase == cvm::v1::STOPPED || phase == cvm::v1::FAILED) &&
        ws->second.updated_unix_ms >= lease.leased_unix_ms() &&
        options.now_unix_ms - ws->second.updated_unix_ms > options.lease_grace_ms) {
      r.cause = ReclaimCause::kWorkspaceStopped;
      r.message = "workspace " + lease.workspace_id() + " is " +
                  (phase == cvm::v1::STOPPED ? "stopped" : "failed");
      out.push_back(std::move(r));
    }
  }
  return out;
}

}  // namespace cvm::broker
