#pragma once
// Capacity holds kept in KV cvm_capacity (one CapacityLedger per node), changed only by
// compare-and-set on the KV revision. This file is the pure arithmetic; the service does the CAS.
//
// Why a shared ledger and not each replica's memory: with several scheduler replicas, two of them
// see the same free room and both would place there. Writing the hold with the revision the
// decision was made on turns that race into a conflict for one of them (Nomad's plan applier
// checks plans against the latest state the same way), which then re-reads and decides again.

#include <cstdint>
#include <optional>
#include <string_view>

#include "cvm/scheduler/placement.h"
#include "cvm/v1/node.pb.h"

namespace cvm::scheduler {

// True when the node's last NodeStatus counts the hold's build in `allocated` with at least the
// hold's CPU and memory (NodeStatus.allocated_builds): the agent runs it, so the hold must not
// count a second time. Less than the hold (another default, a changed request) is not covered.
bool covered_by_node(const NodeRecord& node, const cvm::v1::CapacityHold& hold);

// The sum of the holds still in force at now (a hold expires at expires_unix_ms). With `node`, the
// CPU and memory of holds it already counts (covered_by_node) are left out; their GPUs stay until
// the hold expires (GPUs are the broker's leases, not in `allocated`).
Reservation held(const cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms,
                 const NodeRecord* node = nullptr);

// The earliest expiry among the holds still in force; nullopt when none is.
std::optional<int64_t> next_expiry(const cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms);

// Drops the holds that expired by now; returns how many.
size_t prune_expired(cvm::v1::CapacityLedger& ledger, int64_t now_unix_ms);

enum class HoldResult : uint8_t {
  kAdded,        // the ledger changed: write it with compare-and-set
  kAlreadyHeld,  // this build holds room here until the new expiry or later: nothing to write
  kRenewed,      // this build held room here; its expiry moved out to the new one's: write it
  kNoRoom,       // capacity - allocated - other holds cannot fit it
};

// Prunes expired holds, then adds `hold` when the node's capacity minus what its agent reports
// allocated minus the other holds in force (those it does not already count) leaves room for the
// hold's cpu and memory.
HoldResult add_hold(cvm::v1::CapacityLedger& ledger, const NodeRecord& node,
                    const cvm::v1::CapacityHold& hold, int64_t now_unix_ms);

// Removes the build's hold (and prunes expired ones). False when the build held nothing here.
bool remove_hold(cvm::v1::CapacityLedger& ledger, std::string_view build_id, int64_t now_unix_ms);

}  // namespace cvm::scheduler
