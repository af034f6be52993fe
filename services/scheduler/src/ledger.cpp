#include "cvm/scheduler/ledger.h"

#include <algorithm>
#include <limits>

namespace cvm::scheduler {

namespace {
bool in_force(const cvm::v1::CapacityHold& h, int64_t now) { return h.expires_unix_ms() > now; }

// Ledgers come from KV, which any replica (or a corrupt write) may have filled: a hold near 2^64
// must read as "full", never wrap around into "room" (found by fuzz_capacity_ledger).
template <class T>
T saturating_add(T a, T b) {
  T out{};
  return __builtin_add_overflow(a, b, &out) ? std::numeric_limits<T>::max() : out;
}
}  // namespace

bool covered_by_node(const NodeRecord& node, const cvm::v1::CapacityHold& hold) {
  const auto it = std::lower_bound(
      node.allocated_builds.begin(), node.allocated_builds.end(), hold.build_id(),
      [](const AllocatedBuild& b, const std::string& id) { return b.build_id < id; });
  return it != node.allocated_builds.end() && it->build_id == hold.build_id() &&
         it->cpu_millicores >= hold.cpu_millicores() && it->memory_bytes >= hold.memory_bytes();
}

Reservation held(const cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms,
                 const NodeRecord* node) {
  Reservation r;
  for (const auto& h : ledger.holds()) {
    if (!in_force(h, now_unix_ms)) continue;
    r.gpus = saturating_add<uint32_t>(r.gpus, h.gpus());
    if (node != nullptr && covered_by_node(*node, h)) continue;
    r.cpu_millicores = saturating_add<uint64_t>(r.cpu_millicores, h.cpu_millicores());
    r.memory_bytes = saturating_add<uint64_t>(r.memory_bytes, h.memory_bytes());
  }
  return r;
}

std::optional<int64_t> next_expiry(const cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms) {
  std::optional<int64_t> out;
  for (const auto& h : ledger.holds()) {
    if (!in_force(h, now_unix_ms)) continue;
    if (!out || h.expires_unix_ms() < *out) out = h.expires_unix_ms();
  }
  return out;
}

size_t prune_expired(cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms) {
  auto* holds = ledger.mutable_holds();
  const auto before = holds->size();
  holds->erase(std::remove_if(holds->begin(), holds->end(),
                              [&](const auto& h) { return !in_force(h, now_unix_ms); }),
               holds->end());
  return static_cast<size_t>(before - holds->size());
}

HoldResult add_hold(cvm::v1::CapacityLedger& ledger, const NodeRecord& node,
                    const cvm::v1::CapacityHold& hold, int64_t now_unix_ms) {
  prune_expired(ledger, now_unix_ms);
  for (auto& h : *ledger.mutable_holds()) {
    if (h.build_id() != hold.build_id()) continue;
    // A redelivery finishing a placement comes about when the first hold expires (the ack wait
    // and the hold last as long): kept as it was, it would lapse a moment later and the room go
    // to others while the assignment is on its way (docs/reliability.md, "Expired hold at
    // redelivery"; seen under ASan).
    if (h.expires_unix_ms() >= hold.expires_unix_ms()) return HoldResult::kAlreadyHeld;
    h.set_expires_unix_ms(hold.expires_unix_ms());
    return HoldResult::kRenewed;
  }
  // A build the node already counts in `allocated` takes no new room (a redelivered START
  // holding again for a build its agent has just launched).
  if (covered_by_node(node, hold)) {
    *ledger.add_holds() = hold;
    return HoldResult::kAdded;
  }
  const Reservation others = held(ledger, now_unix_ms, &node);
  // Compare by adding, never subtracting, so a node already over its capacity (an agent that
  // reports more than it has) cannot wrap around into "lots of room"; the sums saturate.
  const auto sum = [](uint64_t a, uint64_t b, uint64_t c) {
    return saturating_add(saturating_add(a, b), c);
  };
  const bool cpu_fits = sum(node.allocated_cpu_millicores, others.cpu_millicores,
                            hold.cpu_millicores()) <= node.capacity_cpu_millicores;
  const bool memory_fits = sum(node.allocated_memory_bytes, others.memory_bytes,
                               hold.memory_bytes()) <= node.capacity_memory_bytes;
  if (!cpu_fits || !memory_fits) return HoldResult::kNoRoom;
  *ledger.add_holds() = hold;
  return HoldResult::kAdded;
}

bool remove_hold(cvm::v1::CapacityLedger& ledger, std::string_view build_id, int64_t now_unix_ms) {
  auto* holds = ledger.mutable_holds();
  const auto it = std::find_if(holds->begin(), holds->end(),
                               [&](const auto& h) { return h.build_id() == build_id; });
  const bool found = it != holds->end();
  if (found) holds->erase(it);
  prune_expired(ledger, now_unix_ms);
  return found;
}

}  // namespace cvm::scheduler
