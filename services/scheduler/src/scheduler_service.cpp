#include "cvm/scheduler/scheduler_service.h"

#include <algorithm>
#include <random>
#include <string>
#include <utility>

#include <spdlog/spdlog.h>

#include "cvm/base/reasons.h"
#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/scheduler/ledger.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"

namespace cvm::scheduler {

namespace {

constexpr std::string_view kSource = "scheduler";

std::string record_key(std::string_view node_id, std::string_view build_id) {
  return std::string(node_id) + "." + std::string(build_id);
}

// Reservation ids in the NodeIndex for the holds read from a node's ledger.
std::string ledger_reservation(std::string_view node_id) {
  return "ledger/" + std::string(node_id);
}

bool is_kv_delete(const bus::Message& m) {
  auto it = m.headers.find("KV-Operation");
  return it != m.headers.end() && (it->second == "DEL" || it->second == "PURGE");
}

}  // namespace

struct SchedulerService::Meters {
  explicit Meters(telemetry::Metrics& m)
      : received(m.counter("cvm_scheduler_builds_received_total",
                           "Build requests read from CVM_BUILDS (deliveries, not unique builds)")),
        invalid(m.counter("cvm_scheduler_builds_invalid_total",
                          "Build requests terminated as malformed or incomplete")),
        duplicate(m.counter("cvm_scheduler_builds_duplicate_total",
                            "Build requests already handled (redelivery or resubmission)")),
        scheduled(m.counter("cvm_scheduler_placements_total", "Placement outcomes",
                            {{"result", "scheduled"}})),
        failed(m.counter("cvm_scheduler_placements_total", "Placement outcomes",
                         {{"result", "failed"}})),
        retried(m.counter("cvm_scheduler_builds_retried_total",
                          "Build requests handed back for a later retry (bus or broker down)")),
        conflicts(m.counter("cvm_scheduler_capacity_conflicts_total",
                            "Capacity holds lost to another replica (compare-and-set conflicts)")),
        from_record(m.counter("cvm_scheduler_finished_from_record_total",
                              "Redelivered requests finished on the node already recorded")),
        placed_again(m.counter("cvm_scheduler_placed_again_total",
                               "Builds placed again because their node was lost")),
        nodes_lost(m.counter("cvm_scheduler_nodes_lost_total", "Node-lost notices handled")),
        decision(m.histogram("cvm_scheduler_decision_seconds",
                             "Time to filter and score every node for one request")),
        handling(m.histogram("cvm_scheduler_handle_seconds",
                             "Time from reading a request to acking it")),
        nodes(m.gauge("cvm_scheduler_nodes", "Nodes registered in cvm_nodes")),
        metrics(m) {}

  prometheus::Counter& failed_reason(cvm::v1::Reason reason) {
    return metrics.counter("cvm_scheduler_failures_total", "FAILED events by reason",
                           {{"reason", cvm::v1::Reason_Name(reason)}});
  }

  prometheus::Counter& received;
  prometheus::Counter& invalid;
  prometheus::Counter& duplicate;
  prometheus::Counter& scheduled;
  prometheus::Counter& failed;
  prometheus::Counter& retried;
  prometheus::Counter& conflicts;
  prometheus::Counter& from_record;
  prometheus::Counter& placed_again;
  prometheus::Counter& nodes_lost;
  prometheus::Histogram& decision;
  prometheus::Histogram& handling;
  prometheus::Gauge& nodes;
  telemetry::Metrics& metrics;
};

SchedulerService::SchedulerService(boost::asio::io_context& io, bus::ConnectionPtr conn,
                                   telemetry::Metrics& metrics, const Clock& clock,
                                   SchedulerConfig config)
    : io_(io),
      conn_(std::move(conn)),
      clock_(clock),
      config_(config),
      meters_(std::make_unique<Meters>(metrics)),
      sweep_timer_(io),
      // Replicas start their rotation at different places, so that with sampling they look at
      // different parts of the fleet instead of all racing for the same few nodes.
      decisions_(std::random_device{}()) {}

SchedulerService::~SchedulerService() { stop(); }

Status SchedulerService::start() {
  stopped_ = false;
  if (auto st = service::ensure_streams(*conn_); !st) return st;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  auto settings = conn_->ensure_kv(service::settings_bucket());
  if (!settings) return settings.error();
  auto leases = conn_->ensure_kv(service::gpu_leases_bucket());
  if (!leases) return leases.error();
  auto workspaces = conn_->ensure_kv(service::workspaces_bucket());
  if (!workspaces) return workspaces.error();
  auto capacity = conn_->ensure_kv(service::capacity_bucket());
  if (!capacity) return capacity.error();
  auto placements = conn_->ensure_kv(service::placements_bucket());
  if (!placements) return placements.error();
  workspaces_ = std::move(*workspaces);
  placements_ = std::move(*placements);

  auto nw = nodes->watch(">", [this](std::optional<bus::KvEntry> e) { on_node(e); });
  if (!nw) return nw.error();
  nodes_watch_ = std::move(*nw);
  auto sw = settings->watch(std::string(wire::kSettingsKey),
                            [this](std::optional<bus::KvEntry> e) { on_settings(e); });
  if (!sw) return sw.error();
  settings_watch_ = std::move(*sw);
  auto lw = leases->watch(">", [this](std::optional<bus::KvEntry> e) { on_lease(e); });
  if (!lw) return lw.error();
  leases_watch_ = std::move(*lw);
  auto cw = capacity->watch(">", [this](std::optional<bus::KvEntry> e) { on_ledger(e); });
  if (!cw) return cw.error();
  capacity_watch_ = std::move(*cw);
  capacity_ = std::move(*capacity);

  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamBuilds);
  cc.durable = std::string(wire::kSchedulerDurable);
  cc.filter_subject = std::string(wire::kBuildsSubmit);
  cc.ack_wait = std::chrono::seconds(30);
  cc.max_deliver = config_.max_deliver;
  auto consumer = conn_->pull_consume(cc, [this](bus::JsMessagePtr m) { on_build(m); });
  if (!consumer) return consumer.error();
  consumer_ = std::move(*consumer);
  schedule_sweep();
  spdlog::info("scheduler consuming {} (durable {}), node TTL {} ms", wire::kStreamBuilds,
               wire::kSchedulerDurable, config_.node_ttl.count());
  return {};
}

