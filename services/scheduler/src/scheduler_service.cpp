#include "cvm/scheduler/scheduler_service.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <utility>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include "cvm/base/reasons.h"
#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/scheduler/ledger.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"

namespace cvm::scheduler {

namespace {

constexpr std::string_view kSource = "scheduler";
// Decisions for one delivery of a request whose candidates were all taken by concurrent
// placements, before it goes back to the stream for a later retry.
constexpr int kMaxDecisions = 8;

std::string record_key(std::string_view node_id, std::string_view build_id) {
  return std::string(node_id) + "." + std::string(build_id);
}

// Reservation ids in the NodeIndex for the holds read from a node's ledger.
std::string ledger_reservation(std::string_view node_id) {
  return "ledger/" + std::string(node_id);
}

int64_t unix_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
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
        given_up(m.counter("cvm_scheduler_builds_given_up_total",
                           "Build requests terminated on their last delivery (dead letters)")),
        moved(m.counter("cvm_scheduler_moved_no_room_total",
                        "Recorded placements placed afresh: their node had no room left when "
                        "the redelivery came")),
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
  prometheus::Counter& given_up;
  prometheus::Counter& moved;
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
  // Where the server's advisories about requests given up on are kept (give_up).
  if (auto st = conn_->ensure_stream(service::dead_letters_stream()); !st) return st;
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
  // A handle of its own: `nodes` serves the watch below.
  auto nodes_reader = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes_reader) return nodes_reader.error();
  nodes_kv_.emplace(std::move(*nodes_reader));

  auto nw = nodes->watch(">", [this](std::optional<bus::KvEntry> e) {
    nodes_seen_ = std::chrono::steady_clock::now();
    on_node(e);
  });
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
  auto ww = workspaces_->watch(">", [this](std::optional<bus::KvEntry> e) { on_workspace(e); });
  if (!ww) return ww.error();
  workspaces_watch_ = std::move(*ww);

  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamBuilds);
  cc.durable = std::string(wire::kSchedulerDurable);
  cc.filter_subject = std::string(wire::kBuildsSubmit);
  cc.ack_wait = std::chrono::seconds(30);
  cc.max_deliver = config_.max_deliver;
  auto consumer = conn_->pull_consume(cc, [this](bus::JsMessagePtr m) { on_build(m); });
  if (!consumer) return consumer.error();
  consumer_ = std::move(*consumer);
  lost_lane_work_.emplace(lost_lane_.get_executor());
  lost_lane_thread_ = std::thread([this] { lost_lane_.run(); });
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
  workspaces_watch_.reset();
  // A sweep in progress finishes its current bus call (each is bounded by its timeout); what it
  // posts back finds the service gone (guarded) and its notice is redelivered to a replica.
  lost_lane_work_.reset();
  lost_lane_.stop();
  if (lost_lane_thread_.joinable()) lost_lane_thread_.join();
}

// ---------------------------------------------------------------------------------------------
// Requests

template <class Fn>
auto SchedulerService::guarded(Fn fn) {
  return [alive = std::weak_ptr<int>(alive_), fn = std::move(fn)](auto&&... args) mutable {
    if (alive.expired()) return;
    fn(std::forward<decltype(args)>(args)...);
  };
}

void SchedulerService::on_build(const bus::JsMessagePtr& msg) {
  if (in_flight_ >= config_.max_in_flight) {
    waiting_.push_back(msg);
    return;
  }
  ++in_flight_;
  went_async_ = false;
  handle_build(msg);
  // The synchronous paths (node lost, transitions, redeliveries, invalid requests) are done here.
  if (!went_async_) --in_flight_;
}

void SchedulerService::pump() {
  pump_posted_ = false;
  while (!stopped_ && in_flight_ < config_.max_in_flight && !waiting_.empty()) {
    auto msg = std::move(waiting_.front());
    waiting_.pop_front();
    on_build(msg);
  }
}

