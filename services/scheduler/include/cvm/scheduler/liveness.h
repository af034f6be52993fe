#pragma once
// Node liveness for NODE_LOST: which nodes' heartbeats expired, each reported once per heartbeat,
// and what becomes of a build that was placed on a lost node. Pure: "now" is a parameter.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cvm/v1/build.pb.h"

namespace cvm::scheduler {

struct LostNode {
  std::string node_id;
  int64_t last_heartbeat_unix_ms = 0;
};

class LivenessTracker {
 public:
  // A NodeStatus was seen. A newer heartbeat makes a lost node live again (and able to be lost
  // again later); an older one (a replayed watch entry) changes nothing.
  void observe(std::string_view node_id, int64_t heartbeat_unix_ms);
  // The node was deregistered (its KV entry deleted): it is gone, not lost.
  void forget(std::string_view node_id);
  // Nodes whose last heartbeat is more than ttl_ms before now and that were not reported yet for
  // that heartbeat, sorted by node id.
  std::vector<LostNode> sweep(int64_t now_unix_ms, int64_t ttl_ms);
  // Reports the node again on the next sweep (its notice could not be sent).
  void rearm(std::string_view node_id);
  [[nodiscard]] bool is_lost(std::string_view node_id) const;
  [[nodiscard]] size_t size() const { return nodes_.size(); }

 private:
  struct State {
    int64_t heartbeat_unix_ms = 0;
    bool reported = false;
  };
  std::unordered_map<std::string, State> nodes_;
};

enum class LostAction : uint8_t {
  kPlaceAgain,  // assigned but not running yet: place it on another node
  kMarkLost,    // it was running: tell the requester with a LOST / NODE_LOST event
  kNothing,     // it already ended (FAILED, STOPPED, or already marked LOST)
};

// last_phase: the newest BuildEvent of the build placed on the lost node (nullopt: none yet).
LostAction lost_node_action(std::optional<cvm::v1::Phase> last_phase);

}  // namespace cvm::scheduler
