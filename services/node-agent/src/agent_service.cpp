#include "cvm/agent/agent_service.h"

#include <sys/resource.h>

#include <cerrno>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>
#include <nlohmann/json.hpp>

#include "cvm/agent/oci_spec.h"
#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/gpu.pb.h"

namespace cvm::agent {

namespace fs = std::filesystem;

namespace {
constexpr std::string_view kSource = "node-agent";
constexpr std::string_view kAgentVersion = "0.1.0";

uint64_t cpu_of(const cvm::v1::Resources& r) {
  return r.cpu_millicores() == 0 ? 1000 : r.cpu_millicores();
}
uint64_t memory_of(const cvm::v1::Resources& r) {
  return r.memory_bytes() == 0 ? (512ULL << 20) : r.memory_bytes();
}
}  // namespace

struct AgentService::Meters {
  explicit Meters(telemetry::Metrics& m)
      : assignments(
            m.counter("cvm_agent_assignments_total", "Assignments read from the work stream")),
        invalid(m.counter("cvm_agent_assignments_invalid_total",
                          "Assignments terminated as unreadable")),
        launched(m.counter("cvm_agent_launches_total", "Launch outcomes", {{"result", "running"}})),
        failed(m.counter("cvm_agent_launches_total", "Launch outcomes", {{"result", "failed"}})),
        stopped(m.counter("cvm_agent_stops_total", "Workspaces stopped")),
        heartbeats(m.counter("cvm_agent_heartbeats_total", "NodeStatus heartbeats written")),
        heartbeat_errors(m.counter("cvm_agent_heartbeat_errors_total",
                                   "NodeStatus heartbeats that could not be written")),
        launch_seconds(
            m.histogram("cvm_agent_launch_seconds", "Assignment received to RUNNING, seconds")),
        running(m.gauge("cvm_agent_workspaces_running", "Workspaces running on this node")) {}
  prometheus::Counter& assignments;
  prometheus::Counter& invalid;
  prometheus::Counter& launched;
  prometheus::Counter& failed;
  prometheus::Counter& stopped;
  prometheus::Counter& heartbeats;
  prometheus::Counter& heartbeat_errors;
  prometheus::Histogram& launch_seconds;
  prometheus::Gauge& running;
};

AgentService::AgentService(boost::asio::io_context& io, bus::ConnectionPtr conn,
                           telemetry::Metrics& metrics, const Clock& clock, AgentConfig config)
    : io_(io),
      conn_(std::move(conn)),
      clock_(clock),
      config_(std::move(config)),
      meters_(std::make_unique<Meters>(metrics)),
      heartbeat_timer_(io) {
  runtime_ = std::make_unique<RuncRuntime>(
      RuncOptions{.binary = config_.tools.runc, .root = config_.runc_root});
  images_ = std::make_unique<ImageTool>(
      ImageToolOptions{.tools = config_.tools, .staging_dir = config_.state_dir + "/staging"});
}

AgentService::~AgentService() { stop(); }

std::string AgentService::container_id(const std::string& workspace_id) {
  return "cvm-" + workspace_id;
}

std::string AgentService::workspace_dir(const std::string& workspace_id) const {
  return config_.state_dir + "/workspaces/" + workspace_id;
}

Status AgentService::start() {
  if (!wire::is_valid_id(config_.node_id)) {
    return make_error(ErrorDomain::kInvalid, "node id '" + config_.node_id +
                                                 "' must be 1-128 characters of [A-Za-z0-9_-]");
  }
  std::error_code ec;
  // 0755 all the way: the user-namespaced container's root (a mapped, unprivileged host UID) must
  // be able to traverse into its bundle.
  for (const auto& dir : {config_.state_dir, config_.state_dir + "/workspaces",
                          config_.state_dir + "/staging", config_.runc_root}) {
    fs::create_directories(dir, ec);
    if (ec) return make_error(ErrorDomain::kSystem, "cannot create " + dir + ": " + ec.message());
    fs::permissions(dir, fs::perms(0755), ec);
  }
  if (!ids_) {
    if (auto st = load_id_ranges(); !st) return st;
  }
  host_ = probe_host(config_.roots);
  capacity_ = probe_capacity(config_.roots);
  runtime_info_ = probe_runtime(config_.tools);
  if (auto caps = read_cap_bounding(config_.roots)) cap_bounding_ = *caps;
  started_ms_ = clock_.now_unix_ms();
  spdlog::info(
      "node {}: kernel {}, SELinux {}, shiftfs {}, {} CPUs, {} MiB; runtime {} ({})",
      config_.node_id, host_.kernel_version(),
      host_.selinux_enforcing() ? "enforcing" : (host_.selinux_enabled() ? "permissive" : "off"),
      host_.shiftfs_loaded() ? "loaded" : "absent", capacity_.cpu_millicores() / 1000,
      capacity_.memory_bytes() >> 20, runtime_info_.runtime(), runtime_info_.detail());

  if (auto st = conn_->ensure_stream(service::node_work_stream()); !st) return st;
  if (auto st = conn_->ensure_stream(service::events_stream()); !st) return st;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  nodes_kv_ = std::move(*nodes);
  auto workspaces = conn_->ensure_kv(service::workspaces_bucket());
  if (!workspaces) return workspaces.error();
  workspaces_kv_ = std::move(*workspaces);
  load_workspaces();

  heartbeat();
  bus::ConsumerConfig cc;
  cc.stream = std::string(wire::kStreamNodeWork);
  cc.durable = wire::agent_durable(config_.node_id);
  cc.filter_subject = wire::node_work_subject(config_.node_id);
  cc.ack_wait = config_.ack_wait;
  cc.max_deliver = 5;
  cc.max_ack_pending = 64;
  auto consumer = conn_->pull_consume(
      cc, [this](bus::JsMessagePtr m) { on_work(m); }, 4);
  if (!consumer) return consumer.error();
  consumer_ = std::move(*consumer);
  spdlog::info("node {} consuming {} (durable {})", config_.node_id, cc.filter_subject, cc.durable);
  return {};
}

void AgentService::stop() {
  if (stopping_) return;
  stopping_ = true;
  consumer_.reset();
  heartbeat_timer_.cancel();
  worker_.join();
}

Status AgentService::load_id_ranges() {
  const std::string path = config_.state_dir + "/id-ranges.json";
  std::ifstream in(path);
  if (!in) {
    auto alloc = IdRangeAllocator::create(config_.id_pool);
    if (!alloc) return alloc.error();
    ids_ = std::move(*alloc);
    return save_id_ranges();
  }
  nlohmann::json state = nlohmann::json::parse(in, nullptr, false);
  if (state.is_discarded()) {
    return make_error(ErrorDomain::kInvalid, path +
                                                 " is not valid JSON; refusing to guess which "
                                                 "ID ranges are in use");
  }
  auto alloc = IdRangeAllocator::from_json(state, config_.id_pool);
  if (!alloc) return alloc.error();
  ids_ = std::move(*alloc);
  return {};
}

Status AgentService::save_id_ranges() {
  // Write-then-rename so a crash never leaves a half-written file that would lose ranges in use.
  const std::string path = config_.state_dir + "/id-ranges.json";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << ids_->to_json().dump(2);
    out.flush();
    if (!out) return make_error(ErrorDomain::kSystem, "cannot write " + tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return make_error(ErrorDomain::kSystem, "cannot replace " + path + ": " + ec.message());
  return {};
}

void AgentService::load_workspaces() {
  // The desired state of this node's workspaces lives in KV; issue 3 reconciles it with runc.
  auto keys = workspaces_kv_->keys();
  if (!keys) return;
  for (const auto& key : *keys) {
    auto e = workspaces_kv_->get(key);
    if (!e || !e->has_value()) continue;
    cvm::v1::WorkspaceRecord r;
    if (!r.ParseFromString((*e)->value) || r.node_id() != config_.node_id) continue;
    Workspace ws;
    ws.record = r;
    ws.cpu_millicores = cpu_of(r.resources());
    ws.memory_bytes = memory_of(r.resources());
    workspaces_[r.workspace_id()] = std::move(ws);
  }
}

void AgentService::put_workspace(const Workspace& ws) {
  if (auto rev = workspaces_kv_->put(ws.record.workspace_id(), ws.record.SerializeAsString());
      !rev) {
    spdlog::warn("cannot record workspace {}: {}", ws.record.workspace_id(), rev.error().message);
  }
}

cvm::v1::NodeStatus AgentService::node_status() const {
  cvm::v1::NodeStatus s;
  s.set_node_id(config_.node_id);
  *s.mutable_host() = host_;
  *s.mutable_runtime() = runtime_info_;
  *s.mutable_capacity() = capacity_;
  uint64_t cpu = 0;
  uint64_t mem = 0;
  uint32_t count = 0;
  for (const auto& [id, ws] : workspaces_) {
    // Stopped workspaces keep their files but not their CPU and memory.
    if (ws.record.phase() == cvm::v1::RUNNING || busy_.contains(id)) {
      cpu += ws.cpu_millicores;
      mem += ws.memory_bytes;
      ++count;
    }
  }
  s.mutable_allocated()->set_cpu_millicores(cpu);
  s.mutable_allocated()->set_memory_bytes(mem);
  s.set_workspaces(count);
  s.set_heartbeat_unix_ms(clock_.now_unix_ms());
  s.set_started_unix_ms(started_ms_);
  s.set_agent_version(std::string(kAgentVersion));
  return s;
}

void AgentService::heartbeat() {
  if (stopping_) return;
  if (auto rev = nodes_kv_->put(config_.node_id, node_status().SerializeAsString()); rev) {
    meters_->heartbeats.Increment();
  } else {
    meters_->heartbeat_errors.Increment();
    spdlog::warn("heartbeat not written: {}", rev.error().message);
  }
  schedule_heartbeat();
}

void AgentService::schedule_heartbeat() {
  heartbeat_timer_.expires_after(config_.heartbeat_interval);
  heartbeat_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) heartbeat();
  });
}

