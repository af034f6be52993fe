#include "cvm/fleetsim/fleet.h"

#include <algorithm>
#include <memory>
#include <utility>

#include <spdlog/spdlog.h>

#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/build.pb.h"

namespace cvm::fleetsim {

namespace {

constexpr std::string_view kSource = "fleet-sim";
constexpr std::chrono::milliseconds kTick{50};
constexpr uint64_t kGiB = 1ULL << 30;

uint64_t cpu_of(const cvm::v1::Resources& r) {
  return r.cpu_millicores() == 0 ? 1000 : r.cpu_millicores();
}
uint64_t memory_of(const cvm::v1::Resources& r) {
  return r.memory_bytes() == 0 ? 512ULL << 20 : r.memory_bytes();
}

std::string kv_subject(std::string_view bucket, std::string_view key) {
  return "$KV." + std::string(bucket) + "." + std::string(key);
}

}  // namespace

std::vector<Profile> default_profiles() {
  std::vector<Profile> p;
  p.push_back({.name = "vm-idmapped", .weight = 50});
  p.push_back({.name = "vm-shiftfs", .weight = 15, .shiftfs = true, .idmapped_mounts = false});
  p.push_back({.name = "vm-no-headers", .weight = 10, .kernel_headers = false});
  p.push_back({.name = "metal-gpu",
               .weight = 10,
               .cpu_millicores = 64'000,
               .memory_bytes = 256 * kGiB,
               .bare_metal = true,
               .gpus = 8,
               .gpu_memory_bytes = 80 * kGiB});
  p.push_back({.name = "selinux-enforcing",
               .weight = 8,
               .selinux_enabled = true,
               .selinux_enforcing = true});
  p.push_back({.name = "selinux-permissive", .weight = 4, .selinux_enabled = true});
  p.push_back({.name = "runtime-not-ready", .weight = 3, .runtime_ready = false});
  return p;
}

Fleet::Fleet(boost::asio::io_context& io, bus::ConnectionPtr conn, const Clock& clock,
             FleetConfig config)
    : io_(io), conn_(std::move(conn)), clock_(clock), config_(std::move(config)), tick_timer_(io) {}

Fleet::~Fleet() { stop(); }

Status Fleet::start() {
  stopped_ = false;
  if (auto st = service::ensure_streams(*conn_); !st) return st;
  for (const auto& b : {service::nodes_bucket(), service::workspaces_bucket()}) {
    if (auto kv = conn_->ensure_kv(b); !kv) return kv.error();
  }
  uint32_t total_weight = 0;
  for (const auto& p : config_.profiles) total_weight += p.weight;
  if (total_weight == 0) return make_error(ErrorDomain::kInvalid, "profiles have no weight");

  const int64_t now = clock_.now_unix_ms();
  for (int i = 0; i < config_.nodes; ++i) {
    // Profiles are interleaved by weight, so any prefix of the fleet has the same mix.
    uint32_t pick = static_cast<uint32_t>((static_cast<uint64_t>(i) * 7919) % total_weight);
    const Profile* profile = &config_.profiles.front();
    for (const auto& p : config_.profiles) {
      if (pick < p.weight) {
        profile = &p;
        break;
      }
      pick -= p.weight;
    }
    auto node = std::make_unique<Node>();
    auto& s = node->status;
    s.set_node_id(config_.prefix + "-" + std::to_string(i));
    auto* host = s.mutable_host();
    host->set_kernel_version("6.1.0-sim");
    host->set_selinux_enabled(profile->selinux_enabled || profile->selinux_enforcing);
    host->set_selinux_enforcing(profile->selinux_enforcing);
    host->set_shiftfs_loaded(profile->shiftfs);
    host->set_idmapped_mounts(profile->idmapped_mounts);
    host->set_kernel_headers(profile->kernel_headers);
    host->set_bare_metal(profile->bare_metal);
    if (!profile->bare_metal) host->set_virtualization("simulated VM");
    auto* rt = s.mutable_runtime();
    rt->set_runtime("sysbox-runc");
    rt->set_sysbox(true);
    rt->set_ready(profile->runtime_ready);
    rt->set_detail("simulated by cvm-fleet-sim");
    s.mutable_capacity()->set_cpu_millicores(profile->cpu_millicores);
    s.mutable_capacity()->set_memory_bytes(profile->memory_bytes);
    for (uint32_t g = 0; g < profile->gpus; ++g) {
      auto* gpu = s.add_gpus();
      gpu->set_uuid("GPU-" + s.node_id() + "-" + std::to_string(g));
      gpu->set_name("Simulated H100");
      gpu->set_vendor(cvm::v1::NVIDIA);
      gpu->set_memory_bytes(profile->gpu_memory_bytes);
      gpu->set_minor(g);
      gpu->set_healthy(true);
    }
    s.set_started_unix_ms(now);
    s.set_agent_version("fleet-sim");
    Node* raw = node.get();
    if (config_.per_node_subscriptions) {
      auto sub = conn_->subscribe(wire::node_work_subject(s.node_id()), "",
                                  [this, raw](bus::Message m) { on_work(*raw, m); });
      if (!sub) return sub.error();
      node->sub = std::move(*sub);
    }
    by_id_[s.node_id()] = raw;
    nodes_.push_back(std::move(node));
    heartbeat(*raw);
  }
  if (!config_.per_node_subscriptions) {
    auto sub = conn_->subscribe(std::string(wire::kNodeWorkWildcard), "", [this](bus::Message m) {
      // cvm.v1.node.<id>.work
      constexpr std::string_view kPrefix = "cvm.v1.node.";
      const std::string_view subject(m.subject);
      const auto end = subject.rfind('.');
      if (!subject.starts_with(kPrefix) || end == std::string_view::npos || end < kPrefix.size()) {
        ++stats_.bad_messages;
        return;
      }
      auto it = by_id_.find(std::string(subject.substr(kPrefix.size(), end - kPrefix.size())));
      if (it == by_id_.end()) return;  // another fleet's node
      on_work(*it->second, m);
    });
    if (!sub) return sub.error();
    shared_sub_ = std::move(*sub);
  }
  if (auto st = conn_->flush(std::chrono::seconds(30)); !st) return st;
  tick_timer_.expires_after(kTick);
  tick_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) tick();
  });
  spdlog::info("fleet-sim: {} nodes registered and subscribed", nodes_.size());
  return {};
}

