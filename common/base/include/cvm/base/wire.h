#pragma once
// Names of the wire contract (see ARCHITECTURE.md). Clients outside this repository rely on them.

#include <string>
#include <string_view>

namespace cvm::wire {

// NodeStatus.allocated_builds lists at most this many builds, the most recently started: a hold
// lasts 30 s, so only recent builds can still have one, and a heartbeat stays small on a node that
// runs hundreds of small workspaces (each entry is ~35 bytes, and NodeStatus goes out on every
// heartbeat and launch). A build left out keeps its hold counted: conservative.
inline constexpr int kMaxAllocatedBuilds = 32;

inline constexpr std::string_view kBuildsSubmit = "cvm.v1.builds.submit";
inline constexpr std::string_view kGpuReserve = "cvm.v1.gpu.reserve";
inline constexpr std::string_view kGpuRelease = "cvm.v1.gpu.release";
// cvm.v1.gpu.release.<node_id>: a node agent's releases, of its own node's leases only (the node
// token is pinned to the node's agent by the server's permissions; the broker checks each lease
// against it). kGpuRelease stays the scheduler's, for any node.
std::string gpu_release_subject(std::string_view node_id);
inline constexpr std::string_view kGpuReleaseNodeWildcard = "cvm.v1.gpu.release.*";

inline constexpr std::string_view kStreamBuilds = "CVM_BUILDS";
inline constexpr std::string_view kStreamNodeWork = "CVM_NODE_WORK";
inline constexpr std::string_view kStreamEvents = "CVM_EVENTS";

inline constexpr std::string_view kBucketNodes = "cvm_nodes";
inline constexpr std::string_view kBucketSettings = "cvm_settings";
inline constexpr std::string_view kBucketWorkspaces = "cvm_workspaces";
inline constexpr std::string_view kBucketGpuLeases = "cvm_gpu_leases";
// Scheduler state: capacity holds per node (CAS) and placement records per build.
inline constexpr std::string_view kBucketCapacity = "cvm_capacity";
inline constexpr std::string_view kBucketPlacements = "cvm_placements";
inline constexpr std::string_view kSettingsKey = "infrastructure";

inline constexpr std::string_view kSchedulerDurable = "scheduler";
inline constexpr std::string_view kBrokerQueue = "gpu-broker";

// cvm.v1.node.<node_id>.work
std::string node_work_subject(std::string_view node_id);
inline constexpr std::string_view kNodeWorkWildcard = "cvm.v1.node.*.work";
// cvm.v1.node.<node_id>.console.<user>: request-reply (ConsoleLogRequest/Reply), answered by the
// node's agent; not captured by any stream. The user token is pinned as on the session subjects:
// the agent answers the workspace's owner and the admins only.
std::string node_console_subject(std::string_view node_id, std::string_view user);
// What an agent subscribes to: every user's console requests on its node.
std::string node_console_wildcard(std::string_view node_id);
// Sessions (session.proto). The user token is pinned by the server's permissions
// (deploy/nats/gen-auth.sh), so an agent takes it as who asks.
// cvm.v1.node.<node_id>.open.<user>: request SessionOpen, reply SessionOpened.
std::string session_open_subject(std::string_view node_id, std::string_view user);
// cvm.v1.node.<node_id>.session.<user>.<session_id>.in / .out
std::string session_in_subject(std::string_view node_id, std::string_view user,
                               std::string_view session_id);
std::string session_out_subject(std::string_view node_id, std::string_view user,
                                std::string_view session_id);
// What an agent subscribes to: every user's opens and input on its node.
std::string session_open_wildcard(std::string_view node_id);
std::string session_in_wildcard(std::string_view node_id);
// cvm.v1.builds.<build_id>.events
std::string build_events_subject(std::string_view build_id);
inline constexpr std::string_view kBuildEventsWildcard = "cvm.v1.builds.*.events";
// agent-<node_id>
std::string agent_durable(std::string_view node_id);

// IDs travel inside subjects, KV keys and consumer names, so they must be a single subject token
// that is also a valid KV key and durable name: [A-Za-z0-9_-], 1..128 characters.
bool is_valid_id(std::string_view id);

}  // namespace cvm::wire