void AgentService::publish(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                           cvm::v1::Reason reason, const std::string& message,
                           const std::vector<std::string>& warnings) {
  auto e = service::make_event(a.request().build_id(), a.request().workspace_id(), phase, clock_,
                               kSource);
  e.set_node_id(config_.node_id);
  e.set_reason(reason);
  e.set_message(message);
  for (const auto& w : warnings) e.add_warnings(w);
  for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
  if (auto ack = service::publish_event(*conn_, e); !ack) {
    spdlog::warn("cannot publish {} for build {}: {}", phase_name(phase), e.build_id(),
                 ack.error().message);
  }
}

void AgentService::on_work(const bus::JsMessagePtr& msg) {
  meters_->assignments.Increment();
  cvm::v1::NodeAssignment a;
  if (!a.ParseFromArray(msg->data().data(), static_cast<int>(msg->data().size())) ||
      !wire::is_valid_id(a.request().build_id()) ||
      !wire::is_valid_id(a.request().workspace_id())) {
    meters_->invalid.Increment();
    spdlog::warn("terminating an unreadable assignment (stream seq {})", msg->stream_sequence());
    (void)msg->term();
    return;
  }
  const auto& ws_id = a.request().workspace_id();
  if (busy_.contains(ws_id)) {
    // An operation on this workspace is running; this delivery comes back after the ack wait
    // or, for a redelivered duplicate, finds the work done.
    (void)msg->nak(std::chrono::seconds(2));
    return;
  }
  switch (a.request().transition()) {
    case cvm::v1::START:
      return handle_start(a, msg);
    case cvm::v1::STOP:
      return handle_stop(a, msg, false);
    case cvm::v1::DELETE:
      return handle_stop(a, msg, true);
    default:
      publish(a, cvm::v1::FAILED, cvm::v1::INVALID_REQUEST, "unknown transition");
      (void)msg->term();
  }
}