void Fleet::stop() {
  stopped_ = true;
  tick_timer_.cancel();
  shared_sub_.reset();
  for (auto& n : nodes_) n->sub.reset();
}

void Fleet::kill(const std::string& node_id) {
  if (auto it = by_id_.find(node_id); it != by_id_.end()) it->second->dead = true;
}

std::vector<std::string> Fleet::node_ids() const {
  std::vector<std::string> out;
  out.reserve(nodes_.size());
  for (const auto& n : nodes_) out.push_back(n->status.node_id());
  return out;
}

std::vector<std::string> Fleet::launched_on(const std::string& node_id) const {
  std::vector<std::string> out;
  auto it = by_id_.find(node_id);
  if (it == by_id_.end()) return out;
  for (const auto& [ws, w] : it->second->workspaces) out.push_back(w.build_id);
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<std::string> Fleet::node_of_build(const std::string& build_id) const {
  auto it = build_node_.find(build_id);
  if (it == build_node_.end()) return std::nullopt;
  return it->second;
}

void Fleet::tick() {
  if (stopped_) return;
  // Spread heartbeats over the interval: each tick writes its share, round robin.
  const size_t n = nodes_.size();
  const size_t per_tick = n == 0 ? 0
                                 : static_cast<size_t>((n * static_cast<size_t>(kTick.count()) +
                                                        config_.heartbeat_interval.count() - 1) /
                                                       config_.heartbeat_interval.count());
  for (size_t i = 0; i < per_tick && n > 0; ++i) {
    heartbeat(*nodes_[next_heartbeat_ % n]);
    ++next_heartbeat_;
  }
  tick_timer_.expires_after(kTick);
  tick_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) tick();
  });
}

