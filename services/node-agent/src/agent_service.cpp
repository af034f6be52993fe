#include "cvm/agent/agent_service.h"

#include <malloc.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>
#include <nlohmann/json.hpp>

#include "cvm/agent/console_log.h"
#include "cvm/agent/cpu_pinning.h"
#include "cvm/agent/node_tuning.h"
#include "cvm/agent/oci_spec.h"
#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/gpu.pb.h"
#include "file_util.h"

namespace cvm::agent {

namespace fs = std::filesystem;

namespace {
constexpr std::string_view kSource = "node-agent";
constexpr std::string_view kAgentVersion = "0.1.0";

double ms_since(std::chrono::steady_clock::time_point a,
                std::chrono::steady_clock::time_point b = std::chrono::steady_clock::now()) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Writes `content` to PATH.tmp and renames it over `path`: a crash leaves the old file or the new
// one, never half of one. No fsync: the agent must survive its own crash, not a power loss (which
// loses the containers too).
Status replace_file(const std::string& path, std::string_view content) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << content;
    out.flush();
    if (!out) return make_error(ErrorDomain::kSystem, "cannot write " + tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return make_error(ErrorDomain::kSystem, "cannot replace " + path + ": " + ec.message());
  return {};
}

uint64_t cpu_of(const cvm::v1::Resources& r) {
  return r.cpu_millicores() == 0 ? 1000 : r.cpu_millicores();
}
uint64_t memory_of(const cvm::v1::Resources& r) {
  return r.memory_bytes() == 0 ? (512ULL << 20) : r.memory_bytes();
}
}  // namespace

bool ownership_read_fresh(std::chrono::steady_clock::duration age) {
  // A tenth of the shortest node TTL the tests use (3 s); the default TTL is 15 s.
  return age <= std::chrono::milliseconds(250);
}

void AgentService::Ownership::set(State s, uint64_t rev,
                                  std::chrono::steady_clock::time_point sent) {
  {
    std::lock_guard lock(mu_);
    state_ = s;
    revision_ = rev;
    sent_ = sent;
  }
  cv_.notify_all();
}

AgentService::Ownership::State AgentService::Ownership::wait(
    uint64_t& rev, std::chrono::steady_clock::time_point& sent) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [this] { return state_ != State::kPending; });
  rev = revision_;
  sent = sent_;
  return state_;
}

bool build_still_ours(const cvm::v1::WorkspaceRecord* current, uint64_t current_revision,
                      uint64_t expected_revision, const std::string& node_id,
                      const std::string& build_id) {
  if (current == nullptr || current->node_id() == node_id) return true;
  if (current->build_id() == build_id) return false;  // this very build runs (or ran) elsewhere
  return current_revision == expected_revision;
}

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
        running(m.gauge("cvm_agent_workspaces_running", "Workspaces running on this node")),
        lost(m.counter("cvm_agent_workspaces_lost_total",
                       "Workspaces whose container was gone when the agent restarted")),
        orphans(m.counter("cvm_agent_orphans_removed_total",
                          "Containers and directories no workspace accounted for, removed")),
        sessions_open(m.gauge("cvm_agent_sessions_open", "exec/shell sessions open on this node")),
        sessions_opened(m.counter("cvm_agent_sessions_total", "Session opens by outcome",
                                  {{"result", "opened"}})),
        sessions_refused(m.counter("cvm_agent_sessions_total", "Session opens by outcome",
                                   {{"result", "refused"}})),
        sessions_failed(m.counter("cvm_agent_sessions_total", "Session opens by outcome",
                                  {{"result", "failed"}})),
        session_bytes_in(m.counter("cvm_agent_session_bytes_total",
                                   "Bytes through sessions (in: to processes)",
                                   {{"direction", "in"}})),
        session_bytes_out(m.counter("cvm_agent_session_bytes_total",
                                    "Bytes through sessions (in: to processes)",
                                    {{"direction", "out"}})) {}
  prometheus::Counter& assignments;
  prometheus::Counter& invalid;
  prometheus::Counter& launched;
  prometheus::Counter& failed;
  prometheus::Counter& stopped;
  prometheus::Counter& heartbeats;
  prometheus::Counter& heartbeat_errors;
  prometheus::Histogram& launch_seconds;
  prometheus::Gauge& running;
  prometheus::Counter& lost;
  prometheus::Counter& orphans;
  prometheus::Gauge& sessions_open;
  prometheus::Counter& sessions_opened;
  prometheus::Counter& sessions_refused;
  prometheus::Counter& sessions_failed;
  prometheus::Counter& session_bytes_in;
  prometheus::Counter& session_bytes_out;
  SessionCounters exported;  // what the counters above already hold
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
  ImageToolOptions image_options{.tools = config_.tools,
                                 .staging_dir = config_.state_dir + "/staging",
                                 .cache_dir = config_.image_cache_dir.empty()
                                                  ? config_.state_dir + "/image-cache"
                                                  : config_.image_cache_dir};
  if (!config_.registry_tls_verify) image_options.skopeo_copy_args = {"--src-tls-verify=false"};
  images_ = std::make_unique<ImageTool>(std::move(image_options));
}

AgentService::~AgentService() { stop(); }

