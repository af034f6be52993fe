// CapacityLedger from KV cvm_capacity (one per node, written by every scheduler replica with
// compare-and-set): the hold arithmetic the scheduler runs on what it read. Checks the ledger's
// own promises: a hold added is held and leaves the node within capacity, a removed one is gone,
// pruning leaves no expired hold.
//
// The capacity check holds for every ledger, even one with holds near 2^64: add_hold's sums
// saturate (they used to wrap: fuzz/findings/README.md keeps those inputs as regression seeds).
//
// Input: a CapacityHold as a short string, then the ledger payload.
#include <algorithm>
#include <cstdlib>

#include "cvm/scheduler/ledger.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  cvm::v1::CapacityHold hold;
  if (!cvm::fuzz::parse(hold, in.short_string())) return 0;
  cvm::v1::CapacityLedger ledger;
  if (!cvm::fuzz::parse(ledger, in.rest())) return 0;
  const int64_t now = 1'000'000;
  (void)cvm::scheduler::held(ledger, now);
  (void)cvm::scheduler::next_expiry(ledger, now);
  cvm::scheduler::NodeRecord node;
  node.node_id = ledger.node_id();
  node.capacity_cpu_millicores = 8000;
  node.capacity_memory_bytes = 16ULL << 30;
  node.allocated_cpu_millicores = 1000;
  node.allocated_memory_bytes = 1ULL << 30;
  const auto result = cvm::scheduler::add_hold(ledger, node, hold, now);
  if (result == cvm::scheduler::HoldResult::kAdded) {
    // The node is not over capacity with the new hold, counted without any wrap-around.
    unsigned __int128 cpu = node.allocated_cpu_millicores;
    unsigned __int128 memory = node.allocated_memory_bytes;
    bool found = false;
    for (const auto& h : ledger.holds()) {
      found = found || h.build_id() == hold.build_id();
      if (h.expires_unix_ms() <= now) continue;
      cpu += h.cpu_millicores();
      memory += h.memory_bytes();
    }
    if (!found || cpu > node.capacity_cpu_millicores || memory > node.capacity_memory_bytes) {
      std::abort();
    }
  }
  (void)cvm::scheduler::prune_expired(ledger, now);
  for (const auto& h : ledger.holds()) {
    if (h.expires_unix_ms() <= now) std::abort();
  }
  // One hold of that build fewer (a corrupt ledger may hold duplicates; one removal each).
  const auto count = [&] {
    return std::count_if(ledger.holds().begin(), ledger.holds().end(),
                         [&](const auto& h) { return h.build_id() == hold.build_id(); });
  };
  const auto before = count();
  if (cvm::scheduler::remove_hold(ledger, hold.build_id(), now) != (before > 0) ||
      count() != std::max<decltype(before)>(before - 1, 0)) {
    std::abort();
  }
  return 0;
}
