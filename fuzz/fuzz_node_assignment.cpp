// NodeAssignment from CVM_NODE_WORK, as the node agent reads it (AgentService::on_work): the ids
// it checks before anything else, the request validator, the image reference it will resolve;
// and the WorkspaceRecord of KV cvm_workspaces and the PlacementRecord of KV cvm_placements that
// carry the same request (the agent restores from the first, the scheduler re-places from the
// second).
//
// Input: one selector byte (0: NodeAssignment, 1: WorkspaceRecord, 2: PlacementRecord), payload.
#include "cvm/agent/image.h"
#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/cli/views.h"
#include "cvm/v1/node.pb.h"
#include "fuzz_input.h"

namespace {

void assignment(const cvm::v1::NodeAssignment& a) {
  const auto& r = a.request();
  if (!cvm::wire::is_valid_id(r.build_id()) || !cvm::wire::is_valid_id(r.workspace_id())) return;
  (void)cvm::validate_build_request(r);
  (void)cvm::agent::parse_image_ref(r.image());
  (void)cvm::wire::node_work_subject(a.node_id());
  (void)cvm::wire::build_events_subject(r.build_id());
  (void)cvm::cli::to_json(a);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const uint8_t selector = in.byte() % 3;
  const std::string_view payload = in.rest();
  if (selector == 0) {
    cvm::v1::NodeAssignment a;
    if (cvm::fuzz::parse(a, payload)) assignment(a);
  } else if (selector == 1) {
    cvm::v1::WorkspaceRecord ws;
    if (!cvm::fuzz::parse(ws, payload)) return 0;
    (void)cvm::wire::is_valid_id(ws.workspace_id());
    (void)cvm::agent::parse_image_ref(ws.image());
    (void)cvm::cli::to_json(ws);
  } else {
    cvm::v1::PlacementRecord p;
    if (cvm::fuzz::parse(p, payload)) assignment(p.assignment());
  }
  return 0;
}
