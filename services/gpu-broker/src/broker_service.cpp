#include "cvm/broker/broker_service.h"

#include <chrono>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "cvm/base/wire.h"
#include "cvm/service/streams.h"

namespace cvm::broker {

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
        latency(m.histogram("cvm_gpu_broker_reserve_seconds", "Time to answer a reserve")),
        gpus(m.gauge("cvm_gpu_broker_gpus", "GPUs known", {{"state", "total"}})),
        leased(m.gauge("cvm_gpu_broker_gpus", "GPUs known", {{"state", "leased"}})) {}
  prometheus::Counter& granted;
  prometheus::Counter& refused;
  prometheus::Counter& invalid;
  prometheus::Counter& conflicts;
  prometheus::Counter& released;
  prometheus::Histogram& latency;
  prometheus::Gauge& gpus;
  prometheus::Gauge& leased;
};

BrokerService::BrokerService(bus::ConnectionPtr conn, telemetry::Metrics& metrics,
                             const Clock& clock)
    : conn_(std::move(conn)), clock_(clock), meters_(std::make_unique<Meters>(metrics)) {}

BrokerService::~BrokerService() { stop(); }

Status BrokerService::start() {
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  auto leases = conn_->ensure_kv(service::gpu_leases_bucket());
  if (!leases) return leases.error();
  auto nw = nodes->watch(">", [this](std::optional<bus::KvEntry> e) { on_node(e); });
  if (!nw) return nw.error();
  nodes_watch_ = std::move(*nw);
  auto lw = leases->watch(">", [this](std::optional<bus::KvEntry> e) { on_lease(e); });
  if (!lw) return lw.error();
  leases_watch_ = std::move(*lw);
  leases_kv_ = std::move(*leases);

  const std::string queue(wire::kBrokerQueue);
  auto rs = conn_->subscribe(std::string(wire::kGpuReserve), queue, [this](bus::Message m) {
    cvm::v1::GpuReserveRequest req;
    if (!req.ParseFromString(m.data)) {
      meters_->invalid.Increment();
      cvm::v1::GpuReserveReply bad;
      bad.set_reason(cvm::v1::INVALID_REQUEST);
      bad.set_message("the request is not a cvm.v1.GpuReserveRequest");
      return reply(m, bad);
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto r = reserve(req);
    meters_->latency.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    reply(m, r);
  });
  if (!rs) return rs.error();
  reserve_sub_ = std::move(*rs);
  auto rl = conn_->subscribe(std::string(wire::kGpuRelease), queue, [this](bus::Message m) {
    cvm::v1::GpuReleaseRequest req;
    if (!req.ParseFromString(m.data)) {
      meters_->invalid.Increment();
      cvm::v1::GpuReleaseReply bad;
      bad.set_message("the request is not a cvm.v1.GpuReleaseRequest");
      return reply(m, bad);
    }
    reply(m, release(req));
  });
  if (!rl) return rl.error();
  release_sub_ = std::move(*rl);
  // Make sure the server has the subscriptions before anyone is told we are up.
  if (auto st = conn_->flush(); !st) return st;
  spdlog::info("gpu-broker answering {} and {} (queue {})", wire::kGpuReserve, wire::kGpuRelease,
               queue);
  return {};
}

void BrokerService::stop() {
  reserve_sub_.reset();
  release_sub_.reset();
  nodes_watch_.reset();
  leases_watch_.reset();
}

void BrokerService::reply(const bus::Message& msg, const google::protobuf::Message& body) {
  if (msg.reply.empty()) return;
  if (auto st = conn_->publish(msg.reply, body.SerializeAsString()); !st) {
    spdlog::warn("cannot reply on {}: {}", msg.reply, st.error().message);
  }
}

cvm::v1::GpuReserveReply BrokerService::reserve(const cvm::v1::GpuReserveRequest& req) {
  cvm::v1::GpuReserveReply out;
  auto refuse = [&](cvm::v1::Reason reason, std::string message) {
    meters_->refused.Increment();
    out.set_ok(false);
    out.set_reason(reason);
    out.set_message(std::move(message));
    spdlog::info("refused {} GPU(s) on {} for {}: {}", req.count(), req.node_id(),
                 req.workspace_id(), out.message());
    return out;
  };
  if (!wire::is_valid_id(req.node_id()) || !wire::is_valid_id(req.workspace_id()) ||
      req.count() == 0) {
    return refuse(cvm::v1::INVALID_REQUEST, "node_id, workspace_id and count > 0 are required");
  }
  // A retried reservation (the scheduler crashed or timed out after we granted) gets the same
  // lease back instead of a second set of GPUs.
  const std::string lease_id = req.build_id().empty() ? req.workspace_id() : req.build_id();
  std::vector<cvm::v1::GpuDevice> held;
  const auto it = inventory_.find(req.node_id());
  if (it != inventory_.end()) {
    for (const auto& g : it->second.gpus) {
      auto l = leases_.find(lease_key(req.node_id(), g.uuid()));
      if (l != leases_.end() && l->second.lease_id() == lease_id) held.push_back(g);
    }
  }
  if (!held.empty()) {
    meters_->granted.Increment();
    out.set_ok(true);
    out.set_lease_id(lease_id);
    for (auto& g : held) *out.add_gpus() = std::move(g);
    return out;
  }
  if (it == inventory_.end()) {
    return refuse(cvm::v1::INSUFFICIENT_CAPACITY, "node " + req.node_id() + " reports no GPUs");
  }
  const auto& node = it->second;
  if (auto refusal = check_gpu_policy({.vendor = req.vendor(), .bare_metal = node.bare_metal})) {
    return refuse(refusal->reason, refusal->message);
  }

  // Up to a few rounds: a lost create means another reservation took that GPU; learn it and
  // choose again.
  for (int round = 0; round < 4; ++round) {
    std::vector<cvm::v1::GpuLease> node_leases;
    for (const auto& [key, lease] : leases_) {
      if (lease.node_id() == req.node_id()) node_leases.push_back(lease);
    }
    auto choice = choose_gpus(node, leases_on_node(req.node_id(), node_leases), req.count(),
                              req.min_memory_bytes());
    if (!choice.ok()) return refuse(choice.refusal->reason, choice.refusal->message);

    std::vector<std::string> created;
    bool conflict = false;
    for (const auto& g : choice.gpus) {
      cvm::v1::GpuLease lease;
      lease.set_lease_id(lease_id);
      lease.set_node_id(req.node_id());
      lease.set_gpu_uuid(g.uuid());
      lease.set_workspace_id(req.workspace_id());
      lease.set_build_id(req.build_id());
      lease.set_leased_unix_ms(clock_.now_unix_ms());
      const auto key = lease_key(req.node_id(), g.uuid());
      auto rev = leases_kv_->create(key, lease.SerializeAsString());
      if (rev) {
        created.push_back(key);
        leases_[key] = lease;
        continue;
      }
      if (rev.error().is_conflict()) {
        meters_->conflicts.Increment();
        conflict = true;
        if (auto cur = leases_kv_->get(key); cur && cur->has_value()) {
          cvm::v1::GpuLease theirs;
          if (theirs.ParseFromString((*cur)->value)) leases_[key] = theirs;
        }
      } else {
        spdlog::warn("cannot write lease {}: {}", key, rev.error().message);
      }
      break;
    }
    if (created.size() == choice.gpus.size()) {
      meters_->granted.Increment();
      out.set_ok(true);
      out.set_lease_id(lease_id);
      for (const auto& g : choice.gpus) *out.add_gpus() = g;
      spdlog::info("leased {} GPU(s) on {} to {} (lease {})", created.size(), req.node_id(),
                   req.workspace_id(), lease_id);
      return out;
    }
    // All or nothing: give back what this round took.
    for (const auto& key : created) {
      (void)leases_kv_->erase(key);
      leases_.erase(key);
    }
    if (!conflict) {
      return refuse(cvm::v1::INSUFFICIENT_CAPACITY, "the lease ledger could not be written");
    }
  }
  return refuse(cvm::v1::INSUFFICIENT_CAPACITY,
                "GPUs on " + req.node_id() + " are being taken by concurrent reservations");
}

cvm::v1::GpuReleaseReply BrokerService::release(const cvm::v1::GpuReleaseRequest& req) {
  cvm::v1::GpuReleaseReply out;
  uint32_t released = 0;
  std::vector<std::string> keys;
  for (const auto& [key, lease] : leases_) {
    if (lease.workspace_id() == req.workspace_id() &&
        (req.lease_id().empty() || lease.lease_id() == req.lease_id())) {
      keys.push_back(key);
    }
  }
  for (const auto& key : keys) {
    if (auto st = leases_kv_->erase(key); st) {
      leases_.erase(key);
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

void BrokerService::on_node(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  if (entry->op != bus::KvOp::kPut) {
    inventory_.erase(entry->key);
  } else {
    cvm::v1::NodeStatus status;
    if (!status.ParseFromString(entry->value)) return;
    if (status.gpus_size() == 0) {
      inventory_.erase(status.node_id());
    } else {
      inventory_[status.node_id()] = inventory_from(status);
    }
  }
  size_t total = 0;
  for (const auto& [id, inv] : inventory_) total += inv.gpus.size();
  meters_->gpus.Set(static_cast<double>(total));
}

void BrokerService::on_lease(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  if (entry->op != bus::KvOp::kPut) {
    leases_.erase(entry->key);
  } else {
    cvm::v1::GpuLease lease;
    if (lease.ParseFromString(entry->value)) leases_[entry->key] = std::move(lease);
  }
  meters_->leased.Set(static_cast<double>(leases_.size()));
}

}  // namespace cvm::broker
