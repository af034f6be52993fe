#include "cvm/scheduler/scheduler_service.h"

#include <string>
#include <utility>

#include <spdlog/spdlog.h>

#include "cvm/base/reasons.h"
#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::scheduler {

namespace {
constexpr std::string_view kSource = "scheduler";
}

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
      meters_(std::make_unique<Meters>(metrics)) {}

SchedulerService::~SchedulerService() { stop(); }

Status SchedulerService::start() {
  if (auto st = service::ensure_streams(*conn_); !st) return st;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  auto settings = conn_->ensure_kv(service::settings_bucket());
  if (!settings) return settings.error();
  auto leases = conn_->ensure_kv(service::gpu_leases_bucket());
  if (!leases) return leases.error();
  auto workspaces = conn_->ensure_kv(service::workspaces_bucket());
  if (!workspaces) return workspaces.error();
  workspaces_ = std::move(*workspaces);

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

  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamBuilds);
  cc.durable = std::string(wire::kSchedulerDurable);
  cc.filter_subject = std::string(wire::kBuildsSubmit);
  cc.ack_wait = std::chrono::seconds(30);
  cc.max_deliver = config_.max_deliver;
  auto consumer = conn_->pull_consume(cc, [this](bus::JsMessagePtr m) { on_build(m); });
  if (!consumer) return consumer.error();
  consumer_ = std::move(*consumer);
  spdlog::info("scheduler consuming {} (durable {}), node TTL {} ms", wire::kStreamBuilds,
               wire::kSchedulerDurable, config_.node_ttl.count());
  return {};
}

void SchedulerService::stop() {
  consumer_.reset();
  nodes_watch_.reset();
  settings_watch_.reset();
  leases_watch_.reset();
}

