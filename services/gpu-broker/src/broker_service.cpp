#include "cvm/broker/broker_service.h"

#include <algorithm>
#include <chrono>
#include <set>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/settings.pb.h"

namespace cvm::broker {

namespace {

constexpr std::string_view kSource = "gpu-broker";

// Reserve decisions are tens of microseconds and the KV round trips a fraction of a millisecond:
// the shared latency buckets start at 100 µs, these resolve the fast end too.
const std::vector<double>& reserve_buckets() {
  static const std::vector<double> b{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                     0.025,   0.05,   0.1,     0.25,   0.5,   1,      2.5,   5};
  return b;
}

}  // namespace

struct BrokerService::Meters {
  explicit Meters(telemetry::Metrics& m)
      : granted(m.counter("cvm_gpu_broker_reserves_total", "GPU reserve requests by outcome",
                          {{"result", "granted"}})),
        refused(m.counter("cvm_gpu_broker_reserves_total", "GPU reserve requests by outcome",
                          {{"result", "refused"}})),
        invalid(m.counter("cvm_gpu_broker_invalid_requests_total",
                          "Reserve or release requests that did not parse")),
        conflicts(m.counter("cvm_gpu_broker_lease_conflicts_total",
                            "Lease creations lost to another reservation (CAS conflicts)")),
        released(m.counter("cvm_gpu_broker_leases_released_total", "GPU leases released")),
        foreign(m.counter("cvm_gpu_broker_foreign_releases_total",
                          "Releases by a node agent of GPUs of another node, refused")),
        reclaimed_node(m.counter("cvm_gpu_broker_leases_reclaimed_total",
                                 "GPU leases freed by the reconcile, by cause",
                                 {{"cause", "node"}})),
        reclaimed_workspace(m.counter("cvm_gpu_broker_leases_reclaimed_total",
                                      "GPU leases freed by the reconcile, by cause",
                                      {{"cause", "workspace"}})),
        notices(m.counter("cvm_gpu_broker_health_notices_total",
                          "Warnings sent to workspaces whose GPU was quarantined")),
        latency(m.histogram("cvm_gpu_broker_reserve_seconds", "Time to answer a reserve", {},
                            reserve_buckets())),
        gpus(m.gauge("cvm_gpu_broker_gpus", "GPUs known", {{"state", "total"}})),
        leased(m.gauge("cvm_gpu_broker_gpus", "GPUs known", {{"state", "leased"}})) {}
  prometheus::Counter& granted;
  prometheus::Counter& refused;
  prometheus::Counter& invalid;
  prometheus::Counter& conflicts;
  prometheus::Counter& released;
  prometheus::Counter& foreign;
  prometheus::Counter& reclaimed_node;
  prometheus::Counter& reclaimed_workspace;
  prometheus::Counter& notices;
  prometheus::Histogram& latency;
  prometheus::Gauge& gpus;
  prometheus::Gauge& leased;
};

BrokerService::BrokerService(bus::ConnectionPtr conn, telemetry::Metrics& metrics,
                             const Clock& clock, BrokerConfig config)
    : conn_(std::move(conn)),
      clock_(clock),
      config_(config),
      meters_(std::make_unique<Meters>(metrics)),
      metrics_(metrics) {}

BrokerService::~BrokerService() { stop(); }

Status BrokerService::start() {
  stopped_ = false;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  auto leases = conn_->ensure_kv(service::gpu_leases_bucket());
  if (!leases) return leases.error();
  auto workspaces = conn_->ensure_kv(service::workspaces_bucket());
  if (!workspaces) return workspaces.error();
  auto settings = conn_->ensure_kv(service::settings_bucket());
  if (!settings) return settings.error();
  // Notices go to CVM_EVENTS; it must exist even if the broker is the first service up.
  if (auto st = conn_->ensure_stream(service::events_stream()); !st) return st;

  auto nw = nodes->watch(">", [this](std::optional<bus::KvEntry> e) { on_node(e); });
  if (!nw) return nw.error();
  nodes_watch_ = std::move(*nw);
  auto lw = leases->watch(">", [this](std::optional<bus::KvEntry> e) { on_lease(e); });
  if (!lw) return lw.error();
  leases_watch_ = std::move(*lw);
  auto ww = workspaces->watch(">", [this](std::optional<bus::KvEntry> e) { on_workspace(e); });
  if (!ww) return ww.error();
  workspaces_watch_ = std::move(*ww);
  auto sw = settings->watch(std::string(wire::kSettingsKey),
                            [this](std::optional<bus::KvEntry> e) { on_settings(e); });
  if (!sw) return sw.error();
  settings_watch_ = std::move(*sw);
  leases_kv_ = std::move(*leases);

  const std::string queue(wire::kBrokerQueue);
  auto rs = conn_->subscribe(std::string(wire::kGpuReserve), queue, [this](bus::Message m) {
    const auto t0 = std::chrono::steady_clock::now();
    cvm::v1::GpuReserveRequest req;
    if (!req.ParseFromString(m.data)) {
      meters_->invalid.Increment();
      cvm::v1::GpuReserveReply bad;
      bad.set_reason(cvm::v1::INVALID_REQUEST);
      bad.set_message("the request is not a cvm.v1.GpuReserveRequest");
      return reply(m, bad);
    }
    auto r = reserve(req);
    meters_->latency.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    reply(m, r);
  });
  if (!rs) return rs.error();
  reserve_sub_ = std::move(*rs);
  // node_scoped: cvm.v1.gpu.release.<node>, whose last token is the asking node (release()).
  const auto on_release = [this](bool node_scoped) {
    return [this, node_scoped](bus::Message m) {
      cvm::v1::GpuReleaseRequest req;
      if (!req.ParseFromString(m.data)) {
        meters_->invalid.Increment();
        cvm::v1::GpuReleaseReply bad;
        bad.set_message("the request is not a cvm.v1.GpuReleaseRequest");
        return reply(m, bad);
      }
      reply(m, release(req, node_scoped ? m.subject.substr(m.subject.rfind('.') + 1) : ""));
    };
  };
  auto rl = conn_->subscribe(std::string(wire::kGpuRelease), queue, on_release(false));
  if (!rl) return rl.error();
  release_sub_ = std::move(*rl);
  auto nrl = conn_->subscribe(std::string(wire::kGpuReleaseNodeWildcard), queue, on_release(true));
  if (!nrl) return nrl.error();
  node_release_sub_ = std::move(*nrl);
  // Make sure the server has the subscriptions before anyone is told we are up.
  if (auto st = conn_->flush(); !st) return st;
  reconcile_timer_ = std::make_unique<boost::asio::steady_timer>(conn_->executor());
  spdlog::info("gpu-broker answering {} and {} (queue {})", wire::kGpuReserve, wire::kGpuRelease,
               queue);
  return {};
}

void BrokerService::stop() {
  stopped_ = true;
  reserve_sub_.reset();
  release_sub_.reset();
  node_release_sub_.reset();
  nodes_watch_.reset();
  leases_watch_.reset();
  workspaces_watch_.reset();
  settings_watch_.reset();
  if (reconcile_timer_) reconcile_timer_->cancel();
}

bool BrokerService::synced() const { return nodes_synced_ && leases_synced_ && workspaces_synced_; }

void BrokerService::reply(const bus::Message& msg, const google::protobuf::Message& body) {
  if (msg.reply.empty()) return;
  if (auto st = conn_->publish(msg.reply, body.SerializeAsString()); !st) {
    spdlog::warn("cannot reply on {}: {}", msg.reply, st.error().message);
  }
}

HealthOptions BrokerService::health_now() const {
  return {.now_unix_ms = clock_.now_unix_ms(), .healthy_period_ms = config_.healthy_period.count()};
}

GpuLeases BrokerService::leases_of(const std::string& node_id) const {
  GpuLeases out;
  // Keys are "<node>.<uuid>", so one node's leases are one range of the ordered map.
  const std::string prefix = lease_key(node_id, "").substr(0, lease_key(node_id, "").size() - 1);
  for (auto it = leases_.lower_bound(prefix); it != leases_.end(); ++it) {
    if (it->first.compare(0, prefix.size(), prefix) != 0) break;
    out.add(it->second.lease.gpu_uuid(), it->second.lease.workspace_id());
  }
  return out;
}

Status BrokerService::erase_lease(const std::string& key, uint64_t revision) {
  // A KV delete is a message with KV-Operation: DEL on the key's subject; the expected-sequence
  // header turns it into compare-and-delete, which the KV API of cnats 3.4 does not offer.
  const std::string subject = "$KV." + std::string(wire::kBucketGpuLeases) + "." + key;
  auto ack = conn_->js_publish(
      subject, "", "",
      {{"KV-Operation", "DEL"}, {"Nats-Expected-Last-Subject-Sequence", std::to_string(revision)}});
  if (!ack) return ack.error();
  auto it = leases_.find(key);
  if (it != leases_.end() && it->second.revision == revision) leases_.erase(it);
  return {};
}

cvm::v1::GpuReserveReply BrokerService::reserve(const cvm::v1::GpuReserveRequest& req) {
  cvm::v1::GpuReserveReply out;
  auto refuse = [&](cvm::v1::Reason reason, std::string message) {
    meters_->refused.Increment();
    out.Clear();
    out.set_ok(false);
    out.set_reason(reason);
    out.set_message(std::move(message));
    spdlog::info("refused {} GPU(s) on {} for {}: {}", req.count(),
                 req.node_id().empty() ? "any node" : req.node_id(), req.workspace_id(),
                 out.message());
    return out;
  };
  bool ids_ok = wire::is_valid_id(req.workspace_id()) &&
                (req.node_id().empty() || wire::is_valid_id(req.node_id())) &&
                (req.build_id().empty() || wire::is_valid_id(req.build_id()));
  for (const auto& n : req.candidate_nodes()) ids_ok = ids_ok && wire::is_valid_id(n);
  if (!ids_ok || req.count() == 0) {
    return refuse(cvm::v1::INVALID_REQUEST,
                  "workspace_id and count > 0 are required; ids must be [A-Za-z0-9_-]{1,128}");
  }
  // Request properties refuse whatever the node, and before any node is looked at.
  if (auto r = check_gpu_policy(
          {.vendor = req.vendor(), .bare_metal = true, .cached_cvm = req.cached_cvm()})) {
    return refuse(r->reason, r->message);
  }
  // A retried reservation (the scheduler crashed or timed out after we granted) gets the same
  // lease back instead of a second set of GPUs.
  const std::string lease_id = req.build_id().empty() ? req.workspace_id() : req.build_id();
  if (auto held = held_lease(req, lease_id)) {
    meters_->granted.Increment();
    return *held;
  }

  if (!req.node_id().empty()) {
    auto r = reserve_on(req.node_id(), req, lease_id);
    if (!r.ok()) return refuse(r.reason(), r.message());
    meters_->granted.Increment();
    return r;
  }

  // No node named: pick one by the placement setting, then lease there. A lost race on that node
  // picks again with what the race taught us.
  for (int round = 0; round < 3; ++round) {
    std::vector<const NodeGpuInventory*> nodes;
    if (req.candidate_nodes_size() > 0) {
      for (const auto& id : req.candidate_nodes()) {
        auto it = inventory_.find(id);
        if (it != inventory_.end()) nodes.push_back(&it->second);
      }
    } else {
      for (const auto& [id, inv] : inventory_) nodes.push_back(&inv);
    }
    NodeChoiceInput in{.count = req.count(),
                       .min_memory_bytes = req.min_memory_bytes(),
                       .vendor = req.vendor(),
                       .cached_cvm = req.cached_cvm(),
                       .placement = placement_,
                       .health = health_now(),
                       .node_ttl_ms = config_.node_ttl.count()};
    auto pick = choose_node(
        nodes, [this](const std::string& n) { return leases_of(n); }, in);
    if (!pick.ok()) return refuse(pick.refusal->reason, pick.refusal->message);
    auto r = reserve_on(pick.node_id, req, lease_id);
    if (r.ok()) {
      meters_->granted.Increment();
      return r;
    }
    if (r.reason() != cvm::v1::INSUFFICIENT_CAPACITY) return refuse(r.reason(), r.message());
  }
  return refuse(cvm::v1::INSUFFICIENT_CAPACITY,
                "GPUs are being taken by concurrent reservations; try again");
}

std::optional<cvm::v1::GpuReserveReply> BrokerService::held_lease(
    const cvm::v1::GpuReserveRequest& req, const std::string& lease_id) {
  std::string node;
  std::vector<std::string> keys;
  for (const auto& [key, entry] : leases_) {
    if (entry.lease.lease_id() != lease_id) continue;
    if (!req.node_id().empty() && entry.lease.node_id() != req.node_id()) continue;
    if (node.empty()) node = entry.lease.node_id();
    if (entry.lease.node_id() == node) keys.push_back(key);
  }
  const auto inv = inventory_.find(node);
  if (keys.empty() || inv == inventory_.end()) return std::nullopt;
  // The view may be behind: a lease this replica saw created may already have been rolled back
  // and the GPU leased to someone else. Only the ledger itself can confirm the lease still holds.
  std::vector<std::string> uuids;
  for (const auto& key : keys) {
    auto cur = leases_kv_->get(key);
    cvm::v1::GpuLease lease;
    if (!cur || !cur->has_value() || !lease.ParseFromString((*cur)->value) ||
        lease.lease_id() != lease_id) {
      if (cur && !cur->has_value()) leases_.erase(key);
      return std::nullopt;
    }
    uuids.push_back(lease.gpu_uuid());
  }
  cvm::v1::GpuReserveReply out;
  for (const auto& g : inv->second.gpus) {
    if (std::find(uuids.begin(), uuids.end(), g.uuid()) != uuids.end()) *out.add_gpus() = g;
  }
  if (out.gpus_size() != static_cast<int>(uuids.size())) return std::nullopt;
  out.set_ok(true);
  out.set_lease_id(lease_id);
  out.set_node_id(node);
  return out;
}

cvm::v1::GpuReserveReply BrokerService::reserve_on(const std::string& node_id,
                                                   const cvm::v1::GpuReserveRequest& req,
                                                   const std::string& lease_id) {
  cvm::v1::GpuReserveReply out;
  auto fail = [&](cvm::v1::Reason reason, std::string message) {
    out.set_ok(false);
    out.set_reason(reason);
    out.set_message(std::move(message));
    return out;
  };
  const auto it = inventory_.find(node_id);
  if (it == inventory_.end()) {
    return fail(cvm::v1::INSUFFICIENT_CAPACITY, "node " + node_id + " reports no GPUs");
  }
  const auto& node = it->second;
  if (auto refusal = check_gpu_policy({.vendor = req.vendor(),
                                       .bare_metal = node.bare_metal,
                                       .cached_cvm = req.cached_cvm()})) {
    return fail(refusal->reason, refusal->message);
  }

  // Up to a few rounds: a lost create means another reservation took that GPU; learn it and
  // choose again.
  for (int round = 0; round < 4; ++round) {
    auto choice =
        choose_gpus(node, leases_of(node_id), req.count(), req.min_memory_bytes(), health_now());
    if (!choice.ok()) return fail(choice.refusal->reason, choice.refusal->message);

    std::vector<std::pair<std::string, uint64_t>> created;
    bool conflict = false;
    for (const auto& g : choice.gpus) {
      cvm::v1::GpuLease lease;
      lease.set_lease_id(lease_id);
      lease.set_node_id(node_id);
      lease.set_gpu_uuid(g.uuid());
      lease.set_workspace_id(req.workspace_id());
      lease.set_build_id(req.build_id());
      lease.set_leased_unix_ms(clock_.now_unix_ms());
      const auto key = lease_key(node_id, g.uuid());
      auto rev = leases_kv_->create(key, lease.SerializeAsString());
      if (rev) {
        created.emplace_back(key, *rev);
        leases_[key] = LeaseEntry{key, *rev, lease};
        continue;
      }
      if (rev.error().is_conflict()) {
        meters_->conflicts.Increment();
        conflict = true;
        if (auto cur = leases_kv_->get(key); cur && cur->has_value()) {
          cvm::v1::GpuLease theirs;
          if (theirs.ParseFromString((*cur)->value)) {
            leases_[key] = LeaseEntry{key, (*cur)->revision, theirs};
          }
        }
      } else {
        spdlog::warn("cannot write lease {}: {}", key, rev.error().message);
      }
      break;
    }
    if (created.size() == choice.gpus.size()) {
      out.set_ok(true);
      out.set_lease_id(lease_id);
      out.set_node_id(node_id);
      for (const auto& g : choice.gpus) *out.add_gpus() = g;
      spdlog::info("leased {} GPU(s) on {} to {} (lease {}, topology score {})", created.size(),
                   node_id, req.workspace_id(), lease_id, choice.score);
      return out;
    }
    // All or nothing: give back what this round took (only if still ours, by revision).
    for (const auto& [key, rev] : created) {
      if (auto st = erase_lease(key, rev); !st) {
        spdlog::warn("cannot roll back lease {}: {}", key, st.error().message);
      }
    }
    if (!conflict) {
      return fail(cvm::v1::INSUFFICIENT_CAPACITY, "the lease ledger could not be written");
    }
  }
  return fail(cvm::v1::INSUFFICIENT_CAPACITY,
              "GPUs on " + node_id + " are being taken by concurrent reservations");
}

cvm::v1::GpuReleaseReply BrokerService::release(const cvm::v1::GpuReleaseRequest& req,
                                                const std::string& from_node) {
  cvm::v1::GpuReleaseReply out;
  if (!wire::is_valid_id(req.workspace_id())) {
    out.set_ok(false);
    out.set_message("workspace_id is required");
    return out;
  }
  if (!from_node.empty() && !req.node_id().empty() && req.node_id() != from_node) {
    meters_->foreign.Increment();
    spdlog::warn("refused: the agent of node {} asked to release GPUs of node {} (workspace {})",
                 from_node, req.node_id(), req.workspace_id());
    out.set_ok(false);
    out.set_message("node " + from_node + " may release only its own GPUs, not node " +
                    req.node_id() + "'s");
    return out;
  }
  // A node's agent releases its own node's leases only, whatever workspace it names.
  auto matches = [&](const cvm::v1::GpuLease& lease) {
    return lease.workspace_id() == req.workspace_id() &&
           (req.lease_id().empty() || lease.lease_id() == req.lease_id()) &&
           (from_node.empty() || lease.node_id() == from_node);
  };
  // key -> revision to delete at.
  std::map<std::string, uint64_t> targets;
  if (!req.node_id().empty() && req.gpu_uuids_size() > 0) {
    // Named GPUs: read the ledger itself, so a release right after a grant by another replica
    // works before this replica's watch has caught up.
    for (const auto& uuid : req.gpu_uuids()) {
      const auto key = lease_key(req.node_id(), uuid);
      auto cur = leases_kv_->get(key);
      if (!cur) {
        out.set_message("cannot read lease " + key + ": " + cur.error().message);
        continue;
      }
      if (!cur->has_value()) continue;
      cvm::v1::GpuLease lease;
      if (lease.ParseFromString((*cur)->value) && matches(lease)) {
        targets[key] = (*cur)->revision;
      }
    }
  }
  for (const auto& [key, entry] : leases_) {
    if (matches(entry.lease) && !targets.contains(key)) targets[key] = entry.revision;
  }
  if (targets.empty()) {
    // Nothing in this replica's view: the lease may have been granted by another replica a
    // moment ago, before our watch caught up (seen in CI). Read the ledger itself rather than
    // answer "released 0" and leave the lease until the reconcile finds the workspace gone.
    // Only releases that find nothing pay for the scan.
    if (auto keys = leases_kv_->keys(); keys) {
      for (const auto& key : *keys) {
        auto cur = leases_kv_->get(key);
        if (!cur || !cur->has_value()) continue;
        cvm::v1::GpuLease lease;
        if (lease.ParseFromString((*cur)->value) && matches(lease)) {
          targets[key] = (*cur)->revision;
        }
      }
    } else {
      out.set_message("cannot list leases: " + keys.error().message);
    }
  }
  if (!from_node.empty() && targets.empty()) {
    // Nothing of its own node: say so when the workspace's leases are another node's.
    for (const auto& [key, entry] : leases_) {
      (void)key;
      const auto& lease = entry.lease;
      if (lease.workspace_id() == req.workspace_id() && lease.node_id() != from_node &&
          (req.lease_id().empty() || lease.lease_id() == req.lease_id())) {
        meters_->foreign.Increment();
        spdlog::warn("refused: the agent of node {} asked to release the GPUs of {} on node {}",
                     from_node, req.workspace_id(), lease.node_id());
        out.set_ok(false);
        out.set_message("the GPUs of " + req.workspace_id() + " are on node " + lease.node_id() +
                        ": node " + from_node + " may release only its own");
        return out;
      }
    }
  }
  uint32_t released = 0;
  for (const auto& [key, revision] : targets) {
    auto st = erase_lease(key, revision);
    if (!st && st.error().is_conflict()) {
      // Changed since we read it: look again, it may still be this workspace's (a re-put).
      auto cur = leases_kv_->get(key);
      cvm::v1::GpuLease lease;
      if (cur && cur->has_value() && lease.ParseFromString((*cur)->value) && matches(lease)) {
        st = erase_lease(key, (*cur)->revision);
      } else {
        continue;  // someone else released it first
      }
    }
    if (st) {
      ++released;
    } else {
      out.set_message("cannot release " + key + ": " + st.error().message);
    }
  }
  meters_->released.Increment(released);
  out.set_ok(out.message().empty());
  out.set_released(released);
  if (released > 0) spdlog::info("released {} GPU lease(s) of {}", released, req.workspace_id());
  return out;
}

size_t BrokerService::reconcile() {
  if (!synced() || stopped_) return 0;
  std::vector<LeaseEntry> all;
  all.reserve(leases_.size());
  for (const auto& [key, entry] : leases_) all.push_back(entry);
  const auto plan = plan_reclaims(all, heartbeats_, workspaces_,
                                  {.now_unix_ms = clock_.now_unix_ms(),
                                   .node_ttl_ms = config_.node_ttl.count(),
                                   .lease_grace_ms = config_.lease_grace.count()});
  size_t freed = 0;
  for (const auto& r : plan) {
    auto st = erase_lease(r.key, r.revision);
    if (!st) {
      // A conflict means another replica (or a release) got there first, or it was leased anew.
      if (!st.error().is_conflict()) {
        spdlog::warn("cannot reclaim lease {}: {}", r.key, st.error().message);
      }
      continue;
    }
    ++freed;
    const bool node_cause =
        r.cause == ReclaimCause::kNodeGone || r.cause == ReclaimCause::kNodeLost;
    (node_cause ? meters_->reclaimed_node : meters_->reclaimed_workspace).Increment();
    spdlog::info("reclaimed GPU lease {} of {} ({}: {})", r.key, r.workspace_id,
                 reclaim_cause_name(r.cause), r.message);
  }
  if (freed > 0) update_gauges();
  return freed;
}

void BrokerService::schedule_reconcile() {
  if (!reconcile_timer_ || stopped_) return;
  reconcile_timer_->expires_after(config_.reconcile_interval);
  reconcile_timer_->async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_) return;
    reconcile();
    update_gauges();  // quarantines end with time, not with a message
    schedule_reconcile();
  });
}

