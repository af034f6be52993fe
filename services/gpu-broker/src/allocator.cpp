#include "cvm/broker/allocator.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <tuple>

#include "cvm/broker/topology.h"

namespace cvm::broker {

namespace {

bool is_key_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_' || c == '/' || c == '=';
}

// One part of a lease key: only NATS KV key characters and never '.', which separates the parts.
std::string key_part(std::string_view part) {
  if (part.empty()) return "_";
  std::string out(part);
  for (char& c : out) {
    if (!is_key_char(c)) c = '_';
  }
  return out;
}

Refusal refusal(cvm::v1::Reason reason, std::string message) {
  return Refusal{reason, std::move(message)};
}

}  // namespace

NodeGpuInventory inventory_from(const cvm::v1::NodeStatus& status) {
  NodeGpuInventory inv;
  inv.node_id = status.node_id();
  inv.bare_metal = status.host().bare_metal();
  inv.gpus.assign(status.gpus().begin(), status.gpus().end());
  inv.heartbeat_unix_ms = status.heartbeat_unix_ms();
  return inv;
}

bool same_devices(const NodeGpuInventory& a, const NodeGpuInventory& b) {
  if (a.node_id != b.node_id || a.bare_metal != b.bare_metal || a.gpus.size() != b.gpus.size()) {
    return false;
  }
  for (size_t i = 0; i < a.gpus.size(); ++i) {
    // GpuDevice has no map fields, so equal messages serialize to equal bytes.
    if (a.gpus[i].SerializeAsString() != b.gpus[i].SerializeAsString()) return false;
  }
  return true;
}

void GpuLeases::add(std::string_view gpu_uuid, std::string_view workspace_id) {
  by_uuid_.insert_or_assign(std::string(gpu_uuid), std::string(workspace_id));
}

bool GpuLeases::remove(std::string_view gpu_uuid) {
  auto it = by_uuid_.find(gpu_uuid);
  if (it == by_uuid_.end()) return false;
  by_uuid_.erase(it);
  return true;
}

bool GpuLeases::contains(std::string_view gpu_uuid) const { return by_uuid_.contains(gpu_uuid); }

std::optional<std::string_view> GpuLeases::holder(std::string_view gpu_uuid) const {
  auto it = by_uuid_.find(gpu_uuid);
  if (it == by_uuid_.end()) return std::nullopt;
  return std::string_view(it->second);
}

GpuLeases leases_on_node(std::string_view node_id, std::span<const cvm::v1::GpuLease> leases) {
  GpuLeases out;
  for (const auto& lease : leases) {
    if (lease.node_id() == node_id) out.add(lease.gpu_uuid(), lease.workspace_id());
  }
  return out;
}

std::optional<Refusal> check_gpu_policy(const GpuPolicyInput& input) {
  if (input.vendor != cvm::v1::NVIDIA && input.vendor != cvm::v1::GPU_VENDOR_UNSPECIFIED) {
    const std::string& name = cvm::v1::GpuVendor_Name(input.vendor);
    return refusal(
        cvm::v1::GPU_VENDOR_UNSUPPORTED,
        "only NVIDIA GPUs are supported; " + (name.empty() ? "unknown" : name) + " was requested");
  }
  if (input.cached_cvm) {
    return refusal(cvm::v1::GPU_WITH_CACHING_UNSUPPORTED,
                   "GPUs are not supported with cached CVMs (Caching is on)");
  }
  if (!input.bare_metal) {
    return refusal(cvm::v1::GPU_REQUIRES_BARE_METAL,
                   "GPUs are only supported on bare-metal nodes, not on cloud VMs");
  }
  return std::nullopt;
}

bool is_allocatable(const cvm::v1::GpuDevice& gpu) {
  return gpu.vendor() == cvm::v1::NVIDIA && !gpu.mig_enabled();
}

const cvm::v1::GpuDevice* mig_parent(const NodeGpuInventory& node, const cvm::v1::GpuDevice& gpu) {
  if (gpu.mig_parent_uuid().empty()) return nullptr;
  for (const auto& g : node.gpus) {
    if (g.uuid() == gpu.mig_parent_uuid()) return &g;
  }
  return nullptr;
}

int64_t quarantined_until(const cvm::v1::GpuDevice& gpu, const HealthOptions& health,
                          const cvm::v1::GpuDevice* parent) {
  if (!gpu.healthy() || (parent != nullptr && !parent->healthy())) {
    return std::numeric_limits<int64_t>::max();
  }
  int64_t last = gpu.last_health_event_unix_ms();
  if (parent != nullptr) last = std::max(last, parent->last_health_event_unix_ms());
  if (last <= 0 || health.healthy_period_ms <= 0) return 0;
  const int64_t until = last + health.healthy_period_ms;
  return health.now_unix_ms < until ? until : 0;
}

bool is_quarantined(const cvm::v1::GpuDevice& gpu, const HealthOptions& health,
                    const cvm::v1::GpuDevice* parent) {
  return quarantined_until(gpu, health, parent) != 0;
}

