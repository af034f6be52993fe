#include "cvm/service/streams.h"

#include <chrono>
#include <string>

#include "cvm/base/wire.h"

namespace cvm::service {

using namespace std::chrono_literals;

bus::StreamConfig builds_stream() {
  bus::StreamConfig c;
  c.name = std::string(wire::kStreamBuilds);
  c.subjects = {std::string(wire::kBuildsSubmit)};
  // Work queue: a request is removed once the scheduler acks it.
  c.retention = bus::Retention::kWorkQueue;
  // Resubmits with the same build_id within this window are dropped by the server; the scheduler
  // also checks CVM_EVENTS so that later duplicates run once too.
  c.duplicate_window = 1h;
  return c;
}

bus::StreamConfig node_work_stream() {
  bus::StreamConfig c;
  c.name = std::string(wire::kStreamNodeWork);
  c.subjects = {std::string(wire::kNodeWorkWildcard)};
  c.retention = bus::Retention::kLimits;
  c.max_age = std::chrono::hours(24 * 7);
  c.duplicate_window = 1h;
  return c;
}

bus::StreamConfig events_stream() {
  bus::StreamConfig c;
  c.name = std::string(wire::kStreamEvents);
  c.subjects = {std::string(wire::kBuildEventsWildcard)};
  c.retention = bus::Retention::kLimits;
  c.max_age = std::chrono::hours(24 * 14);
  c.duplicate_window = 1h;
  return c;
}

bus::StreamConfig dead_letters_stream() {
  bus::StreamConfig c;
  c.name = std::string(kStreamDeadLetters);
  const std::string builds(wire::kStreamBuilds);
  c.subjects = {"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + builds + ".*",
                "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED." + builds + ".*"};
  c.retention = bus::Retention::kLimits;
  // As long as CVM_EVENTS keeps the build's history. The request itself stays in CVM_BUILDS only
  // while it is unacknowledged (a termed one is removed from the work queue): the advisory is the
  // record of what was given up on, the scheduler's log and the FAILED event say why.
  c.max_age = std::chrono::hours(24 * 14);
  return c;
}

bus::KvConfig nodes_bucket() { return {.bucket = std::string(wire::kBucketNodes), .history = 1}; }
bus::KvConfig settings_bucket() {
  return {.bucket = std::string(wire::kBucketSettings), .history = 5};
}
bus::KvConfig workspaces_bucket() {
  return {.bucket = std::string(wire::kBucketWorkspaces), .history = 5};
}
bus::KvConfig gpu_leases_bucket() {
  // History lets the fault suite check over time that no GPU was in two leases at once.
  return {.bucket = std::string(wire::kBucketGpuLeases), .history = 10};
}
bus::KvConfig capacity_bucket() {
  return {.bucket = std::string(wire::kBucketCapacity), .history = 1};
}
bus::KvConfig placements_bucket() {
  // A record matters until its build runs or is placed again; an hour matches the duplicate
  // window of CVM_BUILDS, past which a redelivery can no longer arrive.
  return {
      .bucket = std::string(wire::kBucketPlacements), .history = 1, .ttl = std::chrono::hours(1)};
}

Status ensure_streams(bus::Connection& conn) {
  for (const auto& cfg : {builds_stream(), node_work_stream(), events_stream()}) {
    if (auto st = conn.ensure_stream(cfg); !st) return st;
  }
  return {};
}

}  // namespace cvm::service