void BrokerService::on_synced() {
  if (!synced()) return;
  spdlog::info("gpu-broker in sync: {} GPU node(s), {} lease(s), {} workspace(s)",
               inventory_.size(), leases_.size(), workspaces_.size());
  reconcile();  // on start-up: whatever was lost while no broker ran
  schedule_reconcile();
}

void BrokerService::notify_health(const NodeGpuInventory* before, const NodeGpuInventory& now) {
  const auto notices = health_notices(before, now, leases_of(now.node_id), health_now());
  for (const auto& n : notices) {
    const auto it = leases_.find(lease_key(now.node_id, n.gpu_uuid));
    if (it == leases_.end() || it->second.lease.build_id().empty()) {
      spdlog::warn("{} (workspace {}, no build to tell)", n.message, n.workspace_id);
      continue;
    }
    const auto& lease = it->second.lease;
    // A notice repeats the build's last phase: it adds a warning without moving the build.
    auto phase = cvm::v1::PHASE_UNSPECIFIED;
    auto last = conn_->last_message(std::string(wire::kStreamEvents),
                                    wire::build_events_subject(lease.build_id()));
    if (last && last->has_value()) {
      cvm::v1::BuildEvent prev;
      if (prev.ParseFromString((*last)->data)) phase = prev.phase();
    }
    auto e = service::make_event(lease.build_id(), lease.workspace_id(), phase, clock_, kSource);
    e.set_node_id(now.node_id);
    e.set_notice(true);
    e.add_gpu_uuids(n.gpu_uuid);
    e.add_warnings(n.message);
    // Every replica sees the same report: the msg-id lets the stream keep one notice per event.
    const std::string msg_id =
        lease.build_id() + ".gpu-health." + n.gpu_uuid + "." + std::to_string(n.event_unix_ms);
    auto ack = conn_->js_publish(wire::build_events_subject(lease.build_id()),
                                 e.SerializeAsString(), msg_id);
    if (!ack) {
      spdlog::warn("cannot publish the GPU health notice for {}: {}", lease.build_id(),
                   ack.error().message);
      continue;
    }
    if (!ack->duplicate) meters_->notices.Increment();
    spdlog::warn("{} (workspace {}, build {})", n.message, n.workspace_id, lease.build_id());
  }
}