std::string AgentService::container_id(const std::string& workspace_id) {
  return WorkspaceLauncher::container_id(workspace_id);
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
  // Whatever a killed agent was pulling or unpacking into the cache is of no use now.
  fs::remove_all(config_.state_dir + "/staging", ec);
  images_->remove_unfinished_cache_entries();
  for (const auto& dir :
       {config_.state_dir, config_.state_dir + "/workspaces", config_.state_dir + "/staging",
        config_.state_dir + "/inflight", config_.runc_root}) {
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
  if (!gpu_monitor_) {
    // GPUs: discovered once here; the monitor's thread keeps their health current.
    gpu_monitor_ = std::make_unique<gpu::GpuMonitor>(
        gpu::GpuMonitorOptions{.roots = {config_.roots.procfs, config_.roots.sysfs}}, clock_);
    gpu_monitor_->start();
  }
  started_ms_ = clock_.now_unix_ms();
  if (!launcher_) {
    LauncherConfig lc;
    lc.workspaces_dir = config_.state_dir + "/workspaces";
    lc.supervisor_binary = config_.supervisor_binary;
    if (lc.supervisor_binary.empty()) {
      std::error_code self_ec;
      lc.supervisor_binary =
          (fs::read_symlink("/proc/self/exe", self_ec).parent_path() / "cvm-supervisor").string();
    }
    // The inner container's runtime; the supervising container always runs under runc.
    lc.inner_runtime = runtime_info_.sysbox() ? config_.tools.sysbox_runc : config_.tools.runc;
    if (runtime_info_.sysbox()) {
      // sysbox-runc talks to sysbox-mgr and sysbox-fs over sockets under /run/sysbox.
      lc.supervisor_extra_binds.push_back({"/run/sysbox", "/run/sysbox", false});
    }
    lc.host_paths_root = config_.host_paths_root;
    lc.dev_root = config_.dev_root;
    lc.gpu_library_dir = config_.gpu_library_dir;
    struct utsname uts {};
    if (::uname(&uts) == 0) lc.machine = uts.machine;
    lc.stop_grace = config_.stop_grace;
    lc.ready_timeout = config_.ready_timeout;
    lc.host_cap_bounding = cap_bounding_;
    rlimit nofile{};
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0) lc.host_nofile_hard = nofile.rlim_max;
    if (config_.network.enabled) {
      NetworkConfig nc = config_.network;
      if (nc.state_dir.empty()) nc.state_dir = config_.state_dir + "/network";
      network_ = std::make_unique<WorkspaceNetwork>(std::move(nc));
      if (auto st = network_->prepare(); !st) {
        spdlog::error("workspace network: {}; CVMs get only lo", st.error().message);
      }
      lc.network = network_.get();
    }
    lc.lxcfs_dir = config_.lxcfs_dir;
    lc.seccomp_profile = config_.seccomp_profile;
    launcher_ = std::make_unique<WorkspaceLauncher>(lc, *runtime_, *images_);
  }
  if (config_.tune_sysctls) {
    for (const auto& line : raise_node_sysctls(config_.roots.procfs)) {
      spdlog::info("node {}: {}", config_.node_id, line);
      // Only a limit left too low is worth the node status: it explains failed boots.
      if (line.rfind("raised ", 0) != 0) {
        runtime_info_.set_detail(
            runtime_info_.detail().empty() ? line : runtime_info_.detail() + "; " + line);
      }
    }
  }
  {
    const bool lxcfs = !config_.lxcfs_dir.empty() &&
                       ::access((config_.lxcfs_dir + "/proc/meminfo").c_str(), R_OK) == 0;
    const std::string note = lxcfs ? "lxcfs at " + config_.lxcfs_dir
                                   : "no lxcfs (workspaces see the node's memory and CPUs)";
    runtime_info_.set_detail(runtime_info_.detail().empty() ? note
                                                            : runtime_info_.detail() + "; " + note);
    const std::string net =
        network_ == nullptr ? "network off (workspaces get only lo)"
        : network_->ready()
            ? "network " + network_->config().bridge + " " + network_->config().subnet +
                  (network_->config().workspace_to_workspace ? ", workspaces reach each other"
                                                             : ", workspaces isolated")
            : "no network: " + network_->ready().error().message;
    runtime_info_.set_detail(runtime_info_.detail().empty() ? net
                                                            : runtime_info_.detail() + "; " + net);
    // Checked now as well as at each launch: a bad profile is in the node status and the log.
    std::string filter;
    if (config_.seccomp_profile == kUnconfined) {
      filter = "no seccomp filter (unconfined)";
    } else if (auto profile = workspace_seccomp(config_.seccomp_profile); !profile) {
      filter = "seccomp profile unusable, every launch fails: " + profile.error().message;
      spdlog::error("node {}: {}", config_.node_id, filter);
    } else {
      filter = "seccomp " + (config_.seccomp_profile.empty() ? std::string("built-in profile")
                                                             : config_.seccomp_profile);
    }
    runtime_info_.set_detail(runtime_info_.detail() + "; " + filter);
  }
  runtime_info_.set_supervisor(true);
  if (auto st = launcher_->prepare(); !st) {
    // Plain workspaces could still run, but a node that cannot run CVMs must not get them.
    runtime_info_.set_ready(false);
    runtime_info_.set_detail("cannot run supervising containers: " + st.error().message +
                             (runtime_info_.detail().empty() ? "" : "; ") + runtime_info_.detail());
    spdlog::error("{}", runtime_info_.detail());
  }
  spdlog::info(
      "node {}: kernel {}, SELinux {}, shiftfs {}, {} CPUs, {} MiB; runtime {} ({})",
      config_.node_id, host_.kernel_version(),
      host_.selinux_enforcing() ? "enforcing" : (host_.selinux_enabled() ? "permissive" : "off"),
      host_.shiftfs_loaded() ? "loaded" : "absent", capacity_.cpu_millicores() / 1000,
      capacity_.memory_bytes() >> 20, runtime_info_.runtime(), runtime_info_.detail());

  cpu_set_t affinity;
  CPU_ZERO(&affinity);
  if (::sched_getaffinity(0, sizeof affinity, &affinity) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &affinity)) node_cpus_.push_back(c);
    }
  }
  if (auto st = conn_->ensure_stream(service::node_work_stream()); !st) return st;
  if (auto st = conn_->ensure_stream(service::events_stream()); !st) return st;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  nodes_kv_ = std::move(*nodes);
  auto workspaces = conn_->ensure_kv(service::workspaces_bucket());
  if (!workspaces) return workspaces.error();
  workspaces_kv_ = std::move(*workspaces);
  load_workspaces();
  reconcile();

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
  auto console = conn_->subscribe(wire::node_console_wildcard(config_.node_id), "",
                                  [this](bus::Message m) { answer_console(m); });
  if (!console) return console.error();
  console_sub_ = std::move(*console);

  SessionServerConfig sc;
  sc.node_id = config_.node_id;
  sc.runc = config_.tools.runc;
  sc.runc_root = config_.runc_root;
  sc.inner_runtime = launcher_->inner_runtime();
  sc.admins = config_.session_admins;
  sc.limits = config_.session_limits;
  sc.heartbeat = config_.session_heartbeat;
  sessions_ = std::make_unique<SessionServer>(
      conn_, sc, [this](const std::string& id) { return session_target(id); });
  if (auto st = sessions_->start(); !st) return st;
  return {};
}

std::optional<SessionTarget> AgentService::session_target(const std::string& workspace_id) const {
  auto it = workspaces_.find(workspace_id);
  if (it == workspaces_.end() || it->second.record.phase() != cvm::v1::RUNNING ||
      busy_.contains(workspace_id)) {
    return std::nullopt;
  }
  SessionTarget t;
  t.owner = it->second.record.owner();
  t.container_id = container_id(workspace_id);
  t.rootfs = workspace_dir(workspace_id) + "/bundle/rootfs";
  // The image's user (the inner spec's process.user) is a session's user unless it names one.
  if (auto spec = detail::read_file(workspace_dir(workspace_id) + "/bundle/config.json")) {
    auto j = nlohmann::json::parse(*spec, nullptr, false);
    if (j.is_object() && j.contains("process") && j["process"].contains("user")) {
      t.default_uid = j["process"]["user"].value("uid", 0u);
      t.default_gid = j["process"]["user"].value("gid", 0u);
    }
  }
  return t;
}

session::Access AgentService::console_access(const std::string& user,
                                             const std::string& workspace_id) const {
  // A workspace this agent no longer holds (deleted, its log kept) has no owner here: admins only.
  auto it = workspaces_.find(workspace_id);
  const std::string owner = it == workspaces_.end() ? std::string() : it->second.record.owner();
  return session::may_enter(user, owner, config_.session_admins);
}