void SchedulerService::handle_build(const bus::JsMessagePtr& msg) {
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
  } else if (req.transition() == cvm::v1::START && msg->num_delivered() > 1) {
    handle_redelivered_start(req, msg);
  } else if (req.transition() == cvm::v1::START) {
    // The common case, pipelined: the duplicate lookup runs alongside the first capacity hold.
    return place_and_dispatch(req, msg, "", /*check_duplicate=*/true);
  } else if (already_handled(req.build_id())) {
    meters_->duplicate.Increment();
    spdlog::info("build {} was already handled; dropping the duplicate", req.build_id());
    ack(msg);
  } else {
    handle_transition(req, msg);
  }
  if (!went_async_) {
    meters_->handling.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
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

void SchedulerService::handle_redelivered_start(const cvm::v1::BuildRequest& req,
                                                const bus::JsMessagePtr& msg) {
  // A previous delivery may have got as far as recording (and even sending) the assignment
  // before it crashed or timed out: finish on that node rather than deciding again, which could
  // name a different node than the one the deduplicated assignment went to. The record comes
  // before the event lookup: SCHEDULED may be stored while the assignment sent with it is not.
  auto record = find_record(req.build_id());
  if (!record) return retry_later(msg, "cannot read placement records: " + record.error().message);
  std::optional<cvm::v1::Phase> last;
  if (!record->has_value()) {
    // When the lookup itself fails, go on as for a new build: every step carries a Nats-Msg-Id.
    if (auto phase = last_phase(req.build_id()); phase.ok()) last = *phase;
  }
  switch (redelivered_start_action(record->has_value(), last)) {
    case RedeliveredStart::kFinishRecorded:
      return finish_recorded(**record, msg);
    case RedeliveredStart::kRetryLater:
      // Dropping it as a duplicate would lose the build: SCHEDULED, its assignment never sent.
      return retry_later(msg, "build " + req.build_id() + " is " + cvm::v1::Phase_Name(*last) +
                                  " but its placement record cannot be read (yet)");
    case RedeliveredStart::kDropDuplicate:
      meters_->duplicate.Increment();
      ++counts_.duplicates;
      spdlog::info("build {} was already handled ({}); dropping the duplicate", req.build_id(),
                   cvm::v1::Phase_Name(*last));
      return ack(msg);
    case RedeliveredStart::kPlace:
      break;
  }
  place_and_dispatch(req, msg, "");
}

// One request on its way through the pipeline; shared by the completions of its bus calls.
struct SchedulerService::Placement {
  bus::JsMessagePtr msg;
  cvm::v1::BuildRequest req;
  // The node the build moves off: lost, or (no_room) the recorded node that had no room left when
  // a redelivery came to finish the placement there.
  std::string lost_node;
  bool no_room = false;
  std::chrono::steady_clock::time_point started;
  EffectiveSettings settings;
  PlacementRequest preq;
  Reservation amount;
  std::vector<Candidate> candidates;
  size_t next = 0;
  bool contended = false;
  int decisions = 1;
  std::optional<cvm::v1::GpuReserveReply> last_refusal;
  // The duplicate lookup (a resubmitted build that was decided already): nothing is published
  // before it is in.
  bool lookup_pending = false;
  bool duplicate = false;
  // The build's last event is SCHEDULED: an earlier delivery may have stopped before its
  // assignment went out. A nats-server killed with -9 can forget the consumer's delivery counts,
  // so that delivery comes back as a first one (docs/reliability.md, "Forgotten delivery counts").
  // Finished from the record, never dropped.
  bool unfinished = false;
  std::function<void()> after_lookup;
  std::string node_id;  // the candidate holding room
  cvm::v1::NodeAssignment assignment;
  int publishes_left = 0;
  std::string publish_error;
  int64_t t_executing = 0, t_held = 0, t_looked_up = 0, t_recorded = 0;  // unix ns (trace_stages)
};

// A placement moving off a node fails with NODE_LOST when that node was lost, else with `reason`.
cvm::v1::Reason SchedulerService::moved_reason(const Placement& p, cvm::v1::Reason reason) {
  return p.lost_node.empty() || p.no_room ? reason : cvm::v1::NODE_LOST;
}

std::string SchedulerService::moved_prefix(const Placement& p) {
  if (p.lost_node.empty()) return "";
  if (p.no_room) {
    return "node " + p.lost_node +
           " had no room left for it after a scheduler restart and it could not be placed "
           "elsewhere: ";
  }
  return "node " + p.lost_node + " was lost and it could not be placed again: ";
}

void SchedulerService::place_and_dispatch(const cvm::v1::BuildRequest& req,
                                          const bus::JsMessagePtr& msg,
                                          const std::string& lost_node, bool check_duplicate) {
  went_async_ = true;
  auto p = std::make_shared<Placement>();
  p->msg = msg;
  p->req = req;
  p->lost_node = lost_node;
  p->started = std::chrono::steady_clock::now();
  if (config_.trace_stages) p->t_executing = unix_ns();
  if (check_duplicate) {
    p->lookup_pending = true;
    conn_->last_message_async(std::string(wire::kStreamEvents),
                              wire::build_events_subject(req.build_id()), config_.bus_timeout,
                              guarded([p](Result<std::optional<bus::StreamMessage>> last) {
                                // When the lookup itself fails, go on: every event carries a
                                // Nats-Msg-Id, so a repeated step cannot publish a second copy of
                                // the same phase.
                                p->lookup_pending = false;
                                p->t_looked_up = unix_ns();
                                p->duplicate = last.ok() && last->has_value();
                                if (p->duplicate) {
                                  cvm::v1::BuildEvent e;
                                  p->unfinished = e.ParseFromString((*last)->message.data) &&
                                                  e.phase() == cvm::v1::SCHEDULED;
                                }
                                if (auto fn = std::exchange(p->after_lookup, nullptr)) fn();
                              }));
  }
  p->settings = effective_settings(settings_ ? &*settings_ : nullptr);
  p->preq = make_placement_request(req, p->settings);
  p->amount = reservation_for(p->preq);
  // GPUs are not held in the ledger: the broker's lease ledger (CAS per GPU) is their authority
  // and the cvm_gpu_leases watch already counts them in the index.
  p->amount.gpus = 0;
  decide(p);
}

void SchedulerService::decide(const PlacementPtr& p) {
  PlacementOptions opts;
  opts.now_unix_ms = clock_.now_unix_ms();
  opts.liveness_ttl_ms = config_.node_ttl.count();
  opts.strategy = p->settings.scoring;
  opts.max_candidates = config_.max_candidates;
  opts.sampling = config_.sampling;
  opts.sample_percent = config_.sample_percent;
  opts.start_offset = decisions_++;
  const auto t0 = std::chrono::steady_clock::now();
  auto decision = place(index_, p->preq, opts);
  meters_->decision.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (!decision.ok()) {
    if (decision.stats.rejected[static_cast<size_t>(Filter::kNodeLive)] > 0 && node_view_stale()) {
      // Nodes look dead because this replica has heard nothing from the watch: try again later
      // rather than fail the build on a view that may be blind (docs/reliability.md, "Silent node
      // watch").
      const std::string why = "node watch silent; not failing on it: " + decision.message;
      return when_looked_up(p, [this, p, why] {
        if (p->duplicate) return drop_duplicate(p);
        retry_later(p->msg, why);
        done(p);
      });
    }
    return fail_placement(p, moved_reason(*p, decision.reason),
                          moved_prefix(*p) + decision.message);
  }
  p->candidates = std::move(decision.candidates);
  p->next = 0;
  p->contended = false;
  try_candidate(p);
}

void SchedulerService::when_looked_up(const PlacementPtr& p, std::function<void()> fn) {
  if (p->lookup_pending) {
    p->after_lookup = std::move(fn);
  } else {
    fn();
  }
}

void SchedulerService::try_candidate(const PlacementPtr& p) {
  while (p->next < p->candidates.size() && p->candidates[p->next].node_id == p->lost_node) {
    ++p->next;
  }
  if (p->next >= p->candidates.size()) {
    const std::string prefix = moved_prefix(*p);
    if (p->last_refusal) {
      return fail_placement(p, moved_reason(*p, p->last_refusal->reason()),
                            prefix + p->last_refusal->message());
    }
    if (p->contended && p->decisions < kMaxDecisions) {
      // Every candidate filled up under us (other replicas, or this one's requests in flight,
      // placed there first). The index has learned their holds, so deciding again here and now is
      // not the same decision, and far quicker than handing the request back to the stream.
      ++p->decisions;
      return decide(p);
    }
    if (p->contended) {
      return when_looked_up(p, [this, p] {
        if (p->duplicate) return drop_duplicate(p);
        retry_later(p->msg, "every candidate was taken by concurrent placements");
        done(p);
      });
    }
    return fail_placement(p, moved_reason(*p, cvm::v1::INSUFFICIENT_CAPACITY),
                          prefix + "no candidate node could take it");
  }
  const std::string node_id = p->candidates[p->next++].node_id;
  PendingHold hold;
  hold.build_id = p->req.build_id();
  hold.amount = p->amount;
  hold.done = [this, p, node_id](HoldOutcome o) { on_held(p, node_id, o); };
  request_hold(node_id, std::move(hold));
}

void SchedulerService::on_held(const PlacementPtr& p, const std::string& node_id,
                               HoldOutcome outcome) {
  switch (outcome) {
    case HoldOutcome::kNoRoom:
      p->contended = true;
      return try_candidate(p);  // another request took the room first: the next may have it
    case HoldOutcome::kError:
      return when_looked_up(p, [this, p, node_id] {
        if (p->duplicate) return drop_duplicate(p);
        retry_later(p->msg, "cannot write the capacity hold on " + node_id);
        done(p);
      });
    case HoldOutcome::kHeld:
    case HoldOutcome::kAlreadyHeld:
      break;
  }
  p->node_id = node_id;
  if (config_.trace_stages) p->t_held = unix_ns();
  const bool ours = outcome == HoldOutcome::kHeld;
  when_looked_up(p, [this, p, ours] {
    if (p->duplicate) {
      // The first delivery's hold stays: it covers that placement until its agent reports it.
      if (ours) drop_hold(p->node_id, p->req.build_id());
      return drop_duplicate(p);
    }
    reserve_gpus(p);
  });
}

void SchedulerService::reserve_gpus(const PlacementPtr& p) {
  const auto& req = p->req;
  auto& a = p->assignment;
  a.Clear();
  *a.mutable_request() = req;
  a.set_node_id(p->node_id);
  a.set_cvm(p->preq.cvm);
  a.set_caching(p->settings.caching);
  a.set_auto_load_shiftfs(p->settings.auto_load_shiftfs);
  a.set_assigned_unix_ms(clock_.now_unix_ms());
  if (p->preq.gpu_count == 0) return write_record(p);

  cvm::v1::GpuReserveRequest gr;
  gr.set_node_id(p->node_id);
  gr.set_count(p->preq.gpu_count);
  gr.set_min_memory_bytes(p->preq.gpu_min_memory_bytes);
  gr.set_workspace_id(req.workspace_id());
  gr.set_build_id(req.build_id());
  gr.set_vendor(p->preq.gpu_vendor);
  conn_->request_async(std::string(wire::kGpuReserve), gr.SerializeAsString(),
                       config_.gpu_reserve_timeout, guarded([this, p](Result<bus::Message> reply) {
                         if (!reply) {
                           drop_hold(p->node_id, p->req.build_id());
                           retry_later(p->msg, "GPU broker: " + reply.error().message);
                           return done(p);
                         }
                         cvm::v1::GpuReserveReply rr;
                         if (!rr.ParseFromString(reply->data)) {
                           drop_hold(p->node_id, p->req.build_id());
                           retry_later(p->msg, "GPU broker sent an unreadable reply");
                           return done(p);
                         }
                         if (!rr.ok()) {
                           spdlog::info("build {}: broker refused node {}: {}", p->req.build_id(),
                                        p->node_id, rr.message());
                           drop_hold(p->node_id, p->req.build_id());
                           p->last_refusal = std::move(rr);
                           return try_candidate(p);  // the next candidate may have free GPUs
                         }
                         for (const auto& g : rr.gpus()) *p->assignment.add_gpus() = g;
                         p->assignment.set_lease_id(rr.lease_id());
                         write_record(p);
                       }));
}

void SchedulerService::write_record(const PlacementPtr& p) {
  cvm::v1::PlacementRecord record;
  *record.mutable_assignment() = p->assignment;
  record.set_replaced_node_id(p->lost_node);
  std::string bytes = record.SerializeAsString();
  // A create (revision 0 expected): a conflict means a previous delivery recorded this very
  // placement already.
  placements_->update_async(
      record_key(p->node_id, p->req.build_id()), bytes, 0,
      guarded([this, p, bytes](Result<uint64_t> created) {
        if (!created && !created.error().is_conflict()) {
          // Without the record a redelivery could not tell where this went: send nothing yet.
          drop_hold(p->node_id, p->req.build_id());
          if (!p->assignment.lease_id().empty()) {
            release_gpus(p->req.workspace_id(), p->assignment.lease_id());
          }
          retry_later(p->msg, "cannot record the placement: " + created.error().message);
          return done(p);
        }
        if (!p->lost_node.empty()) {
          // The lost node's record now names the new node: a lookup by build sees where it
          // went, and the lost node's next sweep skips it.
          (void)placements_->put(record_key(p->lost_node, p->req.build_id()), bytes);
        }
        if (config_.trace_stages) p->t_recorded = unix_ns();
        dispatch(p);
      }),
      config_.bus_timeout);
}

void SchedulerService::dispatch(const PlacementPtr& p) {
  // Both at once: the record is stored, so a redelivery after a crash between them finds it and
  // sends whichever is missing (handle_redelivered_start).
  p->publishes_left = 2;
  auto one_done = [this, p](Status st) {
    if (!st && p->publish_error.empty()) p->publish_error = st.error().message;
    if (--p->publishes_left > 0) return;
    if (!p->publish_error.empty()) {
      retry_later(p->msg, "cannot publish the assignment or SCHEDULED: " + p->publish_error);
      return done(p);
    }
    meters_->scheduled.Increment();
    ++counts_.scheduled;
    if (config_.trace_stages && p->msg->num_delivered() == 1 && p->lost_node.empty()) {
      stages_.push_back({p->msg->stored_unix_ns(), p->msg->fetched_unix_ns(), p->t_executing,
                         p->t_held, std::max(p->t_looked_up, p->t_held), p->t_recorded, unix_ns()});
    }
    if (p->no_room) {
      meters_->moved.Increment();
      ++counts_.moved_no_room;
    } else if (!p->lost_node.empty()) {
      meters_->placed_again.Increment();
      ++counts_.placed_again;
    }
    if (auto st = p->msg->ack_async(); !st) spdlog::warn("ack failed: {}", st.error().message);
    done(p);
  };
  publish_assignment_async(p->assignment, !p->lost_node.empty(), one_done);
  publish_scheduled_async(p->assignment, p->lost_node, p->no_room, one_done);
}

void SchedulerService::fail_placement(const PlacementPtr& p, cvm::v1::Reason reason,
                                      const std::string& message) {
  when_looked_up(p, [this, p, reason, message] {
    if (p->duplicate) return drop_duplicate(p);
    auto e = service::make_event(p->req.build_id(), p->req.workspace_id(), cvm::v1::FAILED, clock_,
                                 kSource);
    e.set_reason(reason);
    e.set_message(message.empty() ? std::string(reason_text(reason)) : message);
    bus::AsyncPublish opts;
    opts.msg_id = service::event_msg_id(e);
    opts.timeout = config_.bus_timeout;
    conn_->js_publish_async(wire::build_events_subject(e.build_id()), e.SerializeAsString(), opts,
                            guarded([this, p, reason](Result<bus::PubAck> ack) {
                              if (!ack) {
                                retry_later(p->msg,
                                            "cannot publish FAILED: " + ack.error().message);
                                return done(p);
                              }
                              meters_->failed.Increment();
                              meters_->failed_reason(reason).Increment();
                              ++counts_.failed;
                              spdlog::debug("build {} (workspace {}) FAILED {}", p->req.build_id(),
                                            p->req.workspace_id(), cvm::v1::Reason_Name(reason));
                              if (auto st = p->msg->ack_async(); !st)
                                spdlog::warn("ack failed: {}", st.error().message);
                              done(p);
                            }));
  });
}

void SchedulerService::drop_duplicate(const PlacementPtr& p) {
  if (p->unfinished) return finish_as_redelivery(p);
  meters_->duplicate.Increment();
  ++counts_.duplicates;
  spdlog::info("build {} was already handled; dropping the duplicate", p->req.build_id());
  ack(p->msg);
  done(p);
}

void SchedulerService::finish_as_redelivery(const PlacementPtr& p) {
  // As a redelivery: the record says where it went and the assignment is sent again (its msg-id
  // drops a copy that was stored), or, with no record yet, the request is retried
  // (redelivered_start_action). That path may hand the request to a placement of its own, which
  // then holds this request's in-flight slot: releasing it here as well would count one request
  // out twice (the first try at this fix did, and the unsigned count wrapped and stalled the
  // consumer).
  spdlog::info("build {} is SCHEDULED but not further; finishing it as a redelivery",
               p->req.build_id());
  const bool outer = std::exchange(went_async_, false);
  handle_redelivered_start(p->req, p->msg);
  const bool handed_on = std::exchange(went_async_, outer);
  done(p, /*release_slot=*/!handed_on);
}

void SchedulerService::done(const PlacementPtr& p, bool release_slot) {
  meters_->handling.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - p->started).count());
  if (!release_slot) return;
  if (in_flight_ == 0) {
    // A bug, never a reason to stop consuming: a wrapped count would refuse every request.
    spdlog::error("scheduler: in-flight count would go below zero; keeping it at zero");
  } else {
    --in_flight_;
  }
  if (!waiting_.empty() && !pump_posted_) {
    // Posted, not called: a completion must not run the next request's whole chain inside it.
    pump_posted_ = true;
    boost::asio::post(io_, guarded([this] { pump(); }));
  }
}