void Fleet::heartbeat(Node& node) {
  if (node.dead) return;
  auto& s = node.status;
  s.mutable_allocated()->set_cpu_millicores(node.used_cpu);
  s.mutable_allocated()->set_memory_bytes(node.used_memory);
  s.set_workspaces(static_cast<uint32_t>(node.workspaces.size()));
  // As the agent does: which builds `allocated` counts (the simulated node counts a build from
  // its assignment on), the most recent first, at most wire::kMaxAllocatedBuilds, so that the
  // scheduler drops its own hold for them.
  std::vector<const Workspace*> recent;
  recent.reserve(node.workspaces.size());
  for (const auto& [ws_id, ws] : node.workspaces) recent.push_back(&ws);
  const auto listed = std::min(recent.size(), static_cast<size_t>(wire::kMaxAllocatedBuilds));
  std::partial_sort(recent.begin(), recent.begin() + static_cast<std::ptrdiff_t>(listed),
                    recent.end(),
                    [](const Workspace* a, const Workspace* b) { return a->seq > b->seq; });
  s.clear_allocated_builds();
  for (size_t i = 0; i < listed; ++i) {
    auto* b = s.add_allocated_builds();
    b->set_build_id(recent[i]->build_id);
    b->set_cpu_millicores(recent[i]->cpu);
    b->set_memory_bytes(recent[i]->memory);
  }
  s.set_heartbeat_unix_ms(clock_.now_unix_ms());
  if (conn_->publish(kv_subject(wire::kBucketNodes, s.node_id()), s.SerializeAsString())) {
    ++stats_.heartbeats;
  }
}

void Fleet::event(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase, cvm::v1::Reason reason,
                  const std::string& message) {
  auto e = service::make_event(a.request().build_id(), a.request().workspace_id(), phase, clock_,
                               kSource);
  e.set_node_id(a.node_id());
  e.set_reason(reason);
  e.set_message(message);
  for (const auto& g : a.gpus()) e.add_gpu_uuids(g.uuid());
  // The msg-id makes CVM_EVENTS keep one copy per phase, as the agent's events do.
  (void)conn_->publish(wire::build_events_subject(e.build_id()), e.SerializeAsString(),
                       {{"Nats-Msg-Id", service::event_msg_id(e)}});
}

void Fleet::on_work(Node& node, const bus::Message& m) {
  cvm::v1::NodeAssignment a;
  if (!a.ParseFromString(m.data) || a.node_id() != node.status.node_id()) {
    ++stats_.bad_messages;
    return;
  }
  if (node.dead) {
    ++stats_.ignored_dead;
    return;
  }
  ++stats_.assignments;
  const auto& req = a.request();
  if (req.transition() == cvm::v1::STOP || req.transition() == cvm::v1::DELETE) {
    if (auto it = node.workspaces.find(req.workspace_id()); it != node.workspaces.end()) {
      node.used_cpu -= it->second.cpu;
      node.used_memory -= it->second.memory;
      node.workspaces.erase(it);
    }
    ++stats_.stopped;
    event(a, cvm::v1::STOPPED, cvm::v1::REASON_UNSPECIFIED, "");
    if (config_.heartbeat_on_change) heartbeat(node);
    return;
  }
  if (auto it = node.workspaces.find(req.workspace_id()); it != node.workspaces.end()) {
    if (it->second.build_id == req.build_id()) ++stats_.duplicate_launches;
    return;  // a repeat: the first delivery reports the outcome
  }
  if (auto it = build_node_.find(req.build_id()); it != build_node_.end()) {
    // Legitimate only when the first node was lost before it ran the build.
    if (!by_id_.at(it->second)->dead) ++stats_.launched_twice;
  }
  const uint64_t cpu = cpu_of(req.resources());
  const uint64_t mem = memory_of(req.resources());
  const auto& cap = node.status.capacity();
  if (node.used_cpu + cpu > cap.cpu_millicores() || node.used_memory + mem > cap.memory_bytes()) {
    ++stats_.over_capacity;
    spdlog::error("fleet-sim: {} asked to run build {} beyond its capacity", node.status.node_id(),
                  req.build_id());
    event(a, cvm::v1::FAILED, cvm::v1::INSUFFICIENT_CAPACITY, "simulated node is full");
    return;
  }
  node.used_cpu += cpu;
  node.used_memory += mem;
  node.workspaces[req.workspace_id()] = Workspace{req.build_id(), cpu, mem, false, ++launches_};
  build_node_[req.build_id()] = node.status.node_id();
  if (config_.progress_events) event(a, cvm::v1::PREPARING, cvm::v1::REASON_UNSPECIFIED, "");
  auto timer = std::make_shared<boost::asio::steady_timer>(io_, config_.launch_delay);
  timer->async_wait(
      [this, timer, node_id = node.status.node_id(), a](const boost::system::error_code& ec) {
        if (!ec && !stopped_) launched(node_id, a);
      });
}