void AgentService::answer_console(const bus::Message& msg) {
  if (msg.reply.empty()) return;
  // One reply stays well inside NATS' default 1 MiB payload; a follower asks again.
  constexpr uint32_t kDefaultBytes = 256 * 1024;
  constexpr uint32_t kMaxBytes = 512 * 1024;
  cvm::v1::ConsoleLogRequest req;
  cvm::v1::ConsoleLogReply reply;
  // cvm.v1.node.<node>.console.<user>: the server lets only <user> publish there.
  const std::string user = msg.subject.substr(msg.subject.rfind('.') + 1);
  if (!req.ParseFromString(msg.data)) {
    reply.set_error("the request is not a cvm.v1.ConsoleLogRequest");
  } else if (!wire::is_valid_id(req.workspace_id())) {
    reply.set_error("invalid workspace id (want [A-Za-z0-9_-], 1..128 characters)");
  } else if (auto access = console_access(user, req.workspace_id()); !access.allowed) {
    reply.set_forbidden(true);
    reply.set_error(access.reason);
  } else {
    const uint32_t max =
        req.max_bytes() == 0 ? kDefaultBytes : std::min(req.max_bytes(), kMaxBytes);
    auto chunk = read_console_log(launcher_->console_log(req.workspace_id()),
                                  {req.from().file_id(), req.from().offset()}, max);
    if (!chunk) {
      reply.set_not_found(chunk.error().is_not_found());
      reply.set_error(chunk.error().is_not_found()
                          ? "node " + config_.node_id + " keeps no console log of workspace " +
                                req.workspace_id()
                          : chunk.error().message);
    } else {
      reply.set_data(std::move(chunk->data));
      reply.mutable_next()->set_file_id(chunk->next.file_id);
      reply.mutable_next()->set_offset(chunk->next.offset);
      reply.set_lost(chunk->lost);
    }
  }
  if (auto st = conn_->publish(msg.reply, reply.SerializeAsString()); !st) {
    spdlog::warn("cannot answer a console request on {}: {}", msg.reply, st.error().message);
  }
}

void AgentService::stop() {
  if (stopping_) return;
  stopping_ = true;
  consumer_.reset();
  console_sub_.reset();
  if (sessions_) sessions_->stop();
  heartbeat_timer_.cancel();
  // The workspaces keep running without the agent; a restarted one adopts and watches them.
  for (auto& [id, watch] : exit_watches_) {
    boost::system::error_code ec;
    watch->cancel(ec);
  }
  exit_watches_.clear();
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
  return replace_file(config_.state_dir + "/id-ranges.json", ids_->to_json().dump(2));
}

void AgentService::load_workspaces() {
  // The desired state of this node's workspaces lives in KV; reconcile() squares it with runc.
  auto keys = workspaces_kv_->keys();
  if (!keys) return;
  for (const auto& key : *keys) {
    auto e = workspaces_kv_->get(key);
    if (!e || !e->has_value()) continue;
    cvm::v1::WorkspaceRecord r;
    if (!r.ParseFromString((*e)->value) || r.node_id() != config_.node_id) continue;
    Workspace ws;
    ws.record = r;
    ws.revision = (*e)->revision;
    ws.cpu_millicores = cpu_of(r.resources());
    ws.memory_bytes = memory_of(r.resources());
    workspaces_[r.workspace_id()] = std::move(ws);
  }
}

Status AgentService::put_workspace(Workspace& ws) {
  const auto& key = ws.record.workspace_id();
  const std::string value = ws.record.SerializeAsString();
  uint64_t expected = ws.revision;
  // Two tries at most: the second only over a record that still names this node.
  for (int attempt = 0;; ++attempt) {
    auto rev = expected == 0 ? workspaces_kv_->create(key, value)
                             : workspaces_kv_->update(key, value, expected);
    if (rev) {
      ws.revision = *rev;
      return {};
    }
    if (!rev.error().is_conflict() || attempt > 0) {
      spdlog::warn("cannot record workspace {}: {}", key, rev.error().message);
      return rev.error();
    }
    auto now = read_record(key);
    if (!now) {
      spdlog::warn("cannot record workspace {}: {}", key, now.error().message);
      return now.error();
    }
    if (!build_still_ours(now->record ? &*now->record : nullptr, now->revision, ws.revision,
                          config_.node_id, ws.record.build_id())) {
      spdlog::warn(
          "workspace {}: stale write refused (revision {} expected, {} now, by node {} for build "
          "{}); it is no longer this node's",
          key, ws.revision, now->revision, now->record->node_id(), now->record->build_id());
      return make_error(ErrorDomain::kConflict,
                        "workspace " + key + " belongs to node " + now->record->node_id() + " now");
    }
    expected = now->revision;
  }
}

Result<AgentService::KvRecord> AgentService::read_record(const std::string& workspace_id) {
  auto e = workspaces_kv_->get(workspace_id);
  if (!e) return e.error();
  KvRecord out;
  if (!e->has_value()) return out;
  out.revision = (*e)->revision;
  cvm::v1::WorkspaceRecord r;
  // An unreadable record names no node: it cannot show that the build moved.
  if (r.ParseFromString((*e)->value)) out.record = std::move(r);
  return out;
}

bool AgentService::still_ours(const cvm::v1::NodeAssignment& a, uint64_t expected_revision) {
  auto now = read_record(a.request().workspace_id());
  if (!now) return true;
  return build_still_ours(now->record ? &*now->record : nullptr, now->revision, expected_revision,
                          config_.node_id, a.request().build_id());
}

void AgentService::give_up_moved(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg,
                                 bool retry) {
  const std::string ws_id = a.request().workspace_id();
  if (retry) {
    spdlog::warn(
        "build {}: cannot tell from KV whether workspace {} is still this node's; nothing "
        "started, retrying later",
        a.request().build_id(), ws_id);
  } else {
    spdlog::warn(
        "build {}: workspace {} was placed on another node while this agent was away; removing "
        "what it started here and publishing nothing",
        a.request().build_id(), ws_id);
  }
  busy_.insert(ws_id);
  boost::asio::post(worker_, [this, a, msg, ws_id, retry] {
    (void)launcher_->stop(ws_id);
    Status removed = launcher_->remove(ws_id, true);
    boost::asio::post(io_, [this, a, msg, ws_id, removed, retry] {
      if (!removed) spdlog::error("{}", removed.error().message);
      busy_.erase(ws_id);
      // Retried: a workspace known here keeps its record and range (as before the assignment).
      const bool forget = !retry || !workspaces_.contains(ws_id);
      if (forget) {
        ids_->release(ws_id);
        if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
      }
      if (!retry) release_lease(ws_id, a.lease_id());
      if (!retry) workspaces_.erase(ws_id);
      remove_inflight(ws_id);
      if (msg) (void)(retry ? msg->nak(std::chrono::seconds(2)) : msg->ack());
      update_running_gauge();
      heartbeat();
    });
  });
}

