#include "ledger.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "child_process.h"
#include "cvm/base/wire.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::fault {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

bool is_terminal(cvm::v1::Phase p) {
  return p == cvm::v1::RUNNING || p == cvm::v1::STOPPED || p == cvm::v1::FAILED;
}

bool is_kv_delete(const bus::Message& m) {
  auto it = m.headers.find("KV-Operation");
  return it != m.headers.end() && (it->second == "DEL" || it->second == "PURGE");
}

// The key of a KV stream message: the subject after "$KV.<bucket>.".
std::string kv_key(const std::string& subject, const std::string& bucket) {
  const std::string prefix = "$KV." + bucket + ".";
  return subject.rfind(prefix, 0) == 0 ? subject.substr(prefix.size()) : subject;
}

// Every message of `stream` on `subject` as stored now, oldest first. A stream that does not
// exist is empty (a test without GPUs never creates the lease bucket).
Result<std::vector<bus::StreamMessage>> read_all(bus::Connection& conn, const std::string& stream,
                                                 const std::string& subject) {
  std::vector<bus::StreamMessage> out;
  auto state = conn.stream_state(stream);
  for (int i = 0; !state && state.error().domain != ErrorDomain::kNotFound && i < 60; ++i) {
    std::this_thread::sleep_for(500ms);
    state = conn.stream_state(stream);
  }
  if (!state) {
    if (state.error().domain == ErrorDomain::kNotFound) return out;
    return state.error();
  }
  if (state->messages == 0) return out;
  // Right after a fault JetStream may still be electing leaders: retry making the reader.
  auto reader = conn.read_stream(stream, subject);
  for (int i = 0; !reader && i < 60; ++i) {
    std::this_thread::sleep_for(500ms);
    reader = conn.read_stream(stream, subject);
  }
  if (!reader) return reader.error();
  while (true) {
    auto m = (*reader)->next(2s);
    if (!m) return m.error();
    if (!m->has_value()) break;  // nothing more within 2 s: caught up
    const uint64_t pending = (*m)->pending;
    out.push_back(std::move(**m));
    if (pending == 0) break;
  }
  return out;
}

// Calls `f` until it succeeds or 30 s pass: right after a fault (a server killed in a cluster)
// JetStream API calls time out until the leaders are elected again.
template <class F>
auto retried(F f) -> decltype(f()) {
  auto r = f();
  for (int i = 0; !r && r.error().domain != ErrorDomain::kNotFound && i < 60; ++i) {
    std::this_thread::sleep_for(500ms);
    r = f();
  }
  return r;
}

uint64_t cpu_of(const cvm::v1::Resources& r) {
  return r.cpu_millicores() == 0 ? 1000 : r.cpu_millicores();
}
uint64_t memory_of(const cvm::v1::Resources& r) {
  return r.memory_bytes() == 0 ? 512ULL << 20 : r.memory_bytes();
}