void BrokerService::on_node(const std::optional<bus::KvEntry>& entry) {
  if (!entry) {
    nodes_synced_ = true;
    on_synced();
    return;
  }
  if (entry->op != bus::KvOp::kPut) {
    inventory_.erase(entry->key);
    heartbeats_.erase(entry->key);
    update_gauges();
    reconcile();  // a deregistered node's GPUs are free now
    return;
  }
  cvm::v1::NodeStatus status;
  if (!status.ParseFromString(entry->value)) {
    spdlog::warn("ignoring an unreadable NodeStatus for {} (revision {})", entry->key,
                 entry->revision);
    return;
  }
  const std::string id = status.node_id().empty() ? entry->key : status.node_id();
  heartbeats_[id] = status.heartbeat_unix_ms();
  auto inv = inventory_from(status);
  inv.node_id = id;
  const auto old = inventory_.find(id);
  // Most writes are heartbeats that change nothing the broker keeps (5,000 nodes heartbeat every
  // few seconds, and again after each launch): no devices before or now, or the same devices,
  // leave the health notices and gauges as they are (the periodic refresh covers quarantines that
  // end with time).
  if (old == inventory_.end() && inv.gpus.empty()) return;
  if (old != inventory_.end() && same_devices(old->second, inv)) {
    old->second.heartbeat_unix_ms = inv.heartbeat_unix_ms;
    return;
  }
  if (leases_synced_) notify_health(old == inventory_.end() ? nullptr : &old->second, inv);
  if (inv.gpus.empty()) {
    inventory_.erase(id);
  } else {
    inventory_[id] = std::move(inv);
  }
  update_gauges(&id);
}

