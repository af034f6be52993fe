#include "cvm/broker/allocator.h"

#include <algorithm>
#include <cstdio>
#include <tuple>

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
  return inv;
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

GpuChoice choose_gpus(const NodeGpuInventory& node, const GpuLeases& leased, uint32_t count,
                      uint64_t min_memory_bytes) {
  GpuChoice choice;
  if (count == 0) {
    choice.refusal =
        refusal(cvm::v1::INVALID_REQUEST, "a GPU reservation needs a count of 1 or more");
    return choice;
  }

  std::vector<const cvm::v1::GpuDevice*> usable;
  usable.reserve(node.gpus.size());
  for (const auto& gpu : node.gpus) {
    if (gpu.healthy() && gpu.vendor() == cvm::v1::NVIDIA &&
        gpu.memory_bytes() >= min_memory_bytes && !leased.contains(gpu.uuid())) {
      usable.push_back(&gpu);
    }
  }

  if (usable.size() < count) {
    const size_t free = usable.size();
    std::string msg = "node " + node.node_id + " has " + std::to_string(free) + " free GPU" +
                      (free == 1 ? "" : "s");
    if (min_memory_bytes > 0) msg += " with \u2265 " + format_bytes(min_memory_bytes);
    msg += ", " + std::to_string(count) + " requested";
    choice.refusal = refusal(cvm::v1::INSUFFICIENT_CAPACITY, std::move(msg));
    return choice;
  }

  // Agents may report devices in any order; first fit is by /dev/nvidia<minor>, and the uuid
  // breaks ties so the choice never depends on report order.
  std::sort(usable.begin(), usable.end(), [](const auto* a, const auto* b) {
    return std::make_tuple(a->minor(), std::string_view(a->uuid())) <
           std::make_tuple(b->minor(), std::string_view(b->uuid()));
  });
  choice.gpus.reserve(count);
  for (uint32_t i = 0; i < count; ++i) choice.gpus.push_back(*usable[i]);
  return choice;
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
