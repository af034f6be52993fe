#include "cvm/scheduler/liveness.h"

#include <algorithm>

namespace cvm::scheduler {

void LivenessTracker::observe(std::string_view node_id, int64_t heartbeat_unix_ms) {
  auto [it, inserted] = nodes_.try_emplace(std::string(node_id));
  if (!inserted && heartbeat_unix_ms <= it->second.heartbeat_unix_ms) return;
  it->second = State{heartbeat_unix_ms, false};
}

void LivenessTracker::forget(std::string_view node_id) { nodes_.erase(std::string(node_id)); }

std::vector<LostNode> LivenessTracker::sweep(int64_t now_unix_ms, int64_t ttl_ms) {
  std::vector<LostNode> out;
  const int64_t live_after = now_unix_ms - ttl_ms;
  for (auto& [id, st] : nodes_) {
    if (st.reported || st.heartbeat_unix_ms >= live_after) continue;
    st.reported = true;
    out.push_back(LostNode{id, st.heartbeat_unix_ms});
  }
  std::sort(out.begin(), out.end(),
            [](const LostNode& a, const LostNode& b) { return a.node_id < b.node_id; });
  return out;
}

void LivenessTracker::rearm(std::string_view node_id) {
  if (auto it = nodes_.find(std::string(node_id)); it != nodes_.end()) it->second.reported = false;
}

bool LivenessTracker::is_lost(std::string_view node_id) const {
  auto it = nodes_.find(std::string(node_id));
  return it != nodes_.end() && it->second.reported;
}

LostAction lost_node_action(std::optional<cvm::v1::Phase> last_phase) {
  if (!last_phase) return LostAction::kPlaceAgain;
  switch (*last_phase) {
    case cvm::v1::PHASE_UNSPECIFIED:
    case cvm::v1::PENDING:
    case cvm::v1::SCHEDULED:
    case cvm::v1::PREPARING:
    case cvm::v1::STARTING:
      return LostAction::kPlaceAgain;
    case cvm::v1::RUNNING:
      return LostAction::kMarkLost;
    default:
      // STOPPING, STOPPED, FAILED, LOST and anything newer than this code.
      return LostAction::kNothing;
  }
}

}  // namespace cvm::scheduler