void SchedulerService::stop() {
  stopped_ = true;
  sweep_timer_.cancel();
  consumer_.reset();
  nodes_watch_.reset();
  settings_watch_.reset();
  leases_watch_.reset();
  capacity_watch_.reset();
}

// ---------------------------------------------------------------------------------------------
// Requests

void SchedulerService::on_build(const bus::JsMessagePtr& msg) {
  const auto started = std::chrono::steady_clock::now();
  meters_->received.Increment();
  if (msg->header(std::string(kHeaderNodeLost))) return handle_node_lost(msg);

  const auto header_id = msg->header("Nats-Msg-Id");
  const auto again_from = msg->header(std::string(kHeaderPlaceAgain));
  auto decoded = decode_build_request(msg->data(), header_id && !again_from
                                                       ? std::optional<std::string_view>(*header_id)
                                                       : std::nullopt);
  if (decoded.invalid) {
    const auto& bad = *decoded.invalid;
    meters_->invalid.Increment();
    spdlog::warn("invalid build request (stream seq {}, build {}): {}", msg->stream_sequence(),
                 bad.build_id.value_or("<unreadable>"), bad.message);
    if (bad.build_id) {
      auto e = service::make_event(*bad.build_id, bad.workspace_id.value_or(""), cvm::v1::FAILED,
                                   clock_, kSource);
      e.set_reason(cvm::v1::INVALID_REQUEST);
      e.set_message(bad.message);
      if (auto ack = service::publish_event(*conn_, e); !ack) {
        // The requester must hear about it: keep the message and try again later, bounded by
        // max_deliver.
        return retry_later(msg, ack.error().message);
      }
      meters_->failed_reason(cvm::v1::INVALID_REQUEST).Increment();
    }
    // Never redeliver what can never parse.
    if (auto st = msg->term(); !st) spdlog::warn("term failed: {}", st.error().message);
    return;
  }
  const auto& req = *decoded.request;
  if (again_from) {
    handle_place_again(req, *again_from, msg);
  } else if (already_handled(req.build_id())) {
    meters_->duplicate.Increment();
    spdlog::info("build {} was already handled; dropping the duplicate", req.build_id());
    ack(msg);
  } else if (req.transition() == cvm::v1::START) {
    handle_start(req, msg);
  } else {
    handle_transition(req, msg);
  }
  meters_->handling.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
}

bool SchedulerService::already_handled(const std::string& build_id) {
  auto last =
      conn_->last_message(std::string(wire::kStreamEvents), wire::build_events_subject(build_id));
  // When the lookup itself fails, go on: every event carries a Nats-Msg-Id, so a repeated step
  // cannot publish a second copy of the same phase.
  return last.ok() && last->has_value();
}

Result<std::optional<cvm::v1::Phase>> SchedulerService::last_phase(const std::string& build_id) {
  auto last =
      conn_->last_message(std::string(wire::kStreamEvents), wire::build_events_subject(build_id));
  if (!last) return last.error();
  if (!last->has_value()) return std::optional<cvm::v1::Phase>{};
  cvm::v1::BuildEvent e;
  if (!e.ParseFromString((*last)->data)) return std::optional<cvm::v1::Phase>{};
  return std::optional<cvm::v1::Phase>(e.phase());
}