void AgentService::release_lease(const std::string& workspace_id, const std::string& lease_id) {
  if (lease_id.empty()) return;
  cvm::v1::WorkspaceRecord r;
  r.set_workspace_id(workspace_id);
  r.set_lease_id(lease_id);
  release_gpus(r);
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
  std::vector<const Workspace*> counted;
  for (const auto& [id, ws] : workspaces_) {
    // Stopped workspaces keep their files but not their CPU and memory.
    if (ws.record.phase() == cvm::v1::RUNNING || busy_.contains(id)) {
      cpu += ws.cpu_millicores;
      mem += ws.memory_bytes;
      ++count;
      counted.push_back(&ws);
    }
  }
  // The builds that started them, the most recent first: the scheduler's hold for each is then
  // counted once, here (wire::kMaxAllocatedBuilds).
  const auto listed = std::min(counted.size(), static_cast<size_t>(wire::kMaxAllocatedBuilds));
  std::partial_sort(counted.begin(), counted.begin() + static_cast<std::ptrdiff_t>(listed),
                    counted.end(), [](const Workspace* a, const Workspace* b) {
                      return a->record.updated_unix_ms() > b->record.updated_unix_ms();
                    });
  for (size_t i = 0; i < listed; ++i) {
    auto* b = s.add_allocated_builds();
    b->set_build_id(counted[i]->record.build_id());
    b->set_cpu_millicores(counted[i]->cpu_millicores);
    b->set_memory_bytes(counted[i]->memory_bytes);
  }
  s.mutable_allocated()->set_cpu_millicores(cpu);
  s.mutable_allocated()->set_memory_bytes(mem);
  s.set_workspaces(count);
  s.set_heartbeat_unix_ms(clock_.now_unix_ms());
  s.set_started_unix_ms(started_ms_);
  if (gpu_monitor_) {
    for (auto& g : gpu_monitor_->snapshot()) *s.add_gpus() = std::move(g);
  }
  s.set_agent_version(std::string(kAgentVersion));
  return s;
}

void AgentService::export_session_counters() {
  if (!sessions_) return;
  const SessionCounters now = sessions_->counters();
  auto& last = meters_->exported;
  meters_->sessions_opened.Increment(static_cast<double>(now.opened - last.opened));
  meters_->sessions_refused.Increment(static_cast<double>(now.refused - last.refused));
  meters_->sessions_failed.Increment(static_cast<double>(now.failed - last.failed));
  meters_->session_bytes_in.Increment(static_cast<double>(now.bytes_in - last.bytes_in));
  meters_->session_bytes_out.Increment(static_cast<double>(now.bytes_out - last.bytes_out));
  meters_->sessions_open.Set(now.open);
  last = now;
}

