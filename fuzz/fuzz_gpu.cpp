// The GPU broker's bus input: GpuReserveRequest and GpuReleaseRequest (cvm.v1.gpu.reserve /
// .release), their replies as the scheduler reads them, and GpuLease from KV cvm_gpu_leases (read
// by the broker, the scheduler's index and cvmctl). A reserve goes on to the broker's pure
// decision: the policy, then the node and GPU choice over a fixed two-node inventory.
//
// Input: one selector byte (mod 4: reserve, release, reserve reply, lease), then the payload.
#include <vector>

#include "cvm/broker/allocator.h"
#include "cvm/cli/views.h"
#include "cvm/scheduler/placement.h"
#include "cvm/v1/gpu.pb.h"
#include "fuzz_input.h"

namespace {

const std::vector<cvm::broker::NodeGpuInventory>& fixed_nodes() {
  static const auto nodes = [] {
    std::vector<cvm::broker::NodeGpuInventory> v(2);
    for (int n = 0; n < 2; ++n) {
      v[n].node_id = "gpu-node-" + std::to_string(n);
      v[n].bare_metal = true;
      v[n].heartbeat_unix_ms = 1'000'000;
      for (uint32_t g = 0; g < 4; ++g) {
        cvm::v1::GpuDevice d;
        d.set_uuid("GPU-" + std::to_string(n) + "-" + std::to_string(g));
        d.set_vendor(cvm::v1::NVIDIA);
        d.set_memory_bytes((g + 1) * (8ULL << 30));
        d.set_minor(g);
        d.set_healthy(true);
        v[n].gpus.push_back(d);
      }
    }
    return v;
  }();
  return nodes;
}

void reserve(const cvm::v1::GpuReserveRequest& req) {
  if (auto refusal = cvm::broker::check_gpu_policy(
          {.vendor = req.vendor(), .bare_metal = true, .cached_cvm = req.cached_cvm()})) {
    return;
  }
  std::vector<const cvm::broker::NodeGpuInventory*> nodes;
  for (const auto& n : fixed_nodes()) {
    if (req.node_id().empty() || req.node_id() == n.node_id) nodes.push_back(&n);
  }
  cvm::broker::GpuLeases leased;
  leased.add("GPU-0-0", req.workspace_id());
  const auto choice =
      cvm::broker::choose_node(nodes, [&](const std::string&) { return leased; },
                               {.count = req.count(),
                                .min_memory_bytes = req.min_memory_bytes(),
                                .vendor = req.vendor(),
                                .cached_cvm = req.cached_cvm(),
                                .health = {.now_unix_ms = 1'000'100, .healthy_period_ms = 60'000},
                                .node_ttl_ms = 30'000});
  if (choice.ok()) {
    for (const auto& gpu : choice.choice.gpus) {
      (void)cvm::broker::lease_key(choice.node_id, gpu.uuid());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const uint8_t selector = in.byte() % 4;
  const std::string_view payload = in.rest();
  switch (selector) {
    case 0: {
      cvm::v1::GpuReserveRequest req;
      if (cvm::fuzz::parse(req, payload)) reserve(req);
      break;
    }
    case 1: {
      cvm::v1::GpuReleaseRequest req;
      if (!cvm::fuzz::parse(req, payload)) break;
      for (const auto& uuid : req.gpu_uuids()) (void)cvm::broker::lease_key(req.node_id(), uuid);
      (void)cvm::broker::node_leases_filter(req.node_id());
      (void)cvm::cli::to_json(req);
      break;
    }
    case 2: {
      cvm::v1::GpuReserveReply reply;
      if (cvm::fuzz::parse(reply, payload)) (void)cvm::cli::to_json(reply);
      break;
    }
    default: {
      cvm::v1::GpuLease lease;
      if (!cvm::fuzz::parse(lease, payload)) break;
      const std::vector<cvm::v1::GpuLease> leases{lease};
      const auto on_node = cvm::broker::leases_on_node(lease.node_id(), leases);
      (void)on_node.holder(lease.gpu_uuid());
      cvm::scheduler::NodeIndex index;
      index.set_gpu_leased(lease.node_id(), lease.gpu_uuid(), true);
      index.set_gpu_leased(lease.node_id(), lease.gpu_uuid(), false);
      cvm::v1::NodeStatus node;
      node.set_node_id(lease.node_id());
      (void)cvm::cli::gpu_rows({node}, leases, lease.leased_unix_ms());
      break;
    }
  }
  return 0;
}