void AgentService::handle_start(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg) {
  const auto& req = a.request();
  auto existing = workspaces_.find(req.workspace_id());
  if (existing != workspaces_.end() && existing->second.record.phase() == cvm::v1::RUNNING) {
    // A redelivered assignment, or a START of a workspace that already runs: launch once.
    auto state = runtime_->state(container_id(req.workspace_id()));
    if (state && state->status == ContainerStatus::kRunning) {
      const bool same = existing->second.record.build_id() == req.build_id();
      publish(a, cvm::v1::RUNNING, cvm::v1::REASON_UNSPECIFIED,
              same ? "" : "workspace was already running");
      (void)msg->ack();
      return;
    }
  }
  auto ids = ids_->allocate(req.workspace_id());
  if (!ids) {
    publish(a, cvm::v1::FAILED, cvm::v1::INSUFFICIENT_CAPACITY, ids.error().message);
    (void)msg->ack();
    return;
  }
  if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
  busy_.insert(req.workspace_id());
  publish(a, cvm::v1::PREPARING);
  const auto t0 = std::chrono::steady_clock::now();
  boost::asio::post(worker_, [this, a, ids = *ids, msg, t0] {
    auto result = launch(a, ids);
    boost::asio::post(io_, [this, a, ids, msg, t0, result = std::move(result)]() mutable {
      meters_->launch_seconds.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      finish_start(a, ids, std::move(result), msg);
    });
  });
}