void SchedulerService::finish_recorded(const cvm::v1::PlacementRecord& record,
                                       const bus::JsMessagePtr& msg) {
  const auto& a = record.assignment();
  const bool again = !record.replaced_node_id().empty();
  // The assignment and SCHEDULED went out together: either may be missing. An event beyond
  // SCHEDULED means the node has the assignment, so nothing is sent again; SCHEDULED alone still
  // sends the assignment (its msg-id drops it if it was stored). A placement made again after a
  // lost node has events of its first node, so it sends both (each with its own msg-id).
  std::optional<cvm::v1::Phase> phase;
  if (!again) {
    auto last = last_phase(a.request().build_id());
    if (!last) return retry_later(msg, "cannot read the build's events: " + last.error().message);
    phase = *last;
  }
  if (phase && *phase != cvm::v1::SCHEDULED) {
    meters_->from_record.Increment();
    ++counts_.finished_from_record;
    spdlog::info("build {} was already placed on {} and its node reported it",
                 a.request().build_id(), a.node_id());
    return ack(msg);
  }
  // The assignment may go out now. The previous delivery's capacity hold may have expired by now
  // (it lasts reservation_hold, as long as the ack wait that brought this redelivery) and the room
  // been given to others: hold it again first, by compare-and-set like any placement. The hold is
  // per build, so one still in place is found (kAlreadyHeld) and kept.
  went_async_ = true;
  auto p = std::make_shared<Placement>();
  p->msg = msg;
  p->req = a.request();
  p->started = std::chrono::steady_clock::now();
  p->node_id = a.node_id();
  p->assignment = a;
  p->settings = effective_settings(settings_ ? &*settings_ : nullptr);
  p->preq = make_placement_request(p->req, p->settings);
  p->amount = reservation_for(p->preq);
  p->amount.gpus = 0;  // GPUs: the broker's lease, still held by the record's lease id
  PendingHold hold;
  hold.build_id = p->req.build_id();
  hold.amount = p->amount;
  hold.done = [this, p, phase, again, replaced = record.replaced_node_id()](HoldOutcome o) {
    switch (o) {
      case HoldOutcome::kError:
        retry_later(p->msg, "cannot write the capacity hold on " + p->node_id);
        return done(p);
      case HoldOutcome::kNoRoom:
        return move_recorded(p);
      case HoldOutcome::kHeld:
      case HoldOutcome::kAlreadyHeld:
        break;
    }
    meters_->from_record.Increment();
    ++counts_.finished_from_record;
    spdlog::info("build {} was already placed on {}; finishing that placement", p->req.build_id(),
                 p->node_id);
    if (auto st = publish_assignment(p->assignment, again); !st) {
      retry_later(p->msg, "cannot publish the assignment: " + st.error().message);
      return done(p);
    }
    if (!phase) {
      if (auto st = publish_scheduled(p->assignment, replaced); !st) {
        retry_later(p->msg, "cannot publish SCHEDULED: " + st.error().message);
        return done(p);
      }
    }
    ack(p->msg);
    done(p);
  };
  request_hold(p->node_id, std::move(hold));
}

