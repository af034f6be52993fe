#pragma once
// Pure GPU allocation decisions of the broker: the policy refusals and which devices of one node a
// reservation gets. The service feeds them from KV cvm_nodes and cvm_gpu_leases and makes the
// result atomic with create-if-absent on each lease key; nothing here touches NATS or clocks.

#include <cstdint>
#include <functional>
#include <map>
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
  int64_t heartbeat_unix_ms = 0;
};
NodeGpuInventory inventory_from(const cvm::v1::NodeStatus& status);
// The same devices, reported the same way (the heartbeat aside): nothing the broker decides or
// counts can differ between the two.
[[nodiscard]] bool same_devices(const NodeGpuInventory& a, const NodeGpuInventory& b);

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

// ---- health
// --------------------------------------------------------------------------------------

// When unhealthy GPUs come back: a GPU is quarantined while its agent reports it unhealthy and for
// `healthy_period_ms` after its last XID/ECC event. 0 and 0 (the default) only honour `healthy`.
struct HealthOptions {
  int64_t now_unix_ms = 0;
  int64_t healthy_period_ms = 0;
};

// A MIG instance shares its parent's health: pass the parent (when the node reports it) too.
[[nodiscard]] bool is_quarantined(const cvm::v1::GpuDevice& gpu, const HealthOptions& health,
                                  const cvm::v1::GpuDevice* parent = nullptr);
// When the quarantine ends if nothing else happens; 0 when not quarantined; INT64_MAX while the
// agent reports the device unhealthy (it has to answer again first).
[[nodiscard]] int64_t quarantined_until(const cvm::v1::GpuDevice& gpu, const HealthOptions& health,
                                        const cvm::v1::GpuDevice* parent = nullptr);
// The device a MIG instance belongs to, among the node's devices; nullptr when not reported.
[[nodiscard]] const cvm::v1::GpuDevice* mig_parent(const NodeGpuInventory& node,
                                                   const cvm::v1::GpuDevice& gpu);

// A device a lease may name: an NVIDIA GPU not in MIG mode, or a MIG instance.
[[nodiscard]] bool is_allocatable(const cvm::v1::GpuDevice& gpu);

// ---- choice
// --------------------------------------------------------------------------------------

struct GpuChoice {
  std::vector<cvm::v1::GpuDevice> gpus;  // ascending minor on success
  std::optional<Refusal> refusal;
  int score = 0;  // the set's topology score (see topology.h)

  [[nodiscard]] bool ok() const { return !refusal.has_value(); }
};

// The best set over allocatable, unquarantined, unleased devices with at least min_memory_bytes:
// for count > 1 NVLink-connected sets first, then the closest PCIe relation; on equal scores the
// set that leaves the best-connected devices free, then the lowest minors (so without topology
// information this is first fit by minor). Fewer than `count` -> INSUFFICIENT_CAPACITY ("node n1
// has 2 free GPUs with ≥ 16 GiB, 4 requested"); count 0 -> INVALID_REQUEST.
GpuChoice choose_gpus(const NodeGpuInventory& node, const GpuLeases& leased, uint32_t count,
                      uint64_t min_memory_bytes, const HealthOptions& health = {});

// How the broker picks a node when the request names none (InfrastructureSettings.gpu_placement).
enum class NodePlacement { kPacked, kSpread };

struct NodeChoice {
  std::string node_id;
  GpuChoice choice;  // the GPUs on that node
  std::optional<Refusal> refusal;

  [[nodiscard]] bool ok() const { return !refusal.has_value(); }
};

struct NodeChoiceInput {
  uint32_t count = 0;
  uint64_t min_memory_bytes = 0;
  cvm::v1::GpuVendor vendor = cvm::v1::GPU_VENDOR_UNSPECIFIED;
  bool cached_cvm = false;
  NodePlacement placement = NodePlacement::kPacked;
  HealthOptions health;
  // Nodes whose heartbeat is older than this are not offered (0: no liveness check).
  int64_t node_ttl_ms = 0;
};

// Among `nodes` (each with its leases looked up through `leases_of`), the node to lease from:
// packed takes the node with the fewest free devices that still fits, spread the one with the
// most; ties go to the better topology score, then the node id. When nothing fits: the policy
// refusal if every node was refused by policy, else INSUFFICIENT_CAPACITY naming the best offer.
NodeChoice choose_node(std::span<const NodeGpuInventory* const> nodes,
                       const std::function<GpuLeases(const std::string&)>& leases_of,
                       const NodeChoiceInput& input);

// ---- metrics
// -------------------------------------------------------------------------------------

struct GpuCounts {
  uint32_t total = 0;  // allocatable devices (MIG instances count, their parents do not)
  uint32_t free = 0;   // allocatable, not leased, not quarantined
  uint32_t leased = 0;
  uint32_t unhealthy = 0;    // quarantined, leased or not
  uint32_t unsupported = 0;  // other vendors (AMD): reported, never leased
};
// By model (GpuDevice.name) for one node.
std::map<std::string, GpuCounts> count_gpus(const NodeGpuInventory& node, const GpuLeases& leased,
                                            const HealthOptions& health);

// ---- health notices
// ------------------------------------------------------------------------------

// A leased GPU that went into quarantine: its workspace gets a warning.
struct HealthNotice {
  std::string gpu_uuid;
  std::string workspace_id;
  std::string message;
  int64_t event_unix_ms = 0;  // identifies the health event (the notice's msg-id uses it)
};
// Leased GPUs of `now` that are quarantined and were not (or had an older event) in `before`
// (nullptr: the broker had not seen the node yet).
std::vector<HealthNotice> health_notices(const NodeGpuInventory* before,
                                         const NodeGpuInventory& now, const GpuLeases& leased,
                                         const HealthOptions& health);

// KV cvm_gpu_leases key "<node_id>.<gpu_uuid>". Characters a NATS KV key cannot hold become '_',
// and so does '.' inside either part, so the key always splits back into exactly two tokens.
std::string lease_key(std::string_view node_id, std::string_view gpu_uuid);
// "<node_id>.>": the KV watch filter for every lease of one node (reclaim on node loss).
std::string node_leases_filter(std::string_view node_id);

// "16 GiB", "1.5 GiB", "512 MiB", "100 B": the size in messages.
std::string format_bytes(uint64_t bytes);

}  // namespace cvm::broker