AgentService::LaunchResult AgentService::launch(const cvm::v1::NodeAssignment& a, IdRange ids) {
  LaunchResult out;
  const auto& req = a.request();
  const std::string dir = workspace_dir(req.workspace_id());
  const std::string bundle = dir + "/bundle";
  const std::string id = container_id(req.workspace_id());
  std::error_code ec;
  // A stale container or bundle from an earlier life of this workspace would make runc or umoci
  // refuse; this START replaces it.
  (void)runtime_->remove(id, true);
  fs::remove_all(bundle, ec);
  fs::create_directories(dir, ec);
  fs::permissions(dir, fs::perms(0755), ec);

  auto image = images_->unpack(req.image(), bundle, ids);
  if (!image) {
    out.reason = cvm::v1::IMAGE_UNAVAILABLE;
    out.message = "image " + req.image() + ": " + image.error().message;
    fs::remove_all(bundle, ec);
    return out;
  }
  if (!image->tmp_files.empty()) {
    out.warnings.push_back("the image has " + std::to_string(image->tmp_files.size()) +
                           " file(s) under /tmp (e.g. " + image->tmp_files.front() +
                           "): they are gone once the CVM is built");
  }
  if (!runtime_info_.sysbox()) {
    out.warnings.push_back(
        "sysbox-runc is not installed on " + config_.node_id +
        ": the workspace runs under runc with a user namespace and an exclusive ID range");
  }
  SpecInput in;
  in.hostname = req.workspace_id();
  in.has_sbin_init = image->has_sbin_init;
  in.env = image->env;
  in.cwd = image->cwd.empty() ? "/" : image->cwd;
  in.ids = ids;
  in.capability_profile =
      a.cvm() ? CapabilityProfile::kSystemContainer : CapabilityProfile::kDocker;
  in.host_cap_bounding = cap_bounding_;
  rlimit nofile{};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0) in.host_nofile_hard = nofile.rlim_max;
  in.cgroups_path = "/cvm/" + id;
  in.memory_limit_bytes = memory_of(req.resources());
  in.cpu_millicores = cpu_of(req.resources());
  in.tun = req.options().tun();
  in.fuse = req.options().fuse();
  in.annotations["io.cvm.workspace"] = req.workspace_id();
  in.annotations["io.cvm.build"] = req.build_id();
  if (auto st = write_runtime_spec(bundle, build_runtime_spec(in)); !st) {
    out.reason = cvm::v1::RUNTIME_ERROR;
    out.message = st.error().message;
    fs::remove_all(bundle, ec);
    return out;
  }
  publish(a, cvm::v1::STARTING);
  const std::string log = dir + "/runc.log";
  auto created = runtime_->create(id, bundle, log);
  Status started = created ? runtime_->start(id) : created;
  if (!started) {
    out.reason = cvm::v1::RUNTIME_ERROR;
    out.message = started.error().message;
    // Leave no half-made container behind.
    (void)runtime_->remove(id, true);
    fs::remove_all(bundle, ec);
    return out;
  }
  auto state = runtime_->state(id);
  if (!state || state->status != ContainerStatus::kRunning) {
    out.reason = cvm::v1::RUNTIME_ERROR;
    out.message = state ? "the container exited right after it started (see " + log + ")"
                        : state.error().message;
    (void)runtime_->remove(id, true);
    fs::remove_all(bundle, ec);
    return out;
  }
  out.ok = true;
  out.pid = state->pid;
  return out;
}