void SchedulerService::on_build(const bus::JsMessagePtr& msg) {
  const auto started = std::chrono::steady_clock::now();
  meters_->received.Increment();
  const auto header_id = msg->header("Nats-Msg-Id");
  auto decoded = decode_build_request(
      msg->data(), header_id ? std::optional<std::string_view>(*header_id) : std::nullopt);
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
  if (already_handled(req.build_id())) {
    meters_->duplicate.Increment();
    spdlog::info("build {} was already handled; dropping the duplicate", req.build_id());
    (void)msg->ack();
    return;
  }
  if (req.transition() == cvm::v1::START) {
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

void SchedulerService::handle_start(const cvm::v1::BuildRequest& req,
                                    const bus::JsMessagePtr& msg) {
  const auto settings = effective_settings(settings_ ? &*settings_ : nullptr);
  const auto preq = make_placement_request(req, settings);
  PlacementOptions opts;
  opts.now_unix_ms = clock_.now_unix_ms();
  opts.liveness_ttl_ms = config_.node_ttl.count();
  opts.strategy = settings.scoring;
  opts.max_candidates = config_.max_candidates;
  opts.start_offset = decisions_++;
  const auto t0 = std::chrono::steady_clock::now();
  auto decision = place(index_, preq, opts);
  meters_->decision.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (!decision.ok()) return fail(req, decision.reason, decision.message, msg);

  std::optional<cvm::v1::GpuReserveReply> last_refusal;
  for (const auto& candidate : decision.candidates) {
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
      if (!reply) return retry_later(msg, "GPU broker: " + reply.error().message);
      cvm::v1::GpuReserveReply rr;
      if (!rr.ParseFromString(reply->data)) {
        return retry_later(msg, "GPU broker sent an unreadable reply");
      }
      if (!rr.ok()) {
        spdlog::info("build {}: broker refused node {}: {}", req.build_id(), candidate.node_id,
                     rr.message());
        last_refusal = std::move(rr);
        continue;  // the next candidate may have free GPUs
      }
      for (const auto& g : rr.gpus()) *a.add_gpus() = g;
      a.set_lease_id(rr.lease_id());
    }

    auto pub = conn_->js_publish(wire::node_work_subject(candidate.node_id), a.SerializeAsString(),
                                 req.build_id());
    if (!pub) {
      if (!a.lease_id().empty()) {
        cvm::v1::GpuReleaseRequest rel;
        rel.set_workspace_id(req.workspace_id());
        rel.set_lease_id(a.lease_id());
        (void)conn_->request(std::string(wire::kGpuRelease), rel.SerializeAsString(),
                             config_.gpu_reserve_timeout);
      }
      return retry_later(msg, "cannot publish the assignment: " + pub.error().message);
    }
    // GPUs are not held here: the broker's lease (seen through the cvm_gpu_leases watch) already
    // accounts for them, and holding them twice would refuse GPUs that are free.
    auto held = reservation_for(preq);
    held.gpus = 0;
    hold_reservation(req.build_id(), candidate.node_id, held);

    auto e = service::make_event(req.build_id(), req.workspace_id(), cvm::v1::SCHEDULED, clock_,
                                 kSource);
    e.set_node_id(candidate.node_id);
    for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
    if (!preq.cvm) e.add_warnings("runs as a plain container (not a CVM): no Docker inside");
    if (auto ev = service::publish_event(*conn_, e); !ev) {
      // The assignment is out (and deduplicated by build id): redelivery will publish the event.
      return retry_later(msg, "cannot publish SCHEDULED: " + ev.error().message);
    }
    meters_->scheduled.Increment();
    spdlog::info("build {} (workspace {}) scheduled on {}{}", req.build_id(), req.workspace_id(),
                 candidate.node_id, pub->duplicate ? " (assignment was already published)" : "");
    if (auto st = msg->ack(); !st) spdlog::warn("ack failed: {}", st.error().message);
    return;
  }
  // Every candidate's GPUs were refused.
  fail(req, last_refusal ? last_refusal->reason() : cvm::v1::INSUFFICIENT_CAPACITY,
       last_refusal ? last_refusal->message() : "no candidate node had free GPUs", msg);
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
  auto pub = conn_->js_publish(wire::node_work_subject(ws.node_id()), a.SerializeAsString(),
                               req.build_id());
  if (!pub) return retry_later(msg, "cannot publish the assignment: " + pub.error().message);
  auto e =
      service::make_event(req.build_id(), req.workspace_id(), cvm::v1::SCHEDULED, clock_, kSource);
  e.set_node_id(ws.node_id());
  if (auto ev = service::publish_event(*conn_, e); !ev) {
    return retry_later(msg, "cannot publish SCHEDULED: " + ev.error().message);
  }
  meters_->scheduled.Increment();
  spdlog::info("build {} ({} workspace {}) sent to {}", req.build_id(),
               cvm::v1::Transition_Name(req.transition()), req.workspace_id(), ws.node_id());
  if (auto st = msg->ack(); !st) spdlog::warn("ack failed: {}", st.error().message);
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
  spdlog::info("build {} (workspace {}) FAILED {}: {}", req.build_id(), req.workspace_id(),
               cvm::v1::Reason_Name(reason), e.message());
  if (auto st = msg->ack(); !st) spdlog::warn("ack failed: {}", st.error().message);
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

void SchedulerService::hold_reservation(const std::string& build_id, const std::string& node_id,
                                        const Reservation& amount) {
  if (!index_.reserve(build_id, node_id, amount)) return;
  auto timer = std::make_shared<boost::asio::steady_timer>(io_, config_.reservation_hold);
  timer->async_wait([this, timer, build_id](const boost::system::error_code& ec) {
    if (!ec) index_.release(build_id);
  });
}

void SchedulerService::on_node(const std::optional<bus::KvEntry>& entry) {
  if (!entry) {
    spdlog::info("node index loaded: {} nodes", index_.size());
    return;
  }
  if (entry->op != bus::KvOp::kPut) {
    index_.remove(entry->key);
  } else {
    cvm::v1::NodeStatus status;
    if (!status.ParseFromString(entry->value) || status.node_id() != entry->key) {
      spdlog::warn("ignoring unreadable NodeStatus under key {}", entry->key);
      return;
    }
    index_.upsert(status, entry->revision);
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
  index_.set_gpu_leased(std::string_view(entry->key).substr(0, dot),
                        std::string_view(entry->key).substr(dot + 1), entry->op == bus::KvOp::kPut);
}

}  // namespace cvm::scheduler