void SchedulerService::move_recorded(const PlacementPtr& p) {
  // The recorded node filled up while the request waited for its redelivery. Sending the
  // assignment there would put the node over capacity; place the build afresh instead, as after a
  // lost node: another candidate, an assignment with its own msg-id (the first one's may be
  // stored), the old record rewritten to name the new node (so a late look at it, by this
  // scheduler or by the agent, sees where the build went) and a SCHEDULED that says why.
  const std::string from = p->node_id;
  spdlog::warn(
      "build {}: recorded node {} has no room left (its capacity hold expired before "
      "the redelivery); placing it afresh",
      p->req.build_id(), from);
  if (!p->assignment.lease_id().empty()) {
    release_gpus(p->req.workspace_id(), p->assignment.lease_id());
  }
  p->lost_node = from;
  p->no_room = true;
  p->node_id.clear();
  p->assignment.Clear();
  decide(p);
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

void SchedulerService::publish_assignment_async(const cvm::v1::NodeAssignment& a, bool placed_again,
                                                std::function<void(Status)> then) {
  bus::AsyncPublish opts;
  // Msg-ids as publish_assignment's.
  opts.msg_id =
      placed_again ? a.request().build_id() + ".on." + a.node_id() : a.request().build_id();
  opts.timeout = config_.bus_timeout;
  conn_->js_publish_async(wire::node_work_subject(a.node_id()), a.SerializeAsString(), opts,
                          guarded([then = std::move(then)](Result<bus::PubAck> ack) {
                            then(ack ? Status{} : Status(ack.error()));
                          }));
}

void SchedulerService::publish_scheduled_async(const cvm::v1::NodeAssignment& a,
                                               const std::string& lost_node, bool no_room,
                                               std::function<void(Status)> then) {
  const auto& req = a.request();
  auto e =
      service::make_event(req.build_id(), req.workspace_id(), cvm::v1::SCHEDULED, clock_, kSource);
  e.set_node_id(a.node_id());
  for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
  if (!a.cvm()) e.add_warnings("runs as a plain container (not a CVM): no Docker inside");
  bus::AsyncPublish opts;
  opts.msg_id = service::event_msg_id(e);
  opts.timeout = config_.bus_timeout;
  if (no_room) {
    e.set_reason(cvm::v1::INSUFFICIENT_CAPACITY);
    e.set_message("node " + lost_node +
                  " had no room left when a scheduler restart came to finish the placement there; "
                  "placed again on " +
                  a.node_id());
    opts.msg_id += "." + a.node_id();
  } else if (!lost_node.empty()) {
    e.set_reason(cvm::v1::NODE_LOST);
    e.set_message("node " + lost_node + " was lost before the workspace ran; placed again on " +
                  a.node_id());
    // A second SCHEDULED for the build: its own msg-id (as publish_scheduled's).
    opts.msg_id += "." + a.node_id();
  }
  conn_->js_publish_async(wire::build_events_subject(req.build_id()), e.SerializeAsString(), opts,
                          guarded([then = std::move(then)](Result<bus::PubAck> ack) {
                            then(ack ? Status{} : Status(ack.error()));
                          }));
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
  // The leases the cvm_gpu_leases watch knows on the node, taken here: leases_ is the executor's.
  std::vector<std::pair<std::string, std::string>> known;
  if (auto it = leases_.find(node); it != leases_.end()) {
    for (const auto& l : it->second) known.emplace_back(l.workspace_id(), l.lease_id());
  }
  const std::string tag = std::to_string(notice.last_heartbeat_unix_ms());
  boost::asio::post(lost_lane_, [this, msg, node, tag, known = std::move(known)]() mutable {
    auto swept = sweep_lost_node(node, tag);
    boost::asio::post(
        io_, guarded([this, msg, node, known = std::move(known), swept = std::move(swept)] {
          // Released even when the notice is retried: a release of what is released already is a
          // no-op at the broker.
          for (const auto& [workspace, lease] : swept.leases) release_gpus(workspace, lease);
          if (!swept.retry.empty()) return retry_later(msg, swept.retry);
          // Whatever GPUs are still leased on the node go back to the broker.
          for (const auto& [workspace, lease] : known) release_gpus(workspace, lease);
          meters_->nodes_lost.Increment();
          ++counts_.nodes_lost;
          ack(msg);
        }));
  });
}

SchedulerService::LostSweep SchedulerService::sweep_lost_node(const std::string& node,
                                                              const std::string& tag) {
  // Every step below is idempotent (msg-ids, CAS, releases of what is already released), so a
  // crash part-way is finished by the redelivery. Only thread-safe things are used here: the
  // bus, the buckets, the clock and the configuration.
  LostSweep out;
  auto keys = placements_->keys();
  if (!keys) {
    out.retry = "cannot list placement records: " + keys.error().message;
    return out;
  }
  const std::string prefix = node + ".";
  for (const auto& key : *keys) {
    if (!key.starts_with(prefix)) continue;
    auto entry = placements_->get(key);
    if (!entry) {
      out.retry = "cannot read " + key + ": " + entry.error().message;
      return out;
    }
    cvm::v1::PlacementRecord r;
    if (!entry->has_value() || !r.ParseFromString((*entry)->value)) continue;
    const auto& a = r.assignment();
    if (a.node_id() != node) continue;  // already placed again elsewhere
    auto phase = last_phase(a.request().build_id());
    if (!phase) {
      out.retry = "cannot read events: " + phase.error().message;
      return out;
    }
    if (lost_node_action(*phase) != LostAction::kPlaceAgain) continue;  // running: see below
    const auto& req = a.request();
    auto pub = conn_->js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(),
                                 req.build_id() + ".again." + node + "." + tag,
                                 {{std::string(kHeaderPlaceAgain), node}});
    if (!pub) {
      out.retry = "cannot queue build again: " + pub.error().message;
      return out;
    }
  }

  // Running workspaces: their records (written by the agent) say where they run. Mark them LOST
  // by compare-and-set, so the event is sent once even across replicas and restarts.
  auto ws_keys = workspaces_->keys();
  if (!ws_keys) {
    out.retry = "cannot list workspaces: " + ws_keys.error().message;
    return out;
  }
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
      out.retry = "cannot publish LOST: " + ev.error().message;
      return out;
    }
    ws.set_phase(cvm::v1::LOST);
    ws.set_reason(cvm::v1::NODE_LOST);
    ws.set_message(e.message());
    ws.set_updated_unix_ms(clock_.now_unix_ms());
    // A conflict means the agent wrote it meanwhile (it is back): its word wins.
    (void)workspaces_->update(key, ws.SerializeAsString(), (*entry)->revision);
    if (!ws.lease_id().empty()) out.leases.emplace_back(ws.workspace_id(), ws.lease_id());
  }

  // And the schedulers' holds on it.
  if (auto st = capacity_->erase(node); !st) {
    spdlog::warn("cannot drop the capacity holds of {}: {}", node, st.error().message);
  }
  return out;
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
  // An order goes only to a node that registered and is not lost: one for any other node would
  // wait for nobody while the workspace, wherever it really is, keeps running.
  if (index_.find(ws.node_id()) == nullptr) {
    // The node watch may not have delivered every node yet: the node's own report in KV decides.
    auto entry = nodes_kv_->get(ws.node_id());
    if (!entry) return retry_later(msg, "cannot read cvm_nodes: " + entry.error().message);
    cvm::v1::NodeStatus status;
    if (!entry->has_value() || !status.ParseFromString((*entry)->value) ||
        status.node_id() != ws.node_id()) {
      return fail(req, cvm::v1::WORKSPACE_NOT_FOUND,
                  "workspace " + req.workspace_id() + " is recorded on node " + ws.node_id() +
                      ", which has never registered (no NodeStatus in cvm_nodes)",
                  msg);
    }
    take_status(status, (*entry)->revision);
  }
  if (liveness_.is_lost(ws.node_id())) {
    return fail(req, cvm::v1::NODE_LOST,
                "workspace " + req.workspace_id() + " is on node " + ws.node_id() +
                    ", which is lost (no heartbeat): no agent would take the order",
                msg);
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

RedeliveredStart redelivered_start_action(bool has_record,
                                          std::optional<cvm::v1::Phase> last_phase) {
  if (has_record) return RedeliveredStart::kFinishRecorded;
  if (!last_phase) return RedeliveredStart::kPlace;
  // In a cluster: the record's stream had just elected a leader when the server holding it died,
  // and the new leader answered before it had applied the record.
  if (!is_terminal_phase(*last_phase)) return RedeliveredStart::kRetryLater;
  return RedeliveredStart::kDropDuplicate;
}

GiveUp give_up_action(bool has_build, std::optional<cvm::v1::Phase> last_phase, bool has_record,
                      bool place_again) {
  if (!has_build) return GiveUp::kTermOnly;
  if (last_phase && is_terminal_phase(*last_phase)) return GiveUp::kTermOnly;
  // A recorded START may have had its assignment stored: the node may still run it and send the
  // build's terminal event, so a FAILED here could be a second one. (A build placed again after a
  // lost node has a record too, but the lost node runs nothing: it fails like any placement.)
  if (has_record && !place_again) return GiveUp::kTermOnly;
  return GiveUp::kFailAndTerm;
}

void SchedulerService::retry_later(const bus::JsMessagePtr& msg, const std::string& why) {
  if (config_.max_deliver > 0 &&
      msg->num_delivered() >= static_cast<uint64_t>(config_.max_deliver)) {
    return give_up(msg, why);
  }
  meters_->retried.Increment();
  ++counts_.retried;
  spdlog::warn("will retry stream seq {} (delivery {}): {}", msg->stream_sequence(),
               msg->num_delivered(), why);
  if (auto st = msg->nak(config_.retry_delay); !st) {
    // Without the nak the ack wait expires and the server redelivers anyway.
    spdlog::warn("nak failed: {}", st.error().message);
  }
}

void SchedulerService::give_up(const bus::JsMessagePtr& msg, const std::string& why) {
  // The server delivers no more after this one: a nak would leave the request in the work queue
  // with no event at all, and the requester waiting forever. End the build with FAILED (when that
  // cannot be a second terminal event) and term the message: the server's MSG_TERMINATED advisory
  // lands in CVM_DEAD_LETTERS, which names the request's stream sequence.
  meters_->given_up.Increment();
  ++counts_.given_up;
  const std::string message =
      "gave up after " + std::to_string(msg->num_delivered()) + " deliveries: " + why;
  std::optional<cvm::v1::BuildRequest> req;
  if (!msg->header(std::string(kHeaderNodeLost))) {
    const auto header_id = msg->header("Nats-Msg-Id");
    const auto again_from = msg->header(std::string(kHeaderPlaceAgain));
    auto decoded = decode_build_request(
        msg->data(),
        header_id && !again_from ? std::optional<std::string_view>(*header_id) : std::nullopt);
    if (decoded.request) req = *decoded.request;
  }
  std::optional<cvm::v1::Phase> phase;
  bool has_record = false;
  if (req) {
    // When a lookup fails, assume the safe side: no FAILED that could be a second terminal event.
    auto last = last_phase(req->build_id());
    auto record = find_record(req->build_id());
    if (!last || !record) {
      phase = cvm::v1::FAILED;
    } else {
      phase = *last;
      has_record = record->has_value() && req->transition() == cvm::v1::START;
    }
  }
  const bool again = msg->header(std::string(kHeaderPlaceAgain)).has_value();
  if (give_up_action(req.has_value(), phase, has_record, again) == GiveUp::kFailAndTerm) {
    auto e =
        service::make_event(req->build_id(), req->workspace_id(), cvm::v1::FAILED, clock_, kSource);
    const auto reason = again ? cvm::v1::NODE_LOST : cvm::v1::RUNTIME_ERROR;
    e.set_reason(reason);
    e.set_message(message);
    if (auto ev = service::publish_event(*conn_, e); !ev) {
      spdlog::error("build {}: cannot publish FAILED after the last delivery: {}", req->build_id(),
                    ev.error().message);
    } else {
      meters_->failed.Increment();
      meters_->failed_reason(reason).Increment();
      ++counts_.failed;
    }
  }
  spdlog::error("giving up on stream seq {} (build {}, delivery {} of {}): {}; dead-lettered",
                msg->stream_sequence(), req ? req->build_id() : "-", msg->num_delivered(),
                config_.max_deliver, why);
  if (auto st = msg->term(); !st) spdlog::warn("term failed: {}", st.error().message);
}

void SchedulerService::ack(const bus::JsMessagePtr& msg) {
  if (auto st = msg->ack(); !st) spdlog::warn("ack failed: {}", st.error().message);
}

// ---------------------------------------------------------------------------------------------
// Capacity holds (KV cvm_capacity, compare-and-set)

void SchedulerService::request_hold(const std::string& node_id, PendingHold hold) {
  auto& w = node_writes_[node_id];
  w.queued.push_back(std::move(hold));
  if (w.busy) {
    apply_holds(node_id);  // queued holds count in the index already
  } else {
    flush_holds(node_id);
  }
}

void SchedulerService::drop_hold(const std::string& node_id, const std::string& build_id) {
  PendingHold drop;
  drop.build_id = build_id;
  drop.remove = true;
  request_hold(node_id, std::move(drop));
}

void SchedulerService::flush_holds(const std::string& node_id) {
  auto& w = node_writes_[node_id];
  if (w.busy || w.queued.empty()) return;
  auto& cached = ledgers_[node_id];
  const NodeRecord* node = index_.find(node_id);
  const int64_t now = clock_.now_unix_ms();
  cvm::v1::CapacityLedger next = cached.ledger;
  next.set_node_id(node_id);
  std::vector<std::pair<std::function<void(HoldOutcome)>, HoldOutcome>> replies;
  std::vector<PendingHold> writing;
  for (auto& h : w.queued) {
    if (h.remove) {
      if (remove_hold(next, h.build_id, now)) writing.push_back(std::move(h));
      continue;
    }
    if (node == nullptr) {
      replies.emplace_back(std::move(h.done), HoldOutcome::kNoRoom);
      continue;
    }
    cvm::v1::CapacityHold hold;
    hold.set_build_id(h.build_id);
    hold.set_cpu_millicores(h.amount.cpu_millicores);
    hold.set_memory_bytes(h.amount.memory_bytes);
    hold.set_gpus(h.amount.gpus);
    hold.set_expires_unix_ms(now + config_.reservation_hold.count());
    const auto result = add_hold(next, *node, hold, now);
    h.renewal = result == HoldResult::kRenewed;
    switch (result) {
      case HoldResult::kNoRoom:
        replies.emplace_back(std::move(h.done), HoldOutcome::kNoRoom);
        break;
      case HoldResult::kAlreadyHeld:
        replies.emplace_back(std::move(h.done), HoldOutcome::kAlreadyHeld);
        break;
      case HoldResult::kAdded:
      case HoldResult::kRenewed:
        writing.push_back(std::move(h));
        break;
    }
  }
  w.queued.clear();
  if (!writing.empty()) {
    // One compare-and-set for every hold queued meanwhile, on the revision they were checked
    // against: a conflict means another replica wrote the ledger, never our own queue.
    w.busy = true;
    w.writing = std::move(writing);
    std::string bytes = next.SerializeAsString();
    capacity_->update_async(
        node_id, bytes, cached.last_seq,
        guarded([this, node_id, next = std::move(next)](Result<uint64_t> rev) mutable {
          on_holds_written(node_id, std::move(next), rev);
        }),
        config_.bus_timeout);
  }
  apply_holds(node_id);
  for (auto& [fn, outcome] : replies) {
    if (fn) fn(outcome);
  }
}

void SchedulerService::on_holds_written(const std::string& node_id, cvm::v1::CapacityLedger written,
                                        const Result<uint64_t>& revision) {
  auto& w = node_writes_[node_id];
  auto& cached = ledgers_[node_id];
  auto writing = std::exchange(w.writing, {});
  w.busy = false;
  std::vector<std::pair<std::function<void(HoldOutcome)>, HoldOutcome>> replies;
  if (revision) {
    // The watch may have delivered this write (or a newer one) already: never go back.
    if (*revision > cached.last_seq) {
      cached.ledger = std::move(written);
      cached.revision = *revision;
      cached.last_seq = *revision;
    }
    for (auto& h : writing) {
      replies.emplace_back(std::move(h.done),
                           h.renewal ? HoldOutcome::kAlreadyHeld : HoldOutcome::kHeld);
    }
  } else if (revision.error().is_conflict()) {
    // Another replica changed the ledger since we read it: read it again and decide again.
    meters_->conflicts.Increment();
    ++counts_.cas_conflicts;
    std::vector<PendingHold> again;
    for (auto& h : writing) {
      if (!h.remove && ++h.attempts >= config_.cas_attempts) {
        replies.emplace_back(std::move(h.done), HoldOutcome::kNoRoom);
      } else {
        again.push_back(std::move(h));
      }
    }
    for (auto& h : w.queued) again.push_back(std::move(h));
    w.queued = std::move(again);
    w.busy = true;
    reread_ledger(node_id);
  } else {
    spdlog::warn("capacity holds on {} not written: {}", node_id, revision.error().message);
    // Removals are not fatal: the holds expire by themselves after reservation_hold.
    for (auto& h : writing) replies.emplace_back(std::move(h.done), HoldOutcome::kError);
  }
  if (!w.busy) flush_holds(node_id);
  apply_holds(node_id);
  for (auto& [fn, outcome] : replies) {
    if (fn) fn(outcome);
  }
}

void SchedulerService::reread_ledger(const std::string& node_id) {
  const std::string bucket(wire::kBucketCapacity);
  conn_->last_message_async(
      "KV_" + bucket, "$KV." + bucket + "." + node_id, config_.bus_timeout,
      guarded([this, node_id](Result<std::optional<bus::StreamMessage>> last) {
        auto& w = node_writes_[node_id];
        auto& cached = ledgers_[node_id];
        w.busy = false;
        if (!last) {
          spdlog::warn("cannot read the capacity ledger of {}: {}", node_id, last.error().message);
          std::vector<std::pair<std::function<void(HoldOutcome)>, HoldOutcome>> replies;
          for (auto& h : w.queued) {
            if (!h.remove) replies.emplace_back(std::move(h.done), HoldOutcome::kError);
          }
          w.queued.clear();
          apply_holds(node_id);
          for (auto& [fn, outcome] : replies) {
            if (fn) fn(outcome);
          }
          return;
        }
        if (!last->has_value()) {
          cached.ledger.Clear();
          cached.revision = 0;
          cached.last_seq = 0;
        } else if ((*last)->stream_sequence > cached.last_seq) {
          cached.last_seq = (*last)->stream_sequence;
          cvm::v1::CapacityLedger l;
          if (is_kv_delete((*last)->message) || !l.ParseFromString((*last)->message.data)) {
            // Deleted (a lost node's holds were dropped), or unreadable: start it afresh.
            cached.ledger.Clear();
            cached.revision = 0;
          } else {
            cached.ledger = std::move(l);
            cached.revision = cached.last_seq;
          }
        }
        flush_holds(node_id);
      }));
}

void SchedulerService::apply_holds(const std::string& node_id) {
  const std::string id = ledger_reservation(node_id);
  index_.release(id);
  Reservation total;
  if (auto it = ledgers_.find(node_id); it != ledgers_.end()) {
    // Holds for builds the node's own NodeStatus already counts are left out (counted once).
    total = held(it->second.ledger, clock_.now_unix_ms(), index_.find(node_id));
  }
  // This replica's holds not yet written count too, so its own next decisions do not pick room
  // already promised (at worst briefly twice, after the watch echoed a write: conservative).
  if (auto it = node_writes_.find(node_id); it != node_writes_.end()) {
    for (const auto* list : {&it->second.writing, &it->second.queued}) {
      for (const auto& h : *list) {
        if (h.remove) continue;
        total.cpu_millicores += h.amount.cpu_millicores;
        total.memory_bytes += h.amount.memory_bytes;
        total.gpus += h.amount.gpus;
      }
    }
  }
  if (total.cpu_millicores > 0 || total.memory_bytes > 0 || total.gpus > 0) {
    index_.reserve(id, node_id, total);
  }
}

void SchedulerService::release_gpus(const std::string& workspace_id, const std::string& lease_id) {
  cvm::v1::GpuReleaseRequest rel;
  rel.set_workspace_id(workspace_id);
  rel.set_lease_id(lease_id);
  // Not awaited: nothing here depends on the answer, and a blocking request would stall the
  // executor (every placement) for up to the timeout when the broker is slow or gone.
  conn_->request_async(std::string(wire::kGpuRelease), rel.SerializeAsString(),
                       config_.gpu_reserve_timeout,
                       [workspace_id, lease_id](Result<bus::Message> reply) {
                         if (reply) return;
                         // The broker's reconcile reclaims leases of workspaces no longer running.
                         spdlog::warn("GPU lease {} of {} not released now: {}", lease_id,
                                      workspace_id, reply.error().message);
                       });
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
    take_status(status, entry->revision);
  }
  meters_->nodes.Set(static_cast<double>(index_.size()));
}