void AgentService::finish_start(const cvm::v1::NodeAssignment& a, IdRange ids, LaunchResult result,
                                const bus::JsMessagePtr& msg) {
  const auto& req = a.request();
  busy_.erase(req.workspace_id());
  if (!result.ok) {
    meters_->failed.Increment();
    ids_->release(req.workspace_id());
    if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
    workspaces_.erase(req.workspace_id());
    if (!a.lease_id().empty()) {
      cvm::v1::WorkspaceRecord r;
      r.set_workspace_id(req.workspace_id());
      r.set_lease_id(a.lease_id());
      release_gpus(r);
    }
    spdlog::warn("build {} FAILED {}: {}", req.build_id(), cvm::v1::Reason_Name(result.reason),
                 result.message);
    publish(a, cvm::v1::FAILED, result.reason, result.message, result.warnings);
    (void)msg->ack();
    heartbeat();  // report the freed capacity now
    return;
  }
  Workspace ws;
  auto& r = ws.record;
  r.set_workspace_id(req.workspace_id());
  r.set_node_id(config_.node_id);
  r.set_build_id(req.build_id());
  r.set_phase(cvm::v1::RUNNING);
  r.set_desired(cvm::v1::START);
  r.set_image(req.image());
  *r.mutable_resources() = req.resources();
  r.set_container_id(container_id(req.workspace_id()));
  r.set_uid_base(ids.base);
  r.set_uid_count(ids.count);
  r.set_updated_unix_ms(clock_.now_unix_ms());
  r.set_lease_id(a.lease_id());
  for (const auto& g : a.gpus()) r.add_gpu_uuids(g.uuid());
  ws.cpu_millicores = cpu_of(req.resources());
  ws.memory_bytes = memory_of(req.resources());
  workspaces_[req.workspace_id()] = ws;
  put_workspace(ws);
  meters_->launched.Increment();
  meters_->running.Set(static_cast<double>(workspaces_.size()));
  spdlog::info("build {}: workspace {} RUNNING as {} (pid {}, uid base {})", req.build_id(),
               req.workspace_id(), r.container_id(), result.pid, ids.base);
  publish(a, cvm::v1::RUNNING, cvm::v1::REASON_UNSPECIFIED, "", result.warnings);
  (void)msg->ack();
  heartbeat();
}

void AgentService::handle_stop(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg,
                               bool remove) {
  const auto& req = a.request();
  busy_.insert(req.workspace_id());
  publish(a, cvm::v1::STOPPING);
  const std::string id = container_id(req.workspace_id());
  const std::string dir = workspace_dir(req.workspace_id());
  boost::asio::post(worker_, [this, a, msg, id, dir, remove] {
    // Stopping what is already gone is success: STOP then DELETE, or a redelivered STOP.
    auto ignore_missing = [](Status s) {
      return s.ok() || s.error().is_not_found() ? Status{} : s;
    };
    Status st = ignore_missing(stop_container(*runtime_, id, config_.stop_grace));
    if (st) st = ignore_missing(runtime_->remove(id, true));
    if (st && remove) {
      std::error_code ec;
      fs::remove_all(dir, ec);
      if (ec) st = make_error(ErrorDomain::kSystem, "cannot remove " + dir + ": " + ec.message());
    }
    boost::asio::post(io_, [this, a, msg, st, remove] {
      const auto& req = a.request();
      busy_.erase(req.workspace_id());
      if (!st) {
        publish(a, cvm::v1::FAILED, cvm::v1::RUNTIME_ERROR, st.error().message);
        (void)msg->ack();
        return;
      }
      auto it = workspaces_.find(req.workspace_id());
      if (it != workspaces_.end()) {
        release_gpus(it->second.record);
        it->second.record.clear_gpu_uuids();
        it->second.record.clear_lease_id();
      }
      if (remove) {
        ids_->release(req.workspace_id());
        if (auto s = save_id_ranges(); !s) spdlog::error("{}", s.error().message);
        workspaces_.erase(req.workspace_id());
        (void)workspaces_kv_->erase(req.workspace_id());
      } else if (it != workspaces_.end()) {
        it->second.record.set_phase(cvm::v1::STOPPED);
        it->second.record.set_desired(cvm::v1::STOP);
        it->second.record.set_build_id(req.build_id());
        it->second.record.set_updated_unix_ms(clock_.now_unix_ms());
        put_workspace(it->second);
      }
      meters_->stopped.Increment();
      size_t running = 0;
      for (const auto& [wid, ws] : workspaces_) running += ws.record.phase() == cvm::v1::RUNNING;
      meters_->running.Set(static_cast<double>(running));
      spdlog::info("build {}: workspace {} {}", req.build_id(), req.workspace_id(),
                   remove ? "deleted" : "stopped");
      publish(a, cvm::v1::STOPPED);
      (void)msg->ack();
      heartbeat();
    });
  });
}

void AgentService::release_gpus(const cvm::v1::WorkspaceRecord& record) {
  if (record.lease_id().empty()) return;
  cvm::v1::GpuReleaseRequest rel;
  rel.set_workspace_id(record.workspace_id());
  rel.set_lease_id(record.lease_id());
  auto reply = conn_->request(std::string(wire::kGpuRelease), rel.SerializeAsString(),
                              std::chrono::seconds(2));
  if (!reply) {
    // The broker's reconcile reclaims leases of workspaces that no longer run (issue 5).
    spdlog::warn("GPU lease {} of {} not released now: {}", record.lease_id(),
                 record.workspace_id(), reply.error().message);
  }
}

}  // namespace cvm::agent