Result<std::optional<cvm::v1::PlacementRecord>> SchedulerService::find_record(
    const std::string& build_id) {
  // Records are keyed "<node>.<build>"; the newest message on "$KV.<bucket>.*.<build>" is the
  // build's latest record whichever node it names (a record moved off a lost node is rewritten to
  // name the new one, so the newest is always current).
  const std::string bucket(wire::kBucketPlacements);
  auto last = conn_->last_message("KV_" + bucket, "$KV." + bucket + ".*." + build_id);
  if (!last) return last.error();
  if (!last->has_value() || is_kv_delete(**last)) {
    return std::optional<cvm::v1::PlacementRecord>{};
  }
  cvm::v1::PlacementRecord r;
  if (!r.ParseFromString((*last)->data) || r.assignment().node_id().empty()) {
    // Bad data must not wedge the build: decide afresh (the assignment's msg-id still guards).
    spdlog::warn("ignoring an unreadable placement record of build {}", build_id);
    return std::optional<cvm::v1::PlacementRecord>{};
  }
  return std::optional<cvm::v1::PlacementRecord>(std::move(r));
}

void SchedulerService::handle_start(const cvm::v1::BuildRequest& req,
                                    const bus::JsMessagePtr& msg) {
  if (msg->num_delivered() > 1) {
    // A previous delivery may have got as far as recording (and even sending) the assignment
    // before it crashed or timed out: finish on that node rather than deciding again, which
    // could name a different node than the one the deduplicated assignment went to.
    auto record = find_record(req.build_id());
    if (!record)
      return retry_later(msg, "cannot read placement records: " + record.error().message);
    if (record->has_value()) return finish_recorded(**record, msg);
  }
  place_and_dispatch(req, msg, "");
}