// 1. Exactly one terminal event per acknowledged build. Reads CVM_EVENTS until every build has a
// terminal event and the stream was quiet for `quiet`, or until `timeout`.
Status check_events(bus::Connection& conn, const LedgerOptions& o, LedgerReport& report,
                    std::vector<bus::StreamMessage>& events) {
  const auto deadline = std::chrono::steady_clock::now() + o.timeout;
  // Right after a fault JetStream may still be electing leaders: retry making the reader.
  auto reader =
      conn.read_stream(std::string(wire::kStreamEvents), std::string(wire::kBuildEventsWildcard));
  while (!reader && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(500ms);
    reader =
        conn.read_stream(std::string(wire::kStreamEvents), std::string(wire::kBuildEventsWildcard));
  }
  if (!reader) return reader.error();
  std::set<std::string> waiting(o.acknowledged_builds.begin(), o.acknowledged_builds.end());
  std::set<std::string> builds;
  auto& terminal_events = report.terminal_words;
  auto last_new = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() < deadline) {
    auto m = (*reader)->next(100ms);
    if (!m) return m.error();
    if (!m->has_value()) {
      if (waiting.empty() && std::chrono::steady_clock::now() - last_new >= o.quiet) break;
      continue;
    }
    last_new = std::chrono::steady_clock::now();
    cvm::v1::BuildEvent e;
    if (!e.ParseFromString((*m)->message.data)) {
      report.problems.push_back("unreadable event at CVM_EVENTS seq " +
                                std::to_string((*m)->stream_sequence));
      continue;
    }
    builds.insert(e.build_id());
    if (is_terminal(e.phase())) {
      auto& words = terminal_events[e.build_id()];
      words += std::string(words.empty() ? "" : "; ") + cvm::v1::Phase_Name(e.phase()) + " on " +
               e.node_id() + " by " + e.source() +
               (e.message().empty() ? "" : " (" + e.message() + ")");
      if (report.terminal[e.build_id()]++ == 0) {
        report.terminal_phase[e.build_id()] = cvm::v1::Phase_Name(e.phase());
      }
      waiting.erase(e.build_id());
    }
    events.push_back(std::move(**m));
  }
  report.events = events.size();
  report.builds_with_events = builds.size();
  for (const auto& b : o.acknowledged_builds) {
    const auto it = report.terminal.find(b);
    const int n = it == report.terminal.end() ? 0 : it->second;
    if (n != 1) {
      report.problems.push_back("build " + b + " has " + std::to_string(n) +
                                " terminal events (acknowledged builds need exactly one)" +
                                (n > 0 ? ": " + terminal_events[b] : ""));
    }
  }
  // Builds the test did not submit itself (or whose submit it never saw acknowledged) still may
  // not end twice.
  const std::set<std::string> acked(o.acknowledged_builds.begin(), o.acknowledged_builds.end());
  for (const auto& [b, n] : report.terminal) {
    if (n > 1 && !acked.contains(b)) {
      report.problems.push_back("build " + b + " has " + std::to_string(n) +
                                " terminal events: " + terminal_events[b]);
    }
  }
  return {};
}

// 2. No GPU in two leases at once: replay the lease bucket in stream order. A put on a key that
// holds a different lease (no delete in between), or a GPU UUID held under two keys, is a GPU in
// two leases.
Status check_leases(bus::Connection& conn, LedgerReport& report) {
  const std::string bucket(wire::kBucketGpuLeases);
  auto all = read_all(conn, "KV_" + bucket, "$KV." + bucket + ".>");
  if (!all) return all.error();
  report.lease_entries = all->size();
  std::unordered_map<std::string, cvm::v1::GpuLease> by_key;
  std::unordered_map<std::string, std::string> key_of_gpu;  // uuid -> key holding it
  for (const auto& m : *all) {
    const std::string key = kv_key(m.message.subject, bucket);
    if (is_kv_delete(m.message)) {
      if (auto it = by_key.find(key); it != by_key.end()) {
        key_of_gpu.erase(it->second.gpu_uuid());
        by_key.erase(it);
      }
      continue;
    }
    cvm::v1::GpuLease lease;
    if (!lease.ParseFromString(m.message.data)) {
      report.problems.push_back("unreadable GPU lease " + key);
      continue;
    }
    if (auto it = by_key.find(key);
        it != by_key.end() && it->second.lease_id() != lease.lease_id()) {
      report.problems.push_back("GPU " + lease.gpu_uuid() +
                                " in two leases at once: " + it->second.lease_id() + " (" +
                                it->second.workspace_id() + ") replaced by " + lease.lease_id() +
                                " (" + lease.workspace_id() + ") without a release");
    }
    if (auto it = key_of_gpu.find(lease.gpu_uuid()); it != key_of_gpu.end() && it->second != key) {
      report.problems.push_back("GPU " + lease.gpu_uuid() +
                                " leased under two keys: " + it->second + " and " + key);
    }
    by_key[key] = lease;
    key_of_gpu[lease.gpu_uuid()] = key;
  }
  return {};
}

