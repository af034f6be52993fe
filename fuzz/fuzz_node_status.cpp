// NodeStatus from KV cvm_nodes, as its three readers use it: the scheduler's node index and a
// placement over it, the broker's GPU inventory and choice, and cvmctl's / the exporter's tables.
//
// Input: flags byte (GPU count wanted, low 3 bits), then the payload.
#include <cstdlib>
#include <vector>

#include "cvm/broker/allocator.h"
#include "cvm/cli/views.h"
#include "cvm/scheduler/placement.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const uint8_t flags = in.byte();
  cvm::v1::NodeStatus status;
  if (!cvm::fuzz::parse(status, in.rest())) return 0;
  const int64_t now = status.heartbeat_unix_ms();

  // The scheduler: index it (twice, the second a replace in place), place on it, lease its GPUs.
  cvm::scheduler::NodeIndex index;
  index.upsert(status, 1);
  index.upsert(status, 2);
  if (index.size() != 1) std::abort();
  cvm::scheduler::PlacementRequest request;
  request.gpu_count = flags & 7;
  request.cpu_millicores = 100;
  request.memory_bytes = 1 << 20;
  cvm::scheduler::PlacementOptions options;
  options.now_unix_ms = now;
  options.max_candidates = 2;
  const auto decision = cvm::scheduler::place(index, request, options);
  if (decision.ok() && decision.best().node_id != status.node_id()) std::abort();
  if (decision.ok()) {
    const auto held = cvm::scheduler::reservation_for(request);
    (void)index.reserve("b1", status.node_id(), held);
    (void)cvm::scheduler::place(index, request, options);
    (void)index.release("b1");
  }
  for (const auto& gpu : status.gpus()) index.set_gpu_leased(status.node_id(), gpu.uuid(), true);
  (void)cvm::scheduler::place(index, request, options);
  if (!index.remove(status.node_id())) std::abort();

  // The broker: its inventory, counts, a choice, health notices against an empty node.
  const auto inventory = cvm::broker::inventory_from(status);
  cvm::broker::GpuLeases leases;
  if (!status.gpus().empty()) leases.add(status.gpus(0).uuid(), "ws");
  const cvm::broker::HealthOptions health{.now_unix_ms = now, .healthy_period_ms = 60'000};
  (void)cvm::broker::count_gpus(inventory, leases, health);
  for (const auto& gpu : inventory.gpus) {
    (void)cvm::broker::is_quarantined(gpu, health, cvm::broker::mig_parent(inventory, gpu));
  }
  const auto choice =
      cvm::broker::choose_gpus(inventory, leases, flags & 7, (flags >> 3) * (1ULL << 30), health);
  if (choice.ok() && choice.gpus.size() != (flags & 7u)) std::abort();
  (void)cvm::broker::health_notices(nullptr, inventory, leases, health);
  const cvm::broker::NodeGpuInventory* nodes[] = {&inventory};
  (void)cvm::broker::choose_node(
      nodes, [&](const std::string&) { return leases; },
      {.count = static_cast<uint32_t>(flags & 7), .health = health, .node_ttl_ms = 30'000});

  // cvmctl and the exporter.
  const std::vector<cvm::v1::NodeStatus> all{status};
  (void)cvm::cli::node_capabilities(status);
  (void)cvm::cli::format_nodes_table(all, now);
  std::vector<cvm::v1::GpuLease> lease_list(1);
  lease_list[0].set_node_id(status.node_id());
  lease_list[0].set_gpu_uuid(status.gpus().empty() ? "GPU-x" : status.gpus(0).uuid());
  const auto rows = cvm::cli::gpu_rows(all, lease_list, now);
  (void)cvm::cli::format_gpus_table(rows, now);
  (void)cvm::cli::gpus_json(rows);
  (void)cvm::cli::to_json(status);
  return 0;
}