void Fleet::launched(const std::string& node_id, const cvm::v1::NodeAssignment& a) {
  Node& node = *by_id_.at(node_id);
  if (node.dead) return;  // crashed mid-launch: never reports
  auto it = node.workspaces.find(a.request().workspace_id());
  if (it == node.workspaces.end() || it->second.build_id != a.request().build_id()) return;
  const bool fails = !config_.fail_image.empty() && a.request().image() == config_.fail_image;
  if (fails) {
    node.used_cpu -= it->second.cpu;
    node.used_memory -= it->second.memory;
    node.workspaces.erase(it);
  } else {
    it->second.running = true;
    ++stats_.launched;
  }
  if (fails && config_.write_workspaces) {
    cvm::v1::WorkspaceRecord r;
    r.set_workspace_id(a.request().workspace_id());
    r.set_node_id(node_id);
    r.set_build_id(a.request().build_id());
    r.set_phase(cvm::v1::FAILED);
    r.set_reason(cvm::v1::RUNTIME_ERROR);
    r.set_message("simulated launch failure");
    r.set_updated_unix_ms(clock_.now_unix_ms());
    (void)conn_->publish(kv_subject(wire::kBucketWorkspaces, r.workspace_id()),
                         r.SerializeAsString());
  }
  if (fails) {
    event(a, cvm::v1::FAILED, cvm::v1::RUNTIME_ERROR, "simulated launch failure");
    if (config_.heartbeat_on_change) heartbeat(node);
    return;
  }
  if (config_.progress_events) event(a, cvm::v1::STARTING, cvm::v1::REASON_UNSPECIFIED, "");
  if (config_.write_workspaces) {
    cvm::v1::WorkspaceRecord r;
    r.set_workspace_id(a.request().workspace_id());
    r.set_node_id(node_id);
    r.set_build_id(a.request().build_id());
    r.set_phase(cvm::v1::RUNNING);
    r.set_desired(cvm::v1::START);
    r.set_image(a.request().image());
    *r.mutable_resources() = a.request().resources();
    r.set_lease_id(a.lease_id());
    for (const auto& g : a.gpus()) r.add_gpu_uuids(g.uuid());
    r.set_updated_unix_ms(clock_.now_unix_ms());
    (void)conn_->publish(kv_subject(wire::kBucketWorkspaces, r.workspace_id()),
                         r.SerializeAsString());
  }
  event(a, cvm::v1::RUNNING, cvm::v1::REASON_UNSPECIFIED, "");
  if (config_.heartbeat_on_change) heartbeat(node);
}

}  // namespace cvm::fleetsim