void SchedulerService::take_status(const cvm::v1::NodeStatus& status, uint64_t revision) {
  const bool known = index_.find(status.node_id()) != nullptr;
  bool builds_changed = false;
  index_.upsert(status, revision, &builds_changed);
  liveness_.observe(status.node_id(), status.heartbeat_unix_ms());
  // Holds read before the node registered could not be applied then; and which holds count
  // depends on the builds this status says it runs (allocated_builds), when that changed.
  if ((!known || builds_changed) && ledgers_.contains(status.node_id())) {
    apply_holds(status.node_id());
  }
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

void SchedulerService::on_workspace(const std::optional<bus::KvEntry>& entry) {
  if (!entry || entry->op != bus::KvOp::kPut) return;
  cvm::v1::WorkspaceRecord record;
  if (!record.ParseFromString(entry->value) || !releases_capacity(record.phase())) return;
  const auto it = ledgers_.find(record.node_id());
  if (it == ledgers_.end()) return;
  const auto& holds = it->second.ledger.holds();
  const bool held = std::any_of(holds.begin(), holds.end(), [&](const cvm::v1::CapacityHold& h) {
    return h.build_id() == record.build_id();
  });
  // Every replica sees the record; the first removal wins, the others find nothing to remove.
  if (held) drop_hold(record.node_id(), record.build_id());
}

void SchedulerService::on_ledger(const std::optional<bus::KvEntry>& entry) {
  if (!entry) return;
  auto& cached = ledgers_[entry->key];
  // Our own writes update the cache before the watch echoes them; never go back to older state.
  if (entry->revision <= cached.last_seq) return;
  cached.last_seq = entry->revision;
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
  const bool stale = node_view_stale();
  for (const auto& lost : liveness_.sweep(now, config_.node_ttl.count())) {
    if (stale) {
      confirm_lost(lost);
    } else {
      publish_lost(lost, now);
    }
  }
}

bool SchedulerService::node_view_stale() const {
  if (!nodes_loaded_ || index_.size() == 0) return false;
  const auto silence =
      config_.node_view_silence.count() > 0 ? config_.node_view_silence : config_.node_ttl / 2;
  return std::chrono::steady_clock::now() - nodes_seen_ > silence;
}

void SchedulerService::confirm_lost(const LostNode& lost) {
  const std::string bucket(wire::kBucketNodes);
  conn_->last_message_async(
      "KV_" + bucket, "$KV." + bucket + "." + lost.node_id, config_.bus_timeout,
      guarded([this, lost](Result<std::optional<bus::StreamMessage>> last) {
        if (!last) {
          spdlog::warn(
              "node {}: no heartbeat seen for {} ms, but the node watch is silent and "
              "KV cannot be read ({}): not declaring it lost yet",
              lost.node_id, clock_.now_unix_ms() - lost.last_heartbeat_unix_ms,
              last.error().message);
          liveness_.rearm(lost.node_id);
          return;
        }
        if (!last->has_value() || is_kv_delete((*last)->message)) {
          liveness_.forget(lost.node_id);  // deregistered: gone, not lost
          return;
        }
        cvm::v1::NodeStatus status;
        if (status.ParseFromString((*last)->message.data) && status.node_id() == lost.node_id &&
            status.heartbeat_unix_ms() > lost.last_heartbeat_unix_ms) {
          // Alive; the watch is what is behind. Take the fresher status now (the watch delivers
          // it again later, and older entries change nothing in the liveness tracker).
          spdlog::warn("node {} heartbeats in KV while the node watch is silent; keeping it",
                       lost.node_id);
          take_status(status, (*last)->stream_sequence);
          return;
        }
        publish_lost(lost, clock_.now_unix_ms());
      }));
}

void SchedulerService::publish_lost(const LostNode& lost, int64_t now) {
  cvm::v1::NodeLostNotice notice;
  notice.set_node_id(lost.node_id);
  notice.set_last_heartbeat_unix_ms(lost.last_heartbeat_unix_ms);
  notice.set_detected_unix_ms(now);
  // Every replica sees the same expiry; the msg-id lets CVM_BUILDS keep one notice.
  auto pub =
      conn_->js_publish(std::string(wire::kBuildsSubmit), notice.SerializeAsString(),
                        "lost." + lost.node_id + "." + std::to_string(lost.last_heartbeat_unix_ms),
                        {{std::string(kHeaderNodeLost), lost.node_id}});
  if (!pub) {
    spdlog::warn("cannot queue the lost notice of {}: {}", lost.node_id, pub.error().message);
    liveness_.rearm(lost.node_id);  // the next sweep tries again
  }
}

}  // namespace cvm::scheduler