void AgentService::heartbeat() {
  if (stopping_) return;
  export_session_counters();
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

cvm::v1::BuildEvent AgentService::event(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                                        cvm::v1::Reason reason, const std::string& message,
                                        const std::vector<std::string>& warnings) const {
  auto e = service::make_event(a.request().build_id(), a.request().workspace_id(), phase, clock_,
                               kSource);
  e.set_node_id(config_.node_id);
  e.set_reason(reason);
  e.set_message(message);
  for (const auto& w : warnings) e.add_warnings(w);
  for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
  return e;
}

void AgentService::publish(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                           cvm::v1::Reason reason, const std::string& message,
                           const std::vector<std::string>& warnings) {
  const auto e = event(a, phase, reason, message, warnings);
  if (auto ack = service::publish_event(*conn_, e); !ack) {
    spdlog::warn("cannot publish {} for build {}: {}", phase_name(phase), e.build_id(),
                 ack.error().message);
  }
}

void AgentService::publish_async(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                                 const std::string& message) {
  const auto e = event(a, phase, cvm::v1::REASON_UNSPECIFIED, message);
  bus::AsyncPublish options;
  options.msg_id = service::event_msg_id(e);
  conn_->js_publish_async(wire::build_events_subject(e.build_id()), e.SerializeAsString(), options,
                          [phase, build = e.build_id()](Result<bus::PubAck> ack) {
                            if (!ack) {
                              spdlog::warn("cannot publish {} for build {}: {}", phase_name(phase),
                                           build, ack.error().message);
                            }
                          });
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
  if (existing != workspaces_.end()) {
    const auto& rec = existing->second.record;
    if (rec.phase() == cvm::v1::RUNNING) {
      // A redelivered assignment, or a START of a workspace that already runs: launch once.
      auto state = runtime_->state(container_id(req.workspace_id()));
      if (state && state->status == ContainerStatus::kRunning) {
        const bool same = rec.build_id() == req.build_id();
        publish(a, cvm::v1::RUNNING, cvm::v1::REASON_UNSPECIFIED,
                same ? "" : "workspace was already running");
        (void)msg->ack();
        return;
      }
    } else if (rec.phase() == cvm::v1::FAILED && rec.build_id() == req.build_id()) {
      // This very build already failed (e.g. settled by reconcile after a crash): answer the
      // redelivery with the same outcome instead of launching.
      publish(a, cvm::v1::FAILED, rec.reason(), rec.message());
      (void)msg->ack();
      return;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto ids = ids_->allocate(req.workspace_id());
  if (!ids) {
    // Out of ranges: FAILED, unless the build is not this node's to answer (docs/reliability.md,
    // "Stale agent writes").
    auto current = read_record(req.workspace_id());
    if (!current) {
      (void)msg->nak(std::chrono::seconds(2));
      return;
    }
    if (build_still_ours(current->record ? &*current->record : nullptr, current->revision,
                         current->revision, config_.node_id, req.build_id())) {
      publish(a, cvm::v1::FAILED, cvm::v1::INSUFFICIENT_CAPACITY, ids.error().message);
    }
    (void)msg->ack();
    return;
  }
  // Persisted before use: a restarted agent must never hand this range out again.
  if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
  if (auto st = write_inflight(a); !st) spdlog::error("{}", st.error().message);
  const auto t_persisted = std::chrono::steady_clock::now();
  busy_.insert(req.workspace_id());
  const int64_t preparing_ms = clock_.now_unix_ms();
  auto ownership = std::make_shared<Ownership>();
  // The worker starts at once and prepares the rootfs while this thread reads whose the build is
  // (docs/reliability.md, "Stale agent writes"): the read is not on the launch path, and nothing
  // starts before its answer (the worker waits for it right before the runtime). The events stay in
  // order: PREPARING is handed to the connection before the answer is, STARTING and RUNNING (the
  // worker's) after it.
  const std::string cpuset = pin_cpus(req.workspace_id(), req.resources().cpu_millicores());
  launching_cpus_[req.workspace_id()] = cpuset;
  boost::asio::post(worker_, [this, a, ids = *ids, msg, t0, preparing_ms, ownership, cpuset] {
    auto result = launch(a, ids, ownership, preparing_ms, t0, cpuset);
    const auto t_launched = std::chrono::steady_clock::now();
    boost::asio::post(io_, [this, a, ids, msg, t0, t_launched, preparing_ms,
                            result = std::move(result)]() mutable {
      const auto t_io = std::chrono::steady_clock::now();
      launching_cpus_.erase(a.request().workspace_id());
      finish_start(a, ids, std::move(result), preparing_ms, msg);
      spdlog::debug(
          "build {}: received -> launched {:.1f} ms, to the io thread {:.2f} ms, bookkeeping "
          "{:.2f} ms",
          a.request().build_id(), ms_since(t0, t_launched), ms_since(t_launched, t_io),
          ms_since(t_io));
    });
    // Off the critical path (RUNNING is out): give the unpack's buffers back, so that an idle
    // agent stays small.
    ::malloc_trim(0);
  });
  const auto t_read = std::chrono::steady_clock::now();
  auto current = read_record(req.workspace_id());
  using O = Ownership::State;
  if (!current) {
    // Without the record the agent cannot tell whether the build is still its own.
    spdlog::warn("build {}: cannot read workspace {}: {}; retrying later", req.build_id(),
                 req.workspace_id(), current.error().message);
    ownership->set(O::kUnreadable, 0, t_read);
    return;
  }
  if (!build_still_ours(current->record ? &*current->record : nullptr, current->revision,
                        current->revision, config_.node_id, req.build_id())) {
    // A redelivery to a node that came back after the build was placed elsewhere.
    spdlog::warn("build {}: runs on node {} now; not launching it here", req.build_id(),
                 current->record->node_id());
    ownership->set(O::kMoved, current->revision, t_read);
    return;
  }
  publish_async(a, cvm::v1::PREPARING);
  ownership->set(O::kOurs, current->revision, t_read);
  spdlog::debug("build {}: ID range and in-flight record {:.2f} ms, ownership read {:.2f} ms",
                req.build_id(), ms_since(t0, t_persisted), ms_since(t_read));
}

AgentService::LaunchResult AgentService::launch(const cvm::v1::NodeAssignment& a, IdRange ids,
                                                const std::shared_ptr<Ownership>& ownership,
                                                int64_t preparing_ms,
                                                std::chrono::steady_clock::time_point t0,
                                                const std::string& cpuset) {
  const auto& req = a.request();
  LaunchResult out;
  out.received = t0;
  LaunchRequest r;
  r.workspace_id = req.workspace_id();
  r.build_id = req.build_id();
  r.image = req.image();
  r.cvm = a.cvm();
  r.caching = a.caching();
  r.auto_load_shiftfs = a.auto_load_shiftfs();
  // A CPU quota only when the request asks for one; capacity still counts 1 CPU (cpu_of).
  r.cpu_millicores = req.resources().cpu_millicores();
  r.cpuset = cpuset;
  r.memory_bytes = memory_of(req.resources());
  r.tun = req.options().tun();
  r.fuse = req.options().fuse();
  for (const auto& g : a.gpus()) r.gpus.push_back(AssignedGpu{g.minor(), g.uuid()});
  r.ids = ids;
  r.may_start = [&] { return !out.withdrawn; };
  out.outcome = launcher_->launch(r, [&](const std::string& rootfs_note) {
    // Right before the runtime (docs/reliability.md, "Stale agent writes"): the answer of the read
    // sent when the assignment came, or, when that is not fresh (a slow unpack, an agent frozen
    // past the node's TTL since), a new read on this thread. Withdrawn, the launcher starts nothing
    // and removes the bundle.
    std::chrono::steady_clock::time_point sent;
    const auto state = ownership->wait(out.revision, sent);
    if (state != Ownership::State::kOurs) {
      out.withdrawn = true;
      out.retry = state == Ownership::State::kUnreadable;
      return;
    }
    if (!ownership_read_fresh(std::chrono::steady_clock::now() - sent) &&
        !still_ours(a, out.revision)) {
      out.withdrawn = true;
      return;
    }
    out.starting_ms = clock_.now_unix_ms();
    // Which rootfs path was taken (ID-mapped overlay of the node cache, or an unpack). Not
    // awaited: RUNNING or FAILED, handed to the connection later, still come after it.
    publish_async(a, cvm::v1::STARTING, rootfs_note);
  });
  if (!out.withdrawn && out.starting_ms == 0) {
    // Failed before the runtime: only a build that is still this node's gets FAILED from here.
    std::chrono::steady_clock::time_point sent;
    if (const auto state = ownership->wait(out.revision, sent); state != Ownership::State::kOurs) {
      out.withdrawn = true;
      out.retry = state == Ownership::State::kUnreadable;
    }
  }
  if (out.withdrawn) return out;  // finish_start removes the rest (give_up_moved)
  if (!runtime_info_.sysbox()) {
    out.outcome.warnings.push_back(
        "sysbox-runc is not installed on " + config_.node_id +
        ": the workspace runs under runc with a user namespace and an exclusive ID range");
  }
  if (!out.outcome.ok) return out;  // the io thread records and publishes FAILED
  // RUNNING from this thread, without a hop to the io thread: the record first, by
  // compare-and-set (whoever sees RUNNING, a STOP right after it, finds where the workspace runs;
  // a build that moved meanwhile is refused and given up), then the acknowledged event. The io
  // thread does the bookkeeping after it, and removes the in-flight record: an agent killed
  // before that adopts the running container on restart (RUNNING deduped by its msg-id).
  const std::vector<std::pair<cvm::v1::Phase, int64_t>> phases = {
      {cvm::v1::PREPARING, preparing_ms},
      {cvm::v1::STARTING, out.starting_ms},
      {cvm::v1::RUNNING, clock_.now_unix_ms()}};
  Workspace ws = outcome_record(a, ids, out.outcome, phases, out.revision);
  ws.record.set_cpuset(cpuset);
  if (auto st = put_workspace(ws); !st && st.error().is_conflict()) {
    out.withdrawn = true;  // refused by revision: the build runs elsewhere
    return out;
  }
  // Written, or not for another reason (KV unreachable): the outcome is this node's either way.
  publish(a, cvm::v1::RUNNING, cvm::v1::REASON_UNSPECIFIED, "", out.outcome.warnings);
  meters_->launch_seconds.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  out.recorded = std::move(ws);
  return out;
}

std::string AgentService::pin_cpus(const std::string& workspace_id, uint64_t millicores) const {
  std::vector<std::vector<int>> pinned;
  auto add = [&](const std::string& id, const std::string& list) {
    if (id == workspace_id || list.empty()) return;
    if (auto cpus = parse_cpu_list(list)) pinned.push_back(std::move(*cpus));
  };
  for (const auto& [id, ws] : workspaces_) {
    if (ws.record.phase() == cvm::v1::RUNNING) add(id, ws.record.cpuset());
  }
  for (const auto& [id, list] : launching_cpus_) add(id, list);
  return format_cpu_list(choose_cpus(node_cpus_, millicores, pinned));
}

AgentService::Workspace AgentService::outcome_record(
    const cvm::v1::NodeAssignment& a, IdRange ids, const LaunchOutcome& outcome,
    const std::vector<std::pair<cvm::v1::Phase, int64_t>>& phases,
    uint64_t expected_revision) const {
  const auto& req = a.request();
  Workspace ws;
  ws.revision = expected_revision;
  auto& r = ws.record;
  r.set_workspace_id(req.workspace_id());
  r.set_node_id(config_.node_id);
  r.set_build_id(req.build_id());
  r.set_phase(outcome.ok ? cvm::v1::RUNNING : cvm::v1::FAILED);
  r.set_desired(cvm::v1::START);
  r.set_image(req.image());
  r.set_owner(req.owner());
  *r.mutable_resources() = req.resources();
  r.set_container_id(container_id(req.workspace_id()));
  r.set_cvm(a.cvm());
  r.set_caching(a.caching());
  r.set_runtime(a.cvm() ? runtime_info_.runtime() : "runc");
  r.set_updated_unix_ms(clock_.now_unix_ms());
  for (const auto& [phase, ms] : phases) {
    auto* t = r.add_phase_times();
    t->set_phase(phase);
    t->set_unix_ms(ms);
  }
  if (outcome.ok) {
    r.set_uid_base(ids.base);
    r.set_uid_count(ids.count);
    r.set_lease_id(a.lease_id());
    for (const auto& g : a.gpus()) r.add_gpu_uuids(g.uuid());
  } else {
    r.set_reason(outcome.reason);
    r.set_message(outcome.message);
  }
  ws.cpu_millicores = cpu_of(req.resources());
  ws.memory_bytes = memory_of(req.resources());
  return ws;
}

Status AgentService::record_outcome(const cvm::v1::NodeAssignment& a, IdRange ids,
                                    const LaunchOutcome& outcome,
                                    const std::vector<std::pair<cvm::v1::Phase, int64_t>>& phases,
                                    uint64_t expected_revision) {
  Workspace ws = outcome_record(a, ids, outcome, phases, expected_revision);
  if (auto st = put_workspace(ws); !st && st.error().is_conflict()) return st;
  // Written, or not for another reason (KV unreachable): the outcome is this node's either way.
  workspaces_[a.request().workspace_id()] = ws;
  return {};
}

void AgentService::finish_start(const cvm::v1::NodeAssignment& a, IdRange ids, LaunchResult result,
                                int64_t preparing_ms, const bus::JsMessagePtr& msg) {
  const auto& req = a.request();
  const auto& outcome = result.outcome;
  busy_.erase(req.workspace_id());
  if (result.withdrawn) return give_up_moved(a, msg, result.retry);
  if (result.recorded) {
    // Recorded and RUNNING published by the worker (launch()).
    workspaces_[req.workspace_id()] = std::move(*result.recorded);
    remove_inflight(req.workspace_id());
    meters_->launched.Increment();
    update_running_gauge();
    spdlog::info("build {}: workspace {} RUNNING as {} ({}, pid {}, uid base {})", req.build_id(),
                 req.workspace_id(), container_id(req.workspace_id()),
                 a.cvm() ? "CVM" : "plain container", outcome.pid, ids.base);
    watch_exit(req.workspace_id(), req.build_id(), outcome.pid);
    (void)msg->ack();
    heartbeat();
    return;
  }
  meters_->launch_seconds.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - result.received).count());
  std::vector<std::pair<cvm::v1::Phase, int64_t>> phases = {{cvm::v1::PREPARING, preparing_ms}};
  if (result.starting_ms != 0) phases.emplace_back(cvm::v1::STARTING, result.starting_ms);
  phases.emplace_back(cvm::v1::FAILED, clock_.now_unix_ms());
  meters_->failed.Increment();
  ids_->release(req.workspace_id());
  if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
  release_lease(req.workspace_id(), a.lease_id());
  if (auto st = record_outcome(a, ids, outcome, phases, result.revision); !st) {
    return give_up_moved(a, msg);
  }
  remove_inflight(req.workspace_id());
  spdlog::warn("build {} FAILED {}: {}", req.build_id(), cvm::v1::Reason_Name(outcome.reason),
               outcome.message);
  publish(a, cvm::v1::FAILED, outcome.reason, outcome.message, outcome.warnings);
  (void)msg->ack();
  heartbeat();  // report the freed capacity now
}

void AgentService::update_running_gauge() {
  size_t running = 0;
  for (const auto& [wid, ws] : workspaces_) running += ws.record.phase() == cvm::v1::RUNNING;
  meters_->running.Set(static_cast<double>(running));
}

void AgentService::handle_stop(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg,
                               bool remove) {
  const auto& req = a.request();
  busy_.insert(req.workspace_id());
  unwatch_exit(req.workspace_id());  // this end is asked for: STOPPED comes from here
  if (sessions_)
    sessions_->end_workspace(req.workspace_id(),
                             "workspace " + req.workspace_id() + " is stopping");
  const int64_t stopping_ms = clock_.now_unix_ms();
  publish(a, cvm::v1::STOPPING);
  boost::asio::post(worker_, [this, a, msg, remove, stopping_ms] {
    const auto& ws_id = a.request().workspace_id();
    // Stopping what is already gone is success: STOP then DELETE, or a redelivered STOP.
    Status st = launcher_->stop(ws_id);
    if (st) st = launcher_->remove(ws_id, remove);
    boost::asio::post(io_, [this, a, msg, st, remove, stopping_ms] {
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
        // The rootfs is gone with the workspace's directory; its ID range is free again.
        ids_->release(req.workspace_id());
        if (auto s = save_id_ranges(); !s) spdlog::error("{}", s.error().message);
        workspaces_.erase(req.workspace_id());
        (void)workspaces_kv_->erase(req.workspace_id());
      } else if (it != workspaces_.end()) {
        auto& r = it->second.record;
        r.set_phase(cvm::v1::STOPPED);
        r.set_desired(cvm::v1::STOP);
        r.set_build_id(req.build_id());
        r.set_updated_unix_ms(clock_.now_unix_ms());
        r.clear_phase_times();
        auto* t1 = r.add_phase_times();
        t1->set_phase(cvm::v1::STOPPING);
        t1->set_unix_ms(stopping_ms);
        auto* t2 = r.add_phase_times();
        t2->set_phase(cvm::v1::STOPPED);
        t2->set_unix_ms(clock_.now_unix_ms());
        (void)put_workspace(it->second);  // a refusal is logged: the record is another node's
      }
      meters_->stopped.Increment();
      update_running_gauge();
      spdlog::info("build {}: workspace {} {}", req.build_id(), req.workspace_id(),
                   remove ? "deleted" : "stopped");
      publish(a, cvm::v1::STOPPED);
      (void)msg->ack();
      heartbeat();
    });
  });
}