void SchedulerService::place_and_dispatch(const cvm::v1::BuildRequest& req,
                                          const bus::JsMessagePtr& msg,
                                          const std::string& lost_node) {
  const auto settings = effective_settings(settings_ ? &*settings_ : nullptr);
  const auto preq = make_placement_request(req, settings);
  PlacementOptions opts;
  opts.now_unix_ms = clock_.now_unix_ms();
  opts.liveness_ttl_ms = config_.node_ttl.count();
  opts.strategy = settings.scoring;
  opts.max_candidates = config_.max_candidates;
  opts.sampling = config_.sampling;
  opts.sample_percent = config_.sample_percent;
  opts.start_offset = decisions_++;
  const auto t0 = std::chrono::steady_clock::now();
  auto decision = place(index_, preq, opts);
  meters_->decision.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  const std::string lost_prefix =
      lost_node.empty() ? "" : "node " + lost_node + " was lost and it could not be placed again: ";
  if (!decision.ok()) {
    return fail(req, lost_node.empty() ? decision.reason : cvm::v1::NODE_LOST,
                lost_prefix + decision.message, msg);
  }

  Reservation amount = reservation_for(preq);
  // GPUs are not held in the ledger: the broker's lease ledger (CAS per GPU) is their authority
  // and the cvm_gpu_leases watch already counts them in the index.
  amount.gpus = 0;
  std::optional<cvm::v1::GpuReserveReply> last_refusal;
  bool contended = false;
  for (const auto& candidate : decision.candidates) {
    if (candidate.node_id == lost_node) continue;
    switch (hold_capacity(candidate.node_id, req.build_id(), amount)) {
      case HoldOutcome::kHeld:
        break;
      case HoldOutcome::kNoRoom:
        contended = true;
        continue;  // another replica took the room first: the next candidate may have it
      case HoldOutcome::kError:
        return retry_later(msg, "cannot write the capacity hold on " + candidate.node_id);
    }

    cvm::v1::NodeAssignment a;
    *a.mutable_request() = req;
    a.set_node_id(candidate.node_id);
    a.set_cvm(preq.cvm);
    a.set_caching(settings.caching);
    a.set_auto_load_shiftfs(settings.auto_load_shiftfs);
    a.set_assigned_unix_ms(clock_.now_unix_ms());

    if (preq.gpu_count > 0) {
      cvm::v1::GpuReserveRequest gr;
      gr.set_node_id(candidate.node_id);
      gr.set_count(preq.gpu_count);
      gr.set_min_memory_bytes(preq.gpu_min_memory_bytes);
      gr.set_workspace_id(req.workspace_id());
      gr.set_build_id(req.build_id());
      gr.set_vendor(preq.gpu_vendor);
      auto reply = conn_->request(std::string(wire::kGpuReserve), gr.SerializeAsString(),
                                  config_.gpu_reserve_timeout);
      if (!reply) {
        drop_hold(candidate.node_id, req.build_id());
        return retry_later(msg, "GPU broker: " + reply.error().message);
      }
      cvm::v1::GpuReserveReply rr;
      if (!rr.ParseFromString(reply->data)) {
        drop_hold(candidate.node_id, req.build_id());
        return retry_later(msg, "GPU broker sent an unreadable reply");
      }
      if (!rr.ok()) {
        spdlog::info("build {}: broker refused node {}: {}", req.build_id(), candidate.node_id,
                     rr.message());
        drop_hold(candidate.node_id, req.build_id());
        last_refusal = std::move(rr);
        continue;  // the next candidate may have free GPUs
      }
      for (const auto& g : rr.gpus()) *a.add_gpus() = g;
      a.set_lease_id(rr.lease_id());
    }

    cvm::v1::PlacementRecord record;
    *record.mutable_assignment() = a;
    record.set_replaced_node_id(lost_node);
    auto created = placements_->create(record_key(candidate.node_id, req.build_id()),
                                       record.SerializeAsString());
    if (!created && !created.error().is_conflict()) {
      // Without the record a redelivery could not tell where this went: send nothing yet.
      drop_hold(candidate.node_id, req.build_id());
      if (!a.lease_id().empty()) release_gpus(req.workspace_id(), a.lease_id());
      return retry_later(msg, "cannot record the placement: " + created.error().message);
    }
    if (!lost_node.empty()) {
      // The lost node's record now names the new node: a lookup by build sees where it went, and
      // the lost node's next sweep skips it.
      (void)placements_->put(record_key(lost_node, req.build_id()), record.SerializeAsString());
    }
    if (auto st = publish_assignment(a, !lost_node.empty()); !st) {
      return retry_later(msg, "cannot publish the assignment: " + st.error().message);
    }
    if (auto st = publish_scheduled(a, lost_node); !st) {
      // The assignment is out and recorded: redelivery finishes from the record.
      return retry_later(msg, "cannot publish SCHEDULED: " + st.error().message);
    }
    meters_->scheduled.Increment();
    ++counts_.scheduled;
    if (!lost_node.empty()) {
      meters_->placed_again.Increment();
      ++counts_.placed_again;
    }
    spdlog::debug("build {} (workspace {}) scheduled on {}", req.build_id(), req.workspace_id(),
                  candidate.node_id);
    return ack(msg);
  }
  if (last_refusal) {
    return fail(req, lost_node.empty() ? last_refusal->reason() : cvm::v1::NODE_LOST,
                lost_prefix + last_refusal->message(), msg);
  }
  if (contended) {
    // Every candidate filled up under us (other replicas placed there first). The index has
    // learned their holds, so deciding again is not the same decision.
    return retry_later(msg, "every candidate was taken by concurrent placements");
  }
  fail(req, lost_node.empty() ? cvm::v1::INSUFFICIENT_CAPACITY : cvm::v1::NODE_LOST,
       lost_prefix + "no candidate node could take it", msg);
}

void SchedulerService::finish_recorded(const cvm::v1::PlacementRecord& record,
                                       const bus::JsMessagePtr& msg) {
  const auto& a = record.assignment();
  meters_->from_record.Increment();
  ++counts_.finished_from_record;
  spdlog::info("build {} was already placed on {}; finishing that placement",
               a.request().build_id(), a.node_id());
  const bool again = !record.replaced_node_id().empty();
  if (auto st = publish_assignment(a, again); !st) {
    return retry_later(msg, "cannot publish the assignment: " + st.error().message);
  }
  if (auto st = publish_scheduled(a, record.replaced_node_id()); !st) {
    return retry_later(msg, "cannot publish SCHEDULED: " + st.error().message);
  }
  ack(msg);
}

Status SchedulerService::publish_assignment(const cvm::v1::NodeAssignment& a, bool placed_again) {
  // The first assignment's msg-id is the build id (so a repeat is dropped by CVM_NODE_WORK); one
  // sent after a node was lost needs its own id, or the stream would drop it as that repeat.
  const std::string msg_id =
      placed_again ? a.request().build_id() + ".on." + a.node_id() : a.request().build_id();
  auto pub = conn_->js_publish(wire::node_work_subject(a.node_id()), a.SerializeAsString(), msg_id);
  if (!pub) return pub.error();
  return {};
}

