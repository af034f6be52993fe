#pragma once
// The fault suite's ledger check: after a fault, read back what the system recorded (CVM_EVENTS,
// CVM_NODE_WORK, KV cvm_gpu_leases history, KV cvm_workspaces, cvm_nodes) and what runs on the real
// nodes (runc list, the agent's ID ranges and bundles), and check the promises that must survive
// any fault:
//   1. every acknowledged build has exactly one terminal event (RUNNING, STOPPED or FAILED);
//   2. no GPU was in two leases at once (replaying the lease bucket's history in stream order);
//   3. no node was over its capacity (replaying assignments and the events that end them against
//      the capacity the node registered, plus the fleet simulator's own counter where there is
//      one);
//   4. no orphan: every container, ID range and bundle a real agent holds belongs to a workspace
//      that KV cvm_workspaces places on that node, and every RUNNING record agrees with its build's
//      events.
// Written once, used by every test in tests/fault/.

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cvm/base/result.h"
#include "cvm/bus/bus.h"

namespace cvm::fault {

// A real node agent whose host state is checked for orphans.
struct AgentHost {
  std::string node_id;
  std::string runc_root;
  std::string state_dir;  // id-ranges.json and workspaces/<ws> bundles live here
};

struct LedgerOptions {
  // Builds whose submit JetStream acknowledged: each must end in exactly one terminal event.
  std::vector<std::string> acknowledged_builds;
  // Reading CVM_EVENTS stops once every acknowledged build has a terminal event and nothing new
  // arrived for `quiet`, or at `timeout` (a missing terminal event is then a finding).
  std::chrono::milliseconds quiet{1500};
  std::chrono::milliseconds timeout{60000};
  // The fleet simulator's counters, when the nodes are simulated.
  std::optional<uint64_t> sim_over_capacity;
  std::optional<uint64_t> sim_launched_twice;
  std::vector<AgentHost> agents;
};

struct LedgerReport {
  size_t events = 0;
  size_t builds_with_events = 0;
  size_t assignments = 0;
  size_t lease_entries = 0;
  std::map<std::string, int> terminal;                // build -> terminal events
  std::map<std::string, std::string> terminal_phase;  // build -> its (first) terminal phase
  std::map<std::string, std::string> terminal_words;  // build -> its terminal events, in words
  std::vector<std::string> problems;                  // each broken promise, in words
  [[nodiscard]] std::string summary() const;  // counts and the first problems, for test output
};

// Reads everything with `conn` (any connection to the server or cluster) and checks the promises.
// An error is returned only when the ledger cannot be read at all; broken promises are problems.
Result<LedgerReport> check_ledger(bus::Connection& conn, const LedgerOptions& options);

}  // namespace cvm::fault
