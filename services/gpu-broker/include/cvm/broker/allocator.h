#pragma once
// Pure GPU allocation decisions of the broker: the policy refusals and which devices of one node a
// reservation gets. The service feeds them from KV cvm_nodes and cvm_gpu_leases and makes the
// result atomic with create-if-absent on each lease key; nothing here touches NATS or clocks.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::broker {

// A refusal: the reason for the FAILED event and the GpuReserveReply, with a specific message.
struct Refusal {
  cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED;
  std::string message;
};

// The GPUs of one node as its agent reported them.
struct NodeGpuInventory {
  std::string node_id;
  bool bare_metal = false;
  std::vector<cvm::v1::GpuDevice> gpus;
};
NodeGpuInventory inventory_from(const cvm::v1::NodeStatus& status);

// Who holds which GPU of a node right now: gpu uuid -> workspace id.
class GpuLeases {
 public:
  void add(std::string_view gpu_uuid, std::string_view workspace_id);
  bool remove(std::string_view gpu_uuid);
  [[nodiscard]] bool contains(std::string_view gpu_uuid) const;
  // The workspace holding the GPU, if any.
  [[nodiscard]] std::optional<std::string_view> holder(std::string_view gpu_uuid) const;
  [[nodiscard]] size_t size() const { return by_uuid_.size(); }

 private:
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, std::string, StringHash, std::equal_to<>> by_uuid_;
};
// The leases of one node out of every lease the broker has read from KV.
GpuLeases leases_on_node(std::string_view node_id, std::span<const cvm::v1::GpuLease> leases);

struct GpuPolicyInput {
  cvm::v1::GpuVendor vendor = cvm::v1::GPU_VENDOR_UNSPECIFIED;  // unspecified means NVIDIA
  bool bare_metal = false;  // of the node the GPUs would come from
  bool cached_cvm = false;  // the workspace is a CVM and Caching is on
};
// Checked in this order, request properties before node properties (as the scheduler does, so
// both give the same reason): AMD or another vendor -> GPU_VENDOR_UNSUPPORTED; a cached CVM ->
// GPU_WITH_CACHING_UNSUPPORTED; a node that is not bare metal -> GPU_REQUIRES_BARE_METAL.
std::optional<Refusal> check_gpu_policy(const GpuPolicyInput& input);

struct GpuChoice {
  std::vector<cvm::v1::GpuDevice> gpus;  // ascending minor on success
  std::optional<Refusal> refusal;

  [[nodiscard]] bool ok() const { return !refusal.has_value(); }
};

// First fit by minor number over healthy, NVIDIA, unleased devices with at least min_memory_bytes.
// Fewer than `count` -> INSUFFICIENT_CAPACITY ("node n1 has 2 free GPUs with ≥ 16 GiB, 4
// requested"); count 0 -> INVALID_REQUEST.
GpuChoice choose_gpus(const NodeGpuInventory& node, const GpuLeases& leased, uint32_t count,
                      uint64_t min_memory_bytes);

// KV cvm_gpu_leases key "<node_id>.<gpu_uuid>". Characters a NATS KV key cannot hold become '_',
// and so does '.' inside either part, so the key always splits back into exactly two tokens.
std::string lease_key(std::string_view node_id, std::string_view gpu_uuid);
// "<node_id>.>": the KV watch filter for every lease of one node (reclaim on node loss).
std::string node_leases_filter(std::string_view node_id);

// "16 GiB", "1.5 GiB", "512 MiB", "100 B": the size in messages.
std::string format_bytes(uint64_t bytes);

}  // namespace cvm::broker