Status SchedulerService::publish_scheduled(const cvm::v1::NodeAssignment& a,
                                           const std::string& lost_node) {
  const auto& req = a.request();
  auto e =
      service::make_event(req.build_id(), req.workspace_id(), cvm::v1::SCHEDULED, clock_, kSource);
  e.set_node_id(a.node_id());
  for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
  if (!a.cvm()) e.add_warnings("runs as a plain container (not a CVM): no Docker inside");
  if (lost_node.empty()) {
    auto ev = service::publish_event(*conn_, e);
    if (!ev) return ev.error();
    return {};
  }
  e.set_reason(cvm::v1::NODE_LOST);
  e.set_message("node " + lost_node + " was lost before the workspace ran; placed again on " +
                a.node_id());
  // A second SCHEDULED for the build: its own msg-id, or CVM_EVENTS would drop it as a repeat.
  auto ev = conn_->js_publish(wire::build_events_subject(req.build_id()), e.SerializeAsString(),
                              service::event_msg_id(e) + "." + a.node_id());
  if (!ev) return ev.error();
  return {};
}

void SchedulerService::handle_place_again(const cvm::v1::BuildRequest& req,
                                          const std::string& lost_node,
                                          const bus::JsMessagePtr& msg) {
  auto phase = last_phase(req.build_id());
  if (!phase) return retry_later(msg, "cannot read the build's events: " + phase.error().message);
  if (lost_node_action(*phase) != LostAction::kPlaceAgain) {
    spdlog::info("build {} is {} by now; not placing it again", req.build_id(),
                 *phase ? phase_name(**phase) : "unknown");
    return ack(msg);
  }
  auto record = find_record(req.build_id());
  if (!record) return retry_later(msg, "cannot read placement records: " + record.error().message);
  if (!record->has_value()) {
    spdlog::warn("build {}: no placement record to move off {}", req.build_id(), lost_node);
    return ack(msg);
  }
  if ((*record)->assignment().node_id() != lost_node) {
    // Already placed again (a crash after the new record): finish that one.
    return finish_recorded(**record, msg);
  }
  if (const auto* rec = index_.find(lost_node);
      rec != nullptr && rec->heartbeat_unix_ms >= clock_.now_unix_ms() - config_.node_ttl.count()) {
    spdlog::info("node {} is live again; build {} stays there", lost_node, req.build_id());
    return ack(msg);
  }
  const auto& old = (*record)->assignment();
  if (!old.lease_id().empty()) release_gpus(req.workspace_id(), old.lease_id());
  place_and_dispatch(req, msg, lost_node);
}

void SchedulerService::handle_node_lost(const bus::JsMessagePtr& msg) {
  cvm::v1::NodeLostNotice notice;
  if (!notice.ParseFromArray(msg->data().data(), static_cast<int>(msg->data().size())) ||
      !wire::is_valid_id(notice.node_id())) {
    meters_->invalid.Increment();
    (void)msg->term();
    return;
  }
  const std::string& node = notice.node_id();
  if (const auto* rec = index_.find(node);
      rec != nullptr && rec->heartbeat_unix_ms > notice.last_heartbeat_unix_ms()) {
    spdlog::info("node {} heartbeated again; ignoring its lost notice", node);
    return ack(msg);
  }
  spdlog::warn("node {} lost (last heartbeat {} ms ago)", node,
               clock_.now_unix_ms() - notice.last_heartbeat_unix_ms());
  // Every step below is idempotent (msg-ids, CAS, releases of what is already released), so a
  // crash part-way is finished by the redelivery.
  const std::string tag = std::to_string(notice.last_heartbeat_unix_ms());
  auto keys = placements_->keys();
  if (!keys) return retry_later(msg, "cannot list placement records: " + keys.error().message);
  const std::string prefix = node + ".";
  for (const auto& key : *keys) {
    if (!key.starts_with(prefix)) continue;
    auto entry = placements_->get(key);
    if (!entry) return retry_later(msg, "cannot read " + key + ": " + entry.error().message);
    cvm::v1::PlacementRecord r;
    if (!entry->has_value() || !r.ParseFromString((*entry)->value)) continue;
    const auto& a = r.assignment();
    if (a.node_id() != node) continue;  // already placed again elsewhere
    auto phase = last_phase(a.request().build_id());
    if (!phase) return retry_later(msg, "cannot read events: " + phase.error().message);
    if (lost_node_action(*phase) != LostAction::kPlaceAgain) continue;  // running: see below
    const auto& req = a.request();
    auto pub = conn_->js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(),
                                 req.build_id() + ".again." + node + "." + tag,
                                 {{std::string(kHeaderPlaceAgain), node}});
    if (!pub) return retry_later(msg, "cannot queue build again: " + pub.error().message);
  }

  // Running workspaces: their records (written by the agent) say where they run. Mark them LOST
  // by compare-and-set, so the event is sent once even across replicas and restarts.
  auto ws_keys = workspaces_->keys();
  if (!ws_keys) return retry_later(msg, "cannot list workspaces: " + ws_keys.error().message);
  for (const auto& key : *ws_keys) {
    auto entry = workspaces_->get(key);
    if (!entry || !entry->has_value()) continue;
    cvm::v1::WorkspaceRecord ws;
    if (!ws.ParseFromString((*entry)->value) || ws.node_id() != node ||
        ws.phase() != cvm::v1::RUNNING) {
      continue;
    }
    auto e = service::make_event(ws.build_id(), ws.workspace_id(), cvm::v1::LOST, clock_, kSource);
    e.set_node_id(node);
    e.set_reason(cvm::v1::NODE_LOST);
    e.set_message("node " + node + " missed heartbeats for " +
                  std::to_string(config_.node_ttl.count() / 1000) +
                  " s; the workspace is not running anywhere");
    if (auto ev = service::publish_event(*conn_, e); !ev) {
      return retry_later(msg, "cannot publish LOST: " + ev.error().message);
    }
    ws.set_phase(cvm::v1::LOST);
    ws.set_reason(cvm::v1::NODE_LOST);
    ws.set_message(e.message());
    ws.set_updated_unix_ms(clock_.now_unix_ms());
    // A conflict means the agent wrote it meanwhile (it is back): its word wins.
    (void)workspaces_->update(key, ws.SerializeAsString(), (*entry)->revision);
    if (!ws.lease_id().empty()) release_gpus(ws.workspace_id(), ws.lease_id());
  }

  // Whatever GPUs are still leased on the node go back to the broker.
  if (auto it = leases_.find(node); it != leases_.end()) {
    const auto leases = it->second;  // release_gpus may run watch handlers later, not now
    for (const auto& l : leases) release_gpus(l.workspace_id(), l.lease_id());
  }
  // And the schedulers' holds on it.
  if (auto st = capacity_->erase(node); !st) {
    spdlog::warn("cannot drop the capacity holds of {}: {}", node, st.error().message);
  }
  meters_->nodes_lost.Increment();
  ++counts_.nodes_lost;
  ack(msg);
}

