// BuildEvent from CVM_EVENTS (the scheduler's last-phase look-up before a NODE_LOST decision,
// cvmctl's watch and event lines) and NodeLostNotice (the scheduler's lost-node subject).
//
// Input: one selector byte (odd: NodeLostNotice), then the payload.
#include "cvm/cli/views.h"
#include "cvm/scheduler/liveness.h"
#include "cvm/v1/node.pb.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const bool notice = (in.byte() & 1) != 0;
  const std::string_view payload = in.rest();
  if (notice) {
    cvm::v1::NodeLostNotice n;
    if (!cvm::fuzz::parse(n, payload)) return 0;
    cvm::scheduler::LivenessTracker t;
    t.observe(n.node_id(), n.last_heartbeat_unix_ms());
    (void)t.sweep(n.detected_unix_ms(), 15'000);
    t.rearm(n.node_id());
    (void)t.is_lost(n.node_id());
    (void)cvm::cli::to_json(n);
    return 0;
  }
  cvm::v1::BuildEvent e;
  if (!cvm::fuzz::parse(e, payload)) return 0;
  (void)cvm::scheduler::lost_node_action(e.phase());
  (void)cvm::cli::format_event_line(e);
  (void)cvm::cli::to_json(e);
  return 0;
}