GpuChoice choose_gpus(const NodeGpuInventory& node, const GpuLeases& leased, uint32_t count,
                      uint64_t min_memory_bytes, const HealthOptions& health) {
  GpuChoice choice;
  if (count == 0) {
    choice.refusal =
        refusal(cvm::v1::INVALID_REQUEST, "a GPU reservation needs a count of 1 or more");
    return choice;
  }

  std::vector<const cvm::v1::GpuDevice*> usable;
  usable.reserve(node.gpus.size());
  size_t quarantined = 0;
  for (const auto& gpu : node.gpus) {
    if (!is_allocatable(gpu) || gpu.memory_bytes() < min_memory_bytes ||
        leased.contains(gpu.uuid())) {
      continue;
    }
    if (is_quarantined(gpu, health, mig_parent(node, gpu))) {
      ++quarantined;
      continue;
    }
    usable.push_back(&gpu);
  }

  if (usable.size() < count) {
    const size_t free = usable.size();
    std::string msg = "node " + node.node_id + " has " + std::to_string(free) + " free GPU" +
                      (free == 1 ? "" : "s");
    if (min_memory_bytes > 0) msg += " with \u2265 " + format_bytes(min_memory_bytes);
    msg += ", " + std::to_string(count) + " requested";
    if (quarantined > 0) msg += " (" + std::to_string(quarantined) + " more quarantined)";
    choice.refusal = refusal(cvm::v1::INSUFFICIENT_CAPACITY, std::move(msg));
    return choice;
  }

  // Agents may report devices in any order; the order is by /dev/nvidia<minor>, and the uuid
  // breaks ties (MIG instances share their parent's minor), so the choice never depends on it.
  std::sort(usable.begin(), usable.end(), [](const auto* a, const auto* b) {
    return std::make_tuple(a->minor(), std::string_view(a->uuid())) <
           std::make_tuple(b->minor(), std::string_view(b->uuid()));
  });
  const ScoreMatrix scores(usable);
  const auto best = choose_best_set(scores, count);
  choice.score = best.score;
  choice.gpus.reserve(count);
  for (size_t i : best.indices) choice.gpus.push_back(*usable[i]);
  return choice;
}

NodeChoice choose_node(std::span<const NodeGpuInventory* const> nodes,
                       const std::function<GpuLeases(const std::string&)>& leases_of,
                       const NodeChoiceInput& input) {
  NodeChoice out;
  if (input.count == 0) {
    out.refusal = refusal(cvm::v1::INVALID_REQUEST, "a GPU reservation needs a count of 1 or more");
    return out;
  }
  // Request properties first: they refuse whatever the node.
  if (auto r = check_gpu_policy(
          {.vendor = input.vendor, .bare_metal = true, .cached_cvm = input.cached_cvm})) {
    out.refusal = std::move(r);
    return out;
  }
  // Pass 1 counts each live, bare-metal node's free devices (cheap); pass 2 runs the set search
  // only on nodes in placement order, one group of equal free counts at a time, and stops at the
  // first group where a node fits: on a large fleet most nodes are never searched.
  struct Candidate {
    const NodeGpuInventory* node;
    GpuLeases leased;
    size_t free;
  };
  std::vector<Candidate> candidates;
  std::optional<Refusal> policy_refusal;
  size_t policy_refused = 0;
  size_t stale = 0;
  size_t checked = 0;
  size_t most_free = 0;
  for (const auto* node : nodes) {
    if (node == nullptr) continue;
    ++checked;
    if (input.node_ttl_ms > 0 &&
        input.health.now_unix_ms - node->heartbeat_unix_ms > input.node_ttl_ms) {
      ++stale;
      continue;
    }
    if (auto r = check_gpu_policy({.vendor = input.vendor, .bare_metal = node->bare_metal})) {
      ++policy_refused;
      policy_refusal = std::move(r);
      continue;
    }
    auto leased = leases_of(node->node_id);
    // Every free device counts toward "how full is this node", whatever the request's memory.
    size_t free = 0;
    for (const auto& g : node->gpus) {
      if (is_allocatable(g) && !leased.contains(g.uuid()) &&
          !is_quarantined(g, input.health, mig_parent(*node, g))) {
        ++free;
      }
    }
    most_free = std::max(most_free, free);
    if (free >= input.count) candidates.push_back({node, std::move(leased), free});
  }
  const bool packed = input.placement == NodePlacement::kPacked;
  std::sort(candidates.begin(), candidates.end(), [&](const Candidate& a, const Candidate& b) {
    if (a.free != b.free) return packed ? a.free < b.free : a.free > b.free;
    return a.node->node_id < b.node->node_id;
  });
  for (size_t group = 0; group < candidates.size();) {
    size_t end = group;
    while (end < candidates.size() && candidates[end].free == candidates[group].free) ++end;
    std::optional<GpuChoice> best;
    const NodeGpuInventory* best_node = nullptr;
    for (size_t k = group; k < end; ++k) {
      auto choice = choose_gpus(*candidates[k].node, candidates[k].leased, input.count,
                                input.min_memory_bytes, input.health);
      // Ties on score keep the first, which has the lower node id.
      if (choice.ok() && (!best || choice.score > best->score)) {
        best = std::move(choice);
        best_node = candidates[k].node;
      }
    }
    if (best) {
      out.node_id = best_node->node_id;
      out.choice = std::move(*best);
      return out;
    }
    group = end;
  }
  if (checked > 0 && policy_refused == checked) {
    out.refusal = std::move(policy_refusal);
    return out;
  }
  std::string msg =
      "no node has " + std::to_string(input.count) + " free GPU" + (input.count == 1 ? "" : "s");
  if (input.min_memory_bytes > 0) msg += " with \u2265 " + format_bytes(input.min_memory_bytes);
  msg += " (" + std::to_string(checked) + " node" + (checked == 1 ? "" : "s") + " checked";
  if (stale > 0) msg += ", " + std::to_string(stale) + " not heartbeating";
  if (policy_refused > 0) msg += ", " + std::to_string(policy_refused) + " not bare metal";
  msg += ", at most " + std::to_string(most_free) + " free on one node)";
  out.refusal = refusal(cvm::v1::INSUFFICIENT_CAPACITY, std::move(msg));
  return out;
}