void BrokerService::on_lease(const std::optional<bus::KvEntry>& entry) {
  if (!entry) {
    leases_synced_ = true;
    on_synced();
    return;
  }
  if (entry->op != bus::KvOp::kPut) {
    leases_.erase(entry->key);
  } else {
    LeaseEntry e{entry->key, entry->revision, {}};
    if (!e.lease.ParseFromString(entry->value) || e.lease.node_id().empty()) {
      // An unreadable lease still holds its GPU: freeing it on a guess could lease it twice.
      const auto dot = entry->key.find('.');
      e.lease.set_node_id(entry->key.substr(0, dot));
      if (dot != std::string::npos) e.lease.set_gpu_uuid(entry->key.substr(dot + 1));
      spdlog::warn("lease {} is unreadable; its GPU stays held", entry->key);
    }
    leases_[entry->key] = std::move(e);
  }
  const std::string node = entry->key.substr(0, entry->key.find('.'));
  update_gauges(&node);
}

void BrokerService::on_workspace(const std::optional<bus::KvEntry>& entry) {
  if (!entry) {
    workspaces_synced_ = true;
    on_synced();
    return;
  }
  if (entry->op != bus::KvOp::kPut) {
    workspaces_.erase(entry->key);
    return;
  }
  cvm::v1::WorkspaceRecord rec;
  WorkspaceView view;
  // An unreadable record still says the workspace exists.
  if (rec.ParseFromString(entry->value)) {
    view.phase = rec.phase();
    view.updated_unix_ms = rec.updated_unix_ms();
  }
  workspaces_[entry->key] = view;
}