// 3. No node over capacity: replay the assignments (CVM_NODE_WORK) and the events that end them
// (FAILED, STOPPED, LOST, or SCHEDULED on another node) in server time order, against the capacity
// each node registered in cvm_nodes.
Status check_capacity(bus::Connection& conn, const std::vector<bus::StreamMessage>& events,
                      LedgerReport& report) {
  auto work =
      read_all(conn, std::string(wire::kStreamNodeWork), std::string(wire::kNodeWorkWildcard));
  if (!work) return work.error();
  report.assignments = work->size();
  std::unordered_map<std::string, cvm::v1::Capacity> capacity;
  auto nodes = retried([&] { return conn.ensure_kv({.bucket = std::string(wire::kBucketNodes)}); });
  if (!nodes) return nodes.error();
  auto keys = retried([&] { return nodes->keys(); });
  if (!keys) return keys.error();
  for (const auto& k : *keys) {
    auto e = retried([&] { return nodes->get(k); });
    cvm::v1::NodeStatus st;
    if (e && e->has_value() && st.ParseFromString((*e)->value)) capacity[k] = st.capacity();
  }

  // (time, kind 0 = an event that frees first, 1 = an assignment, index)
  std::vector<std::tuple<int64_t, int, size_t>> order;
  for (size_t i = 0; i < events.size(); ++i) order.emplace_back(events[i].timestamp_unix_ns, 0, i);
  for (size_t i = 0; i < work->size(); ++i) order.emplace_back((*work)[i].timestamp_unix_ns, 1, i);
  std::sort(order.begin(), order.end());

  struct Held {
    std::string node;
    std::string build;
    uint64_t cpu = 0;
    uint64_t memory = 0;
  };
  std::unordered_map<std::string, Held> by_workspace;
  std::unordered_map<std::string, std::pair<uint64_t, uint64_t>> used;  // node -> cpu, memory
  std::set<std::string> reported;
  auto release = [&](const std::string& ws) {
    auto it = by_workspace.find(ws);
    if (it == by_workspace.end()) return;
    auto& u = used[it->second.node];
    u.first -= it->second.cpu;
    u.second -= it->second.memory;
    by_workspace.erase(it);
  };
  for (const auto& [ts, kind, i] : order) {
    if (kind == 0) {
      cvm::v1::BuildEvent e;
      if (!e.ParseFromString(events[i].message.data)) continue;
      auto it = by_workspace.find(e.workspace_id());
      if (it == by_workspace.end()) continue;
      const bool same_build = it->second.build == e.build_id();
      if ((e.phase() == cvm::v1::FAILED && same_build) || e.phase() == cvm::v1::STOPPED ||
          e.phase() == cvm::v1::LOST ||
          (e.phase() == cvm::v1::SCHEDULED && same_build && e.node_id() != it->second.node)) {
        release(e.workspace_id());
      }
      continue;
    }
    cvm::v1::NodeAssignment a;
    if (!a.ParseFromString((*work)[i].message.data)) continue;
    if (a.request().transition() != cvm::v1::START) continue;
    const auto& ws = a.request().workspace_id();
    if (auto it = by_workspace.find(ws); it != by_workspace.end()) {
      if (it->second.node == a.node_id() && it->second.build == a.request().build_id()) continue;
      release(ws);
    }
    Held h{a.node_id(), a.request().build_id(), cpu_of(a.request().resources()),
           memory_of(a.request().resources())};
    auto& u = used[h.node];
    u.first += h.cpu;
    u.second += h.memory;
    by_workspace[ws] = h;
    const auto cap = capacity.find(h.node);
    if (cap == capacity.end() || reported.contains(h.node)) continue;
    if (u.first > cap->second.cpu_millicores() || u.second > cap->second.memory_bytes()) {
      reported.insert(h.node);
      report.problems.push_back(
          "node " + h.node + " over capacity after assigning build " + h.build + ": " +
          std::to_string(u.first) + "/" + std::to_string(cap->second.cpu_millicores()) + " mCPU, " +
          std::to_string(u.second) + "/" + std::to_string(cap->second.memory_bytes()) + " bytes");
    }
  }
  return {};
}