void SchedulerService::handle_transition(const cvm::v1::BuildRequest& req,
                                         const bus::JsMessagePtr& msg) {
  auto record = workspaces_->get(req.workspace_id());
  if (!record) return retry_later(msg, "cannot read cvm_workspaces: " + record.error().message);
  cvm::v1::WorkspaceRecord ws;
  if (!record->has_value() || !ws.ParseFromString((*record)->value) || ws.node_id().empty()) {
    return fail(req, cvm::v1::WORKSPACE_NOT_FOUND,
                "workspace " + req.workspace_id() + " is not known to any node", msg);
  }
  cvm::v1::NodeAssignment a;
  *a.mutable_request() = req;
  a.set_node_id(ws.node_id());
  a.set_assigned_unix_ms(clock_.now_unix_ms());
  a.set_lease_id(ws.lease_id());
  if (auto st = publish_assignment(a, false); !st) {
    return retry_later(msg, "cannot publish the assignment: " + st.error().message);
  }
  if (auto st = publish_scheduled(a, ""); !st) {
    return retry_later(msg, "cannot publish SCHEDULED: " + st.error().message);
  }
  meters_->scheduled.Increment();
  ++counts_.scheduled;
  spdlog::info("build {} ({} workspace {}) sent to {}", req.build_id(),
               cvm::v1::Transition_Name(req.transition()), req.workspace_id(), ws.node_id());
  ack(msg);
}

void SchedulerService::fail(const cvm::v1::BuildRequest& req, cvm::v1::Reason reason,
                            const std::string& message, const bus::JsMessagePtr& msg) {
  auto e =
      service::make_event(req.build_id(), req.workspace_id(), cvm::v1::FAILED, clock_, kSource);
  e.set_reason(reason);
  e.set_message(message.empty() ? std::string(reason_text(reason)) : message);
  if (auto ack = service::publish_event(*conn_, e); !ack) {
    return retry_later(msg, "cannot publish FAILED: " + ack.error().message);
  }
  meters_->failed.Increment();
  meters_->failed_reason(reason).Increment();
  ++counts_.failed;
  spdlog::info("build {} (workspace {}) FAILED {}: {}", req.build_id(), req.workspace_id(),
               cvm::v1::Reason_Name(reason), e.message());
  ack(msg);
}

void SchedulerService::retry_later(const bus::JsMessagePtr& msg, const std::string& why) {
  meters_->retried.Increment();
  spdlog::warn("will retry stream seq {} (delivery {}): {}", msg->stream_sequence(),
               msg->num_delivered(), why);
  if (auto st = msg->nak(config_.retry_delay); !st) {
    // Without the nak the ack wait expires and the server redelivers anyway.
    spdlog::warn("nak failed: {}", st.error().message);
  }
}

void SchedulerService::ack(const bus::JsMessagePtr& msg) {
  if (auto st = msg->ack(); !st) spdlog::warn("ack failed: {}", st.error().message);
}

