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

// `cvmctl workspaces`: those on `node` and of `owner` (empty: any), sorted by id.
std::vector<cvm::v1::WorkspaceRecord> select_workspaces(std::vector<cvm::v1::WorkspaceRecord> all,
                                                        const std::string& node,
                                                        const std::string& owner);
// WORKSPACE, PHASE, NODE, OWNER, IMAGE, CPU, MEMORY, GPUS, AGE (since its build's first phase).
std::string format_workspaces_table(const std::vector<cvm::v1::WorkspaceRecord>& workspaces,
                                    int64_t now_ms);

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

// One record of CVM_DEAD_LETTERS: the server's advisory that it gave up delivering a request of
// CVM_BUILDS (MAX_DELIVERIES) or that the scheduler terminated one on its last delivery
// (MSG_TERMINATED, the usual case).
struct DeadLetter {
  uint64_t sequence = 0;  // in CVM_DEAD_LETTERS
  std::string kind;       // "terminated" or "max_deliveries"
  std::string time;       // the advisory's timestamp, as the server wrote it (RFC 3339, UTC)
  std::string stream;     // the stream of the request (CVM_BUILDS)
  std::string consumer;
  uint64_t stream_sequence = 0;  // the request's sequence in `stream`
  uint64_t deliveries = 0;
  std::string reason;  // the server's reason for a termination, when it gives one
  // The request, when `stream` still holds it (a MAX_DELIVERIES one stays in the work queue; a
  // terminated one has been removed).
  std::optional<cvm::v1::BuildRequest> request;
};
// Reads one advisory (JSON); kInvalid when it is not a MAX_DELIVERIES or MSG_TERMINATED advisory.
Result<DeadLetter> parse_dead_letter(std::string_view json, uint64_t sequence);
// TIME, KIND, SEQ (of the request), DELIVERIES, BUILD: the build id and workspace when the request
// could be read, else why not.
std::string format_dead_letters_table(const std::vector<DeadLetter>& letters);
std::string dead_letters_json(const std::vector<DeadLetter>& letters);

}  // namespace cvm::cli