void BrokerService::on_settings(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  cvm::v1::InfrastructureSettings s;
  if (entry->op != bus::KvOp::kPut) {
    placement_ = NodePlacement::kPacked;
    return;
  }
  if (!s.ParseFromString(entry->value)) {
    spdlog::warn("ignoring unreadable infrastructure settings (revision {})", entry->revision);
    return;
  }
  placement_ = s.gpu_placement() == cvm::v1::GPU_PLACEMENT_SPREAD ? NodePlacement::kSpread
                                                                  : NodePlacement::kPacked;
}

void BrokerService::update_gauges(const std::string* only_node) {
  const auto health = health_now();
  const auto set = [&](const std::string& node, const std::string& model, const char* state,
                       uint32_t v) {
    metrics_
        .gauge("cvm_gpu_broker_node_gpus", "GPUs by node, model and state",
               {{"node", node}, {"model", model}, {"state", state}})
        .Set(v);
  };
  std::set<std::string> seen;
  for (const auto& [id, inv] : inventory_) {
    if (only_node != nullptr && id != *only_node) continue;
    for (const auto& [model, c] : count_gpus(inv, leases_of(id), health)) {
      seen.insert(id + "\n" + model);
      set(id, model, "total", c.total);
      set(id, model, "free", c.free);
      set(id, model, "leased", c.leased);
      set(id, model, "unhealthy", c.unhealthy);
      set(id, model, "unsupported", c.unsupported);
    }
  }
  // Nodes or models that went away read 0 rather than their last value.
  for (auto it = gauge_labels_.begin(); it != gauge_labels_.end();) {
    const auto nl = it->find('\n');
    const std::string node = it->substr(0, nl);
    if (seen.contains(*it) || (only_node != nullptr && node != *only_node)) {
      ++it;
      continue;
    }
    for (const char* state : {"total", "free", "leased", "unhealthy", "unsupported"}) {
      set(node, it->substr(nl + 1), state, 0);
    }
    it = gauge_labels_.erase(it);
  }
  gauge_labels_.insert(seen.begin(), seen.end());
  size_t total = 0;
  for (const auto& [id, inv] : inventory_) {
    for (const auto& g : inv.gpus) total += is_allocatable(g) ? 1 : 0;
  }
  meters_->gpus.Set(static_cast<double>(total));
  meters_->leased.Set(static_cast<double>(leases_.size()));
}

}  // namespace cvm::broker