Status AgentService::write_inflight(const cvm::v1::NodeAssignment& a) {
  return replace_file(config_.state_dir + "/inflight/" + a.request().workspace_id() + ".pb",
                      a.SerializeAsString());
}

void AgentService::remove_inflight(const std::string& workspace_id) {
  std::error_code ec;
  fs::remove(config_.state_dir + "/inflight/" + workspace_id + ".pb", ec);
}

std::map<std::string, cvm::v1::NodeAssignment> AgentService::read_inflight() {
  std::map<std::string, cvm::v1::NodeAssignment> out;
  std::error_code ec;
  for (fs::directory_iterator it(config_.state_dir + "/inflight", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    if (it->path().extension() != ".pb") {
      fs::remove(it->path(), ec);  // a .tmp of a write that never finished
      continue;
    }
    std::ifstream in(it->path(), std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    cvm::v1::NodeAssignment a;
    if (!a.ParseFromString(bytes.str()) || !wire::is_valid_id(a.request().workspace_id())) {
      spdlog::warn("dropping unreadable in-flight record {}", it->path().string());
      fs::remove(it->path(), ec);
      continue;
    }
    out[a.request().workspace_id()] = std::move(a);
  }
  return out;
}

void AgentService::reconcile() {
  auto listed = runtime_->list();
  if (!listed) {
    spdlog::error("reconcile: runc list failed ({}); leaving state as it is",
                  listed.error().message);
    return;
  }
  std::map<std::string, ContainerState> containers;
  for (auto& c : *listed) containers[c.id] = c;
  const auto running = [&](const std::string& ws) {
    auto it = containers.find(container_id(ws));
    return it != containers.end() && it->second.status == ContainerStatus::kRunning ? it->second.pid
                                                                                    : 0;
  };
  std::set<std::string> keep;  // workspaces whose container and files stay

  // 1. Launches a killed agent left unfinished: adopt what got to RUNNING, fail the rest.
  for (auto& [ws_id, a] : read_inflight()) {
    const auto& req = a.request();
    // Returning agent (docs/reliability.md): the scheduler may have placed the build on another
    // node while this agent was away. Then nothing of it is this node's to settle: clean up and say
    // nothing.
    uint64_t expected = 0;
    if (auto now = read_record(ws_id); now) {
      expected = now->revision;
      if (!build_still_ours(now->record ? &*now->record : nullptr, expected, expected,
                            config_.node_id, req.build_id())) {
        spdlog::warn(
            "reconcile: build {} of workspace {} runs on node {} now; removing what this "
            "node started for it, publishing nothing",
            req.build_id(), ws_id, now->record->node_id());
        (void)launcher_->stop(ws_id);
        if (auto st = launcher_->remove(ws_id, true); !st) spdlog::error("{}", st.error().message);
        ids_->release(ws_id);
        release_lease(ws_id, a.lease_id());
        workspaces_.erase(ws_id);
        remove_inflight(ws_id);
        continue;
      }
    } else if (auto it = workspaces_.find(ws_id); it != workspaces_.end()) {
      expected = it->second.revision;  // KV unreadable: the compare-and-set still guards
    }
    auto ids = ids_->find(ws_id);
    LaunchOutcome outcome;
    int pid = running(ws_id);
    if (pid > 0 && ids) {
      if (a.cvm()) {
        // A supervisor at "created" waits for a network the killed agent never gave it: the
        // launch is not finished, so it is failed (and removed) like any other.
        auto status = launcher_->wait_ready(ws_id, pid, config_.ready_timeout,
                                            /*until_created=*/true);
        if (status && status->state == SupervisorStatus::State::kRunning) {
          outcome.ok = true;
        } else if (status && status->state == SupervisorStatus::State::kCreated) {
          outcome.message = "its network was never attached";
        } else {
          outcome.message =
              status ? "the workspace's init exited during the launch" : status.error().message;
        }
      } else {
        outcome.ok = true;
      }
      outcome.pid = pid;
    }
    if (!outcome.ok) {
      outcome.reason = cvm::v1::RUNTIME_ERROR;
      outcome.message = "the node agent restarted during the launch" +
                        (outcome.message.empty() ? "" : ": " + outcome.message) +
                        "; nothing of it was kept";
      (void)launcher_->stop(ws_id);
      if (auto st = launcher_->remove(ws_id, true); !st) spdlog::error("{}", st.error().message);
      ids_->release(ws_id);
      // Persisted before FAILED is published: whoever reacts to it finds the range free.
      if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
    } else {
      keep.insert(ws_id);
    }
    std::vector<std::pair<cvm::v1::Phase, int64_t>> phases = {
        {outcome.ok ? cvm::v1::RUNNING : cvm::v1::FAILED, clock_.now_unix_ms()}};
    if (auto st = record_outcome(a, ids.value_or(IdRange{}), outcome, phases, expected); !st) {
      // Moved between the read above and this write.
      spdlog::warn("reconcile: build {} of workspace {} moved to another node; publishing nothing",
                   req.build_id(), ws_id);
      (void)launcher_->stop(ws_id);
      (void)launcher_->remove(ws_id, true);
      ids_->release(ws_id);
      keep.erase(ws_id);
      workspaces_.erase(ws_id);
      remove_inflight(ws_id);
      continue;
    }
    remove_inflight(ws_id);
    spdlog::warn("reconcile: build {} of workspace {} {} after a restart", req.build_id(), ws_id,
                 outcome.ok ? "is RUNNING" : "FAILED");
    if (outcome.ok) {
      meters_->launched.Increment();
      publish(a, cvm::v1::RUNNING);
    } else {
      meters_->failed.Increment();
      publish(a, cvm::v1::FAILED, outcome.reason, outcome.message);
    }
  }

  // 2. Desired state in KV against what runs: adopt, or report lost.
  for (auto& [ws_id, ws] : workspaces_) {
    auto& r = ws.record;
    if (keep.contains(ws_id)) continue;
    if (r.phase() != cvm::v1::RUNNING) {
      keep.insert(ws_id);  // stopped (files kept) or failed (nothing there): nothing to adopt
      continue;
    }
    if (const int pid = running(ws_id); pid > 0) {
      keep.insert(ws_id);
      spdlog::info("reconcile: adopted running workspace {} ({})", ws_id, container_id(ws_id));
      watch_exit(ws_id, r.build_id(), pid);
      continue;
    }
    // Gone while the agent was away (node reboot, killed by hand): say so in its record.
    (void)launcher_->remove(ws_id, false);
    r.set_phase(cvm::v1::FAILED);
    r.set_reason(cvm::v1::NODE_LOST);
    r.set_message("container " + container_id(ws_id) +
                  " was no longer running when the node agent restarted");
    r.set_updated_unix_ms(clock_.now_unix_ms());
    auto* t = r.add_phase_times();
    t->set_phase(cvm::v1::FAILED);
    t->set_unix_ms(r.updated_unix_ms());
    (void)put_workspace(ws);
    keep.insert(ws_id);  // its files and range stay for a later START or DELETE
    meters_->lost.Increment();
    spdlog::warn("reconcile: workspace {} lost: {}", ws_id, r.message());
  }

  // 3. Orphans: containers, directories and ID ranges that no workspace accounts for.
  for (const auto& [id, c] : containers) {
    if (id.rfind("cvm-", 0) != 0 || keep.contains(id.substr(4))) continue;
    spdlog::warn("reconcile: removing orphan container {} ({})", id, to_string(c.status));
    (void)runtime_->remove(id, true);
    meters_->orphans.Increment();
  }
  // Network attachments of workspaces that no longer run (addresses, NAT rules, pinned namespaces).
  if (network_ != nullptr) {
    for (const auto& ws_id : network_->attached()) {
      if (keep.contains(ws_id) && running(ws_id) > 0) continue;
      spdlog::warn("reconcile: releasing the network of {}", ws_id);
      if (auto st = network_->detach(ws_id); !st) spdlog::error("{}", st.error().message);
    }
  }
  std::error_code ec;
  for (fs::directory_iterator it(config_.state_dir + "/workspaces", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string ws_id = it->path().filename().string();
    if (keep.contains(ws_id)) continue;
    spdlog::warn("reconcile: removing orphan workspace directory {}", it->path().string());
    if (auto st = remove_tree(it->path().string()); !st) spdlog::error("{}", st.error().message);
    meters_->orphans.Increment();
  }
  const auto saved = ids_->to_json();
  for (const auto& [ws_id, range] : saved["ranges"].items()) {
    if (keep.contains(ws_id)) continue;
    spdlog::warn("reconcile: releasing the ID range of {}", ws_id);
    ids_->release(ws_id);
  }
  if (auto st = save_id_ranges(); !st) spdlog::error("{}", st.error().message);
  update_running_gauge();
}

void AgentService::watch_exit(const std::string& workspace_id, const std::string& build_id,
                              int pid) {
  unwatch_exit(workspace_id);
  if (pid <= 0) return;
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    if (errno == ESRCH) {
      // Gone already, between the launch and now.
      boost::asio::post(io_, [this, workspace_id, build_id] { on_exit(workspace_id, build_id); });
    } else {
      spdlog::warn(
          "workspace {}: cannot watch its init (pidfd_open: {}); its end is seen only "
          "on the next STOP or restart",
          workspace_id, std::strerror(errno));
    }
    return;
  }
  auto watch = std::make_unique<boost::asio::posix::stream_descriptor>(io_, fd);
  auto* raw = watch.get();
  exit_watches_[workspace_id] = std::move(watch);
  // A pidfd turns readable when the process exits.
  raw->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                  [this, workspace_id, build_id, raw](const boost::system::error_code& ec) {
                    if (ec == boost::asio::error::operation_aborted) return;
                    auto it = exit_watches_.find(workspace_id);
                    if (it == exit_watches_.end() || it->second.get() != raw) return;
                    exit_watches_.erase(it);
                    on_exit(workspace_id, build_id);
                  });
}

void AgentService::unwatch_exit(const std::string& workspace_id) {
  auto it = exit_watches_.find(workspace_id);
  if (it == exit_watches_.end()) return;
  boost::system::error_code ec;
  it->second->cancel(ec);
  it->second->close(ec);
  exit_watches_.erase(it);
}

void AgentService::on_exit(const std::string& workspace_id, const std::string& build_id) {
  if (stopping_) return;
  auto it = workspaces_.find(workspace_id);
  // A STOP, DELETE or new START is under way, or the record moved on: theirs to report.
  if (busy_.contains(workspace_id) || it == workspaces_.end() ||
      it->second.record.phase() != cvm::v1::RUNNING || it->second.record.build_id() != build_id) {
    return;
  }
  busy_.insert(workspace_id);
  if (sessions_) sessions_->end_workspace(workspace_id, "workspace " + workspace_id + " stopped");
  boost::asio::post(worker_, [this, workspace_id, build_id] {
    const InitExit how = launcher_->exit_report(workspace_id);
    // The container is gone; remove what runc keeps of it and unmount, keeping the files (a
    // START afterwards works as after a STOP).
    Status removed = launcher_->remove(workspace_id, false);
    boost::asio::post(io_, [this, workspace_id, build_id, how, removed] {
      busy_.erase(workspace_id);
      if (!removed) spdlog::error("workspace {}: {}", workspace_id, removed.error().message);
      auto it = workspaces_.find(workspace_id);
      if (it == workspaces_.end() || it->second.record.build_id() != build_id) return;
      auto& ws = it->second;
      auto& r = ws.record;
      release_gpus(r);
      r.clear_gpu_uuids();
      r.clear_lease_id();
      const int64_t now = clock_.now_unix_ms();
      r.set_phase(how.shutdown ? cvm::v1::STOPPED : cvm::v1::FAILED);
      if (how.shutdown) {
        r.set_desired(cvm::v1::STOP);
        r.clear_reason();
        r.clear_message();
      } else {
        r.set_reason(cvm::v1::RUNTIME_ERROR);
        r.set_message(how.message);
      }
      r.set_updated_unix_ms(now);
      auto* t = r.add_phase_times();
      t->set_phase(r.phase());
      t->set_unix_ms(now);
      (void)put_workspace(ws);  // a refusal is logged: the record is another node's
      cvm::v1::NodeAssignment a;
      a.mutable_request()->set_workspace_id(workspace_id);
      a.mutable_request()->set_build_id(build_id);
      if (how.shutdown) {
        spdlog::info("build {}: workspace {} shut down from inside: STOPPED", build_id,
                     workspace_id);
        meters_->stopped.Increment();
        publish(a, cvm::v1::STOPPED, cvm::v1::REASON_UNSPECIFIED,
                "the workspace was shut down from inside");
      } else {
        spdlog::warn("build {}: workspace {} FAILED: {}", build_id, workspace_id, how.message);
        meters_->failed.Increment();
        publish(a, cvm::v1::FAILED, cvm::v1::RUNTIME_ERROR, how.message);
      }
      update_running_gauge();
      heartbeat();  // the freed capacity, now
    });
  });
}

void AgentService::release_gpus(const cvm::v1::WorkspaceRecord& record) {
  if (record.lease_id().empty()) return;
  cvm::v1::GpuReleaseRequest rel;
  rel.set_workspace_id(record.workspace_id());
  rel.set_lease_id(record.lease_id());
  // Not awaited: a blocking request would stall the io thread (heartbeats, every other
  // workspace) for up to 2 s when the broker is slow or gone.
  conn_->request_async(
      wire::gpu_release_subject(config_.node_id), rel.SerializeAsString(), std::chrono::seconds(2),
      [lease = record.lease_id(), ws = record.workspace_id()](Result<bus::Message> reply) {
        if (reply) return;
        // The broker's reconcile reclaims leases of workspaces no longer running.
        spdlog::warn("GPU lease {} of {} not released now: {}", lease, ws, reply.error().message);
      });
}

}  // namespace cvm::agent
