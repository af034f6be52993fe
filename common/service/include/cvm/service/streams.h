#pragma once
// The streams and buckets of the wire contract, with the settings every service agrees on. Each
// service ensures the ones it uses at start (idempotent), so any start order works.

#include <string_view>

#include "cvm/base/result.h"
#include "cvm/bus/bus.h"

namespace cvm::service {

bus::StreamConfig builds_stream();     // CVM_BUILDS: work queue of BuildRequests
bus::StreamConfig node_work_stream();  // CVM_NODE_WORK: NodeAssignments per node
bus::StreamConfig events_stream();     // CVM_EVENTS: BuildEvents, kept for days
// CVM_DEAD_LETTERS: the server's MAX_DELIVERIES and MSG_TERMINATED advisories of CVM_BUILDS
// (requests given up on), kept for days; each names the request's stream sequence in CVM_BUILDS.
bus::StreamConfig dead_letters_stream();
inline constexpr std::string_view kStreamDeadLetters = "CVM_DEAD_LETTERS";
bus::KvConfig nodes_bucket();
bus::KvConfig settings_bucket();
bus::KvConfig workspaces_bucket();
bus::KvConfig gpu_leases_bucket();
bus::KvConfig capacity_bucket();    // cvm_capacity: scheduler capacity holds, by node (CAS)
bus::KvConfig placements_bucket();  // cvm_placements: "<node>.<build>" placement records

// Ensures all three streams.
Status ensure_streams(bus::Connection& conn);

}  // namespace cvm::service
