#include "cvm/scheduler/ledger.h"

#include <algorithm>

namespace cvm::scheduler {

namespace {
bool in_force(const cvm::v1::CapacityHold& h, int64_t now) { return h.expires_unix_ms() > now; }
}  // namespace

Reservation held(const cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms) {
  Reservation r;
  for (const auto& h : ledger.holds()) {
    if (!in_force(h, now_unix_ms)) continue;
    r.cpu_millicores += h.cpu_millicores();
    r.memory_bytes += h.memory_bytes();
    r.gpus += h.gpus();
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
  for (const auto& h : ledger.holds()) {
    if (h.build_id() == hold.build_id()) return HoldResult::kAlreadyHeld;
  }
  const Reservation others = held(ledger, now_unix_ms);
  // Compare by adding, never subtracting, so a node already over its capacity (an agent that
  // reports more than it has) cannot wrap around into "lots of room".
  const bool cpu_fits =
      node.allocated_cpu_millicores + others.cpu_millicores + hold.cpu_millicores() <=
      node.capacity_cpu_millicores;
  const bool memory_fits =
      node.allocated_memory_bytes + others.memory_bytes + hold.memory_bytes() <=
      node.capacity_memory_bytes;
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