std::map<std::string, GpuCounts> count_gpus(const NodeGpuInventory& node, const GpuLeases& leased,
                                            const HealthOptions& health) {
  std::map<std::string, GpuCounts> out;
  for (const auto& g : node.gpus) {
    if (g.vendor() == cvm::v1::NVIDIA && !is_allocatable(g)) continue;  // a MIG parent
    auto& c = out[g.name().empty() ? std::string("unknown") : g.name()];
    if (g.vendor() != cvm::v1::NVIDIA) {
      ++c.unsupported;
      continue;
    }
    ++c.total;
    const bool held = leased.contains(g.uuid());
    const bool sick = is_quarantined(g, health, mig_parent(node, g));
    if (held) ++c.leased;
    if (sick) ++c.unhealthy;
    if (!held && !sick) ++c.free;
  }
  return out;
}

std::vector<HealthNotice> health_notices(const NodeGpuInventory* before,
                                         const NodeGpuInventory& now, const GpuLeases& leased,
                                         const HealthOptions& health) {
  std::vector<HealthNotice> out;
  for (const auto& g : now.gpus) {
    const auto holder = leased.holder(g.uuid());
    if (!holder) continue;
    const auto* parent = mig_parent(now, g);
    if (!is_quarantined(g, health, parent)) continue;
    int64_t event = g.last_health_event_unix_ms();
    bool healthy_flag = g.healthy();
    std::string reason = g.health_reason();
    if (parent != nullptr) {
      event = std::max(event, parent->last_health_event_unix_ms());
      healthy_flag = healthy_flag && parent->healthy();
      if (reason.empty()) reason = parent->health_reason();
    }
    bool fresh = before == nullptr;
    if (before != nullptr) {
      const cvm::v1::GpuDevice* old = nullptr;
      for (const auto& o : before->gpus) {
        if (o.uuid() == g.uuid()) old = &o;
      }
      const auto* old_parent = old != nullptr ? mig_parent(*before, *old) : nullptr;
      if (old == nullptr) {
        fresh = true;
      } else {
        int64_t old_event = old->last_health_event_unix_ms();
        bool old_healthy = old->healthy();
        if (old_parent != nullptr) {
          old_event = std::max(old_event, old_parent->last_health_event_unix_ms());
          old_healthy = old_healthy && old_parent->healthy();
        }
        fresh = event > old_event || (old_healthy && !healthy_flag);
      }
    }
    if (!fresh) continue;
    HealthNotice n;
    n.gpu_uuid = g.uuid();
    n.workspace_id = std::string(*holder);
    n.event_unix_ms = event;
    n.message = "GPU " + g.uuid() + (g.name().empty() ? "" : " (" + g.name() + ")") + " on node " +
                now.node_id + " is unhealthy" + (reason.empty() ? "" : ": " + reason) +
                "; it is quarantined (no new leases) until it has been healthy for " +
                std::to_string(health.healthy_period_ms / 1000) + " s";
    out.push_back(std::move(n));
  }
  return out;
}

std::string lease_key(std::string_view node_id, std::string_view gpu_uuid) {
  return key_part(node_id) + "." + key_part(gpu_uuid);
}

std::string node_leases_filter(std::string_view node_id) { return key_part(node_id) + ".>"; }

std::string format_bytes(uint64_t bytes) {
  struct Unit {
    uint64_t size;
    const char* name;
  };
  static constexpr Unit kUnits[] = {
      {1ULL << 40, "TiB"}, {1ULL << 30, "GiB"}, {1ULL << 20, "MiB"}, {1ULL << 10, "KiB"}};
  for (const auto& unit : kUnits) {
    if (bytes < unit.size) continue;
    if (bytes % unit.size == 0) return std::to_string(bytes / unit.size) + " " + unit.name;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f %s", static_cast<double>(bytes) / unit.size, unit.name);
    return buf;
  }
  return std::to_string(bytes) + " B";
}

}  // namespace cvm::broker