// ---------------------------------------------------------------------------------------------
// Capacity holds (KV cvm_capacity, compare-and-set)

SchedulerService::HoldOutcome SchedulerService::hold_capacity(const std::string& node_id,
                                                              const std::string& build_id,
                                                              const Reservation& amount) {
  const NodeRecord* node = index_.find(node_id);
  if (node == nullptr) return HoldOutcome::kNoRoom;
  cvm::v1::CapacityHold hold;
  hold.set_build_id(build_id);
  hold.set_cpu_millicores(amount.cpu_millicores);
  hold.set_memory_bytes(amount.memory_bytes);
  hold.set_gpus(amount.gpus);
  for (int attempt = 0; attempt < config_.cas_attempts; ++attempt) {
    const int64_t now = clock_.now_unix_ms();
    hold.set_expires_unix_ms(now + config_.reservation_hold.count());
    CachedLedger& cached = ledgers_[node_id];
    cvm::v1::CapacityLedger next = cached.ledger;
    next.set_node_id(node_id);
    switch (add_hold(next, *node, hold, now)) {
      case HoldResult::kNoRoom:
        return HoldOutcome::kNoRoom;
      case HoldResult::kAlreadyHeld:
        return HoldOutcome::kHeld;
      case HoldResult::kAdded:
        break;
    }
    const std::string bytes = next.SerializeAsString();
    auto rev = cached.revision == 0 ? capacity_->create(node_id, bytes)
                                    : capacity_->update(node_id, bytes, cached.revision);
    if (rev) {
      cached.ledger = std::move(next);
      cached.revision = *rev;
      apply_holds(node_id);
      return HoldOutcome::kHeld;
    }
    if (!rev.error().is_conflict()) {
      spdlog::warn("capacity hold on {} not written: {}", node_id, rev.error().message);
      return HoldOutcome::kError;
    }
    // Another replica changed the ledger since we read it: read the current one and decide again.
    meters_->conflicts.Increment();
    ++counts_.cas_conflicts;
    auto current = capacity_->get(node_id);
    if (!current) return HoldOutcome::kError;
    if (current->has_value()) {
      cvm::v1::CapacityLedger l;
      if (!l.ParseFromString((*current)->value)) l.Clear();
      cached.ledger = std::move(l);
      cached.revision = (*current)->revision;
    } else {
      // Deleted (a lost node's holds were dropped): the next write creates the key again.
      cached.ledger.Clear();
      cached.revision = 0;
    }
    apply_holds(node_id);
  }
  return HoldOutcome::kNoRoom;
}

void SchedulerService::drop_hold(const std::string& node_id, const std::string& build_id) {
  for (int attempt = 0; attempt < config_.cas_attempts; ++attempt) {
    auto it = ledgers_.find(node_id);
    if (it == ledgers_.end() || it->second.revision == 0) return;
    cvm::v1::CapacityLedger next = it->second.ledger;
    if (!remove_hold(next, build_id, clock_.now_unix_ms())) return;
    auto rev = capacity_->update(node_id, next.SerializeAsString(), it->second.revision);
    if (rev) {
      it->second.ledger = std::move(next);
      it->second.revision = *rev;
      apply_holds(node_id);
      return;
    }
    if (!rev.error().is_conflict()) break;
    auto current = capacity_->get(node_id);
    if (!current || !current->has_value()) return;
    if (!it->second.ledger.ParseFromString((*current)->value)) return;
    it->second.revision = (*current)->revision;
  }
  // Not fatal: the hold expires by itself after reservation_hold.
  spdlog::warn("capacity hold of build {} on {} left to expire", build_id, node_id);
}

void SchedulerService::apply_holds(const std::string& node_id) {
  const std::string id = ledger_reservation(node_id);
  index_.release(id);
  auto it = ledgers_.find(node_id);
  if (it == ledgers_.end()) return;
  const Reservation total = held(it->second.ledger, clock_.now_unix_ms());
  if (total.cpu_millicores > 0 || total.memory_bytes > 0 || total.gpus > 0) {
    index_.reserve(id, node_id, total);
  }
}

void SchedulerService::release_gpus(const std::string& workspace_id, const std::string& lease_id) {
  cvm::v1::GpuReleaseRequest rel;
  rel.set_workspace_id(workspace_id);
  rel.set_lease_id(lease_id);
  auto reply = conn_->request(std::string(wire::kGpuRelease), rel.SerializeAsString(),
                              config_.gpu_reserve_timeout);
  if (!reply) {
    // The broker's reconcile reclaims leases of workspaces that no longer run (issue 5).
    spdlog::warn("GPU lease {} of {} not released now: {}", lease_id, workspace_id,
                 reply.error().message);
  }
}

