#pragma once
// What cvmctl shows, as pure functions of wire messages: event lines, the nodes and GPUs tables,
// JSON, and the admin settings (effective values and edits). Unit-tested; no I/O.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <google/protobuf/message.h>

#include "cvm/base/result.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm::cli {

// A node whose last heartbeat is older than this is shown (and exported) as not live. The agent
// heartbeats every few seconds; the scheduler declares NODE_LOST on a similar scale.
inline constexpr int64_t kNodeStaleAfterMs = 30'000;

// JSON with the proto field names, every field printed (scripts should not guess defaults).
std::string to_json(const google::protobuf::Message& message);
// A JSON string literal, quotes included.
std::string to_json_string(std::string_view text);

// One line per event for people, e.g. "12:00:01.123  b1  RUNNING  node=node-1".
std::string format_event_line(const cvm::v1::BuildEvent& event);

// "sysbox,shiftfs,idmap,headers,bare-metal" or "selinux-enforcing,cloud(Google Compute Engine)".
std::string node_capabilities(const cvm::v1::NodeStatus& node);
std::string format_nodes_table(const std::vector<cvm::v1::NodeStatus>& nodes, int64_t now_ms);

struct GpuRow {
  std::string node_id;
  bool node_live = false;
  cvm::v1::GpuDevice device;  // only uuid is set when the GPU is leased but no node reports it
  bool reported = true;       // false: a lease names a GPU that no node reports (any more)
  std::optional<cvm::v1::GpuLease> lease;
};
// Every GPU the nodes report, with its lease, then leases of GPUs no node reports. Sorted by node
// and GPU.
std::vector<GpuRow> gpu_rows(const std::vector<cvm::v1::NodeStatus>& nodes,
                             const std::vector<cvm::v1::GpuLease>& leases, int64_t now_ms);
std::string format_gpus_table(const std::vector<GpuRow>& rows, int64_t now_ms);
std::string gpus_json(const std::vector<GpuRow>& rows);

// The settings in force: the stored ones (nullptr: no key yet) with the documented defaults for
// what was never set (CVMs enabled, default to CVM).
cvm::v1::InfrastructureSettings effective_settings(const cvm::v1::InfrastructureSettings* stored);
// Sets one field by name ("caching" or "auto-load-shiftfs"); booleans take true/false/on/off/
// yes/no/1/0, enums their value names, case-insensitive, with or without the enum's prefix.
// Unknown fields and bad values are kInvalid errors that list what is accepted.
Status apply_setting(cvm::v1::InfrastructureSettings& settings, std::string_view key,
                     std::string_view value);
// "key = value" lines of every field, with "(default)" where the value was not stored.
std::string format_settings(const cvm::v1::InfrastructureSettings* stored);
std::string settings_json(const cvm::v1::InfrastructureSettings* stored);

}  // namespace cvm::cli