namespace cvm::scheduler {

std::string SchedulerService::stage_report() const {
  if (stages_.empty()) return "no stages traced\n";
  struct Stage {
    const char* name;
    int64_t StageSample::*from;
    int64_t StageSample::*to;
  };
  const Stage stages[] = {
      {"stored->fetched", &StageSample::stored, &StageSample::fetched},
      {"fetched->executor", &StageSample::fetched, &StageSample::executing},
      {"decide+capacity hold", &StageSample::executing, &StageSample::held},
      {"wait for dup lookup", &StageSample::held, &StageSample::looked_up},
      {"gpus+record", &StageSample::looked_up, &StageSample::recorded},
      {"assignment+SCHEDULED", &StageSample::recorded, &StageSample::published},
      {"total (stored->acked)", &StageSample::stored, &StageSample::published},
  };
  auto us = [](const StageSample& s, const Stage& st) {
    return static_cast<double>(s.*st.to - s.*st.from) / 1000.0;
  };
  std::vector<const StageSample*> by_total;
  for (const auto& s : stages_) by_total.push_back(&s);
  std::sort(by_total.begin(), by_total.end(),
            [](auto* a, auto* b) { return a->published - a->stored < b->published - b->stored; });
  const size_t slow_from = by_total.size() - std::max<size_t>(1, by_total.size() / 100);
  std::string out;
  char line[200];
  std::snprintf(line, sizeof line, "%-24s %9s %9s %9s %9s  %s\n", "stage (us)", "p50", "p90", "p99",
                "max", "mean over slowest 1%");
  out += line;
  for (const auto& st : stages) {
    std::vector<double> v;
    v.reserve(stages_.size());
    for (const auto& s : stages_) v.push_back(us(s, st));
    std::sort(v.begin(), v.end());
    auto at = [&](double q) {
      return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size() - 1)))];
    };
    double slow = 0;
    for (size_t i = slow_from; i < by_total.size(); ++i) slow += us(*by_total[i], st);
    slow /= static_cast<double>(by_total.size() - slow_from);
    std::snprintf(line, sizeof line, "%-24s %9.0f %9.0f %9.0f %9.0f  %9.0f\n", st.name, at(0.5),
                  at(0.9), at(0.99), v.back(), slow);
    out += line;
  }
  return out;
}

}  // namespace cvm::scheduler