// ---------------------------------------------------------------------------------------------
// Watches and the sweep

void SchedulerService::on_node(const std::optional<bus::KvEntry>& entry) {
  if (!entry) {
    nodes_loaded_ = true;
    spdlog::info("node index loaded: {} nodes", index_.size());
    return;
  }
  if (entry->op != bus::KvOp::kPut) {
    index_.remove(entry->key);
    liveness_.forget(entry->key);
  } else {
    cvm::v1::NodeStatus status;
    if (!status.ParseFromString(entry->value) || status.node_id() != entry->key) {
      spdlog::warn("ignoring unreadable NodeStatus under key {}", entry->key);
      return;
    }
    const bool known = index_.find(status.node_id()) != nullptr;
    index_.upsert(status, entry->revision);
    liveness_.observe(status.node_id(), status.heartbeat_unix_ms());
    // Holds read before the node registered could not be applied then.
    if (!known && ledgers_.contains(status.node_id())) apply_holds(status.node_id());
  }
  meters_->nodes.Set(static_cast<double>(index_.size()));
}

void SchedulerService::on_settings(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  if (entry->op != bus::KvOp::kPut) {
    settings_.reset();
    spdlog::info("infrastructure settings removed; using the defaults");
    return;
  }
  cvm::v1::InfrastructureSettings s;
  if (!s.ParseFromString(entry->value)) {
    spdlog::warn("ignoring unreadable infrastructure settings (revision {})", entry->revision);
    return;
  }
  settings_ = std::move(s);
  spdlog::info("infrastructure settings revision {} in force from the next build", entry->revision);
}

void SchedulerService::on_lease(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  const auto dot = entry->key.find('.');
  if (dot == std::string::npos) return;
  // Keys are "<node>.<uuid>" with '.' removed from both parts (see broker lease_key).
  const std::string node = entry->key.substr(0, dot);
  const std::string uuid = entry->key.substr(dot + 1);
  const bool leased = entry->op == bus::KvOp::kPut;
  index_.set_gpu_leased(node, uuid, leased);
  auto& list = leases_[node];
  std::erase_if(list, [&](const cvm::v1::GpuLease& l) { return l.gpu_uuid() == uuid; });
  if (leased) {
    cvm::v1::GpuLease lease;
    if (lease.ParseFromString(entry->value)) {
      lease.set_gpu_uuid(uuid);
      list.push_back(std::move(lease));
    }
  }
  if (list.empty()) leases_.erase(node);
}

void SchedulerService::on_ledger(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  auto& cached = ledgers_[entry->key];
  // Our own writes update the cache before the watch echoes them; never go back to older state.
  if (entry->revision <= cached.revision) return;
  if (entry->op != bus::KvOp::kPut) {
    cached.ledger.Clear();
    cached.revision = 0;
  } else {
    cvm::v1::CapacityLedger l;
    if (!l.ParseFromString(entry->value)) {
      spdlog::warn("ignoring unreadable capacity ledger of {}", entry->key);
      return;
    }
    cached.ledger = std::move(l);
    cached.revision = entry->revision;
  }
  apply_holds(entry->key);
}

void SchedulerService::schedule_sweep() {
  if (stopped_) return;
  sweep_timer_.expires_after(config_.sweep_interval);
  sweep_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_) return;
    sweep();
    schedule_sweep();
  });
}

void SchedulerService::sweep() {
  const int64_t now = clock_.now_unix_ms();
  // Holds that expired since they were applied stop counting.
  for (auto& [node_id, cached] : ledgers_) {
    if (cached.ledger.holds_size() == 0) continue;
    if (prune_expired(cached.ledger, now) > 0) apply_holds(node_id);
  }
  if (!config_.detect_lost_nodes || !nodes_loaded_) return;
  for (const auto& lost : liveness_.sweep(now, config_.node_ttl.count())) {
    cvm::v1::NodeLostNotice notice;
    notice.set_node_id(lost.node_id);
    notice.set_last_heartbeat_unix_ms(lost.last_heartbeat_unix_ms);
    notice.set_detected_unix_ms(now);
    // Every replica sees the same expiry; the msg-id lets CVM_BUILDS keep one notice.
    auto pub = conn_->js_publish(
        std::string(wire::kBuildsSubmit), notice.SerializeAsString(),
        "lost." + lost.node_id + "." + std::to_string(lost.last_heartbeat_unix_ms),
        {{std::string(kHeaderNodeLost), lost.node_id}});
    if (!pub) {
      spdlog::warn("cannot queue the lost notice of {}: {}", lost.node_id, pub.error().message);
      liveness_.rearm(lost.node_id);  // the next sweep tries again
    }
  }
}

}  // namespace cvm::scheduler