// 4. No orphans: KV cvm_workspaces against the builds' events and the real agents' hosts.
Status check_orphans(bus::Connection& conn, const LedgerOptions& o,
                     const std::vector<bus::StreamMessage>& events, LedgerReport& report) {
  auto kv = retried([&] {
    return conn.ensure_kv({.bucket = std::string(wire::kBucketWorkspaces), .history = 5});
  });
  if (!kv) return kv.error();
  auto keys = retried([&] { return kv->keys(); });
  std::unordered_map<std::string, cvm::v1::WorkspaceRecord> records;
  if (keys) {
    for (const auto& k : *keys) {
      auto e = retried([&] { return kv->get(k); });
      cvm::v1::WorkspaceRecord r;
      if (e && e->has_value() && r.ParseFromString((*e)->value)) records[k] = r;
    }
  }
  // Where each build ran, by its RUNNING events.
  std::unordered_map<std::string, std::set<std::string>> running_on;
  for (const auto& m : events) {
    cvm::v1::BuildEvent e;
    if (e.ParseFromString(m.message.data) && e.phase() == cvm::v1::RUNNING) {
      running_on[e.build_id()].insert(e.node_id());
    }
  }
  // The record must name the node where its build ran: a record that another node overwrote
  // afterwards (a stale write) points clients and the scheduler at the wrong node.
  for (const auto& [ws, r] : records) {
    auto it = running_on.find(r.build_id());
    if (it != running_on.end() && !it->second.contains(r.node_id())) {
      report.problems.push_back(
          "workspace " + ws + " is recorded " + cvm::v1::Phase_Name(r.phase()) + " on " +
          r.node_id() + " but its build " + r.build_id() + " ran on " + *it->second.begin());
    }
  }
  for (const auto& agent : o.agents) {
    auto list = test::run_command({"runc", "--root", agent.runc_root, "list", "-q"}, 30s);
    std::set<std::string> containers;
    std::istringstream in(list.output);
    for (std::string id; std::getline(in, id);) {
      if (!id.empty()) containers.insert(id);
    }
    auto placed_here = [&](const std::string& ws) {
      auto it = records.find(ws);
      return it != records.end() && it->second.node_id() == agent.node_id;
    };
    for (const auto& id : containers) {
      const std::string ws = id.rfind("cvm-", 0) == 0 ? id.substr(4) : id;
      if (!placed_here(ws) || records[ws].phase() != cvm::v1::RUNNING) {
        report.problems.push_back(
            "orphan container " + id + " on " + agent.node_id + ": KV cvm_workspaces " +
            (records.contains(ws) ? "places " + ws + " on " + records[ws].node_id() + " in " +
                                        cvm::v1::Phase_Name(records[ws].phase())
                                  : "has no record of " + ws));
      }
    }
    for (const auto& [ws, r] : records) {
      if (r.node_id() == agent.node_id && r.phase() == cvm::v1::RUNNING &&
          !containers.contains("cvm-" + ws)) {
        report.problems.push_back("workspace " + ws + " is recorded RUNNING on " + agent.node_id +
                                  " but no container runs there");
      }
    }
    std::ifstream f(agent.state_dir + "/id-ranges.json");
    const auto state = nlohmann::json::parse(f, nullptr, false);
    if (!state.is_discarded() && state.contains("ranges") && state["ranges"].is_object()) {
      for (const auto& [ws, range] : state["ranges"].items()) {
        if (!placed_here(ws) || records[ws].phase() == cvm::v1::FAILED) {
          report.problems.push_back("orphan ID range of " + ws + " on " + agent.node_id);
        }
      }
    }
    std::error_code ec;
    for (const auto& d : fs::directory_iterator(agent.state_dir + "/workspaces", ec)) {
      const std::string ws = d.path().filename().string();
      if (!placed_here(ws) || records[ws].phase() == cvm::v1::FAILED) {
        report.problems.push_back("orphan bundle " + d.path().string());
      }
    }
  }
  return {};
}

}  // namespace

std::string LedgerReport::summary() const {
  std::ostringstream s;
  s << events << " events of " << builds_with_events << " builds, " << assignments
    << " assignments, " << lease_entries << " lease entries; " << problems.size() << " problems";
  for (size_t i = 0; i < problems.size() && i < 10; ++i) s << "\n  " << problems[i];
  return s.str();
}

Result<LedgerReport> check_ledger(bus::Connection& conn, const LedgerOptions& options) {
  LedgerReport report;
  std::vector<bus::StreamMessage> events;
  if (auto st = check_events(conn, options, report, events); !st) return st.error();
  if (auto st = check_leases(conn, report); !st) return st.error();
  if (auto st = check_capacity(conn, events, report); !st) return st.error();
  if (options.sim_over_capacity && *options.sim_over_capacity != 0) {
    report.problems.push_back("the fleet simulator counted " +
                              std::to_string(*options.sim_over_capacity) +
                              " assignments over a node's capacity");
  }
  if (options.sim_launched_twice && *options.sim_launched_twice != 0) {
    report.problems.push_back("the fleet simulator counted " +
                              std::to_string(*options.sim_launched_twice) +
                              " builds launched on two nodes");
  }
  if (auto st = check_orphans(conn, options, events, report); !st) return st.error();
  return report;
}

}  // namespace cvm::fault
