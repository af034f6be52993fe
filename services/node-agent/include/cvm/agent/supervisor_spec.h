#pragma once
// The supervising container of a CVM, as pure functions of plain data.
//
// A CVM is two OCI bundles. The supervising container runs under the host's runc, privileged
// (no user namespace, the capabilities runc needs to start a container), with the hostPath mounts
// of the Caching x Auto-load-shiftfs table. Its only process is cvm-supervisor, which launches the
// inner container (the user's image) with the configured runtime from inside and stays its PID 1.
// The supervisor's rootfs is an empty directory: the supervisor and runtime binaries and their
// shared libraries are bind-mounted file by file, read-only, so nothing else of the host is there.
// The inner container gets its own mount, PID, user and cgroup namespaces, so none of the
// supervisor's files, mounts or processes are visible from it.

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cvm/agent/oci_spec.h"
#include "cvm/base/result.h"

namespace cvm::agent {

// Where things are inside the supervising container.
inline constexpr std::string_view kSupervisorBinary = "/cvm/bin/cvm-supervisor";
inline constexpr std::string_view kSupervisorInnerBundle = "/cvm/inner";  // the inner bundle
inline constexpr std::string_view kSupervisorRunDir = "/cvm/run";  // status + inner log (shared)
inline constexpr std::string_view kSupervisorGpuLibDir = "/cvm/gpu-lib";
inline constexpr std::string_view kSupervisorLxcfsDir = "/cvm/lxcfs";  // the node's lxcfs mount
// The workspace's storage (inner /var/lib/docker below it, the console log in it).
inline constexpr std::string_view kSupervisorStorageDir = "/cvm/storage";
// The inner spec's annotation naming the signal that stops its init (runc kill's syntax).
inline constexpr std::string_view kStopSignalAnnotation = "io.cvm.stop-signal";
inline constexpr std::string_view kSupervisorRuntimeRoot = "/run/cvm-runtime";  // inner's --root
inline constexpr std::string_view kInnerContainerId = "inner";
// The inner container's cgroup, relative to the supervisor's own (cgroup namespace): on the host it
// is <supervisor cgroup>/inner, e.g. /sys/fs/cgroup/memory/cvm/cvm-<ws>/inner.
inline constexpr std::string_view kInnerCgroupsPath = "/inner";
// The supervisor's cgroup holds the inner one plus the runtime's own processes while it launches
// (runc is a Go program): its memory limit is the workspace's plus this much.
inline constexpr uint64_t kSupervisorMemoryOverhead = 128ULL << 20;

// One row of the documented hostPath table: a host path the supervising container sees at the same
// path.
struct HostPathMount {
  std::string path;
  bool read_only = true;
  bool operator==(const HostPathMount&) const = default;
};

// The product documentation's table (never mounted into the inner container):
//
//   | Caching | Auto-load shiftfs | /usr/src | /lib/modules | /var/run | /var/lib |
//   | Off     | n/a               | ro       | ro           | -        | -        |
//   | On      | Off               | ro       | ro           | ro       | rw       |
//   | On      | On                | rw       | rw           | ro       | rw       |
[[nodiscard]] std::vector<HostPathMount> supervisor_host_paths(bool caching,
                                                               bool auto_load_shiftfs);

// What the supervising container may do: enough for runc to set up the inner container (mounts,
// namespaces, cgroups, device nodes, dropping capabilities), nothing for modules, raw I/O or time.
[[nodiscard]] std::vector<std::string> supervisor_capabilities();

// The shared libraries `ldd` lists for a binary ("libc.so.6 => /lib/.../libc.so.6 (0x..)",
// "/lib64/ld-linux-x86-64.so.2 (0x..)"); the vDSO has no file and is skipped. An empty list for a
// static binary. kNotFound naming the library when one is "not found".
[[nodiscard]] Result<std::vector<std::string>> parse_ldd_output(std::string_view output);

struct SupervisorSpecInput {
  std::string hostname = "workspace";
  // Host files bound read-only at the same path (the runtime binary and its libraries, the
  // supervisor's libraries). The supervisor binary itself goes to kSupervisorBinary.
  std::vector<std::string> files;
  std::string supervisor_binary;  // host path
  std::string runtime_binary;     // host path; also its path inside (it is in `files` too)
  std::string inner_bundle;       // host path of the inner bundle
  std::string run_dir;            // host path shared with the agent (status file, inner log)
  std::string storage_dir;        // host path of the workspace's storage; empty: none
  int64_t console_log_max_bytes = 1 << 20;
  std::string gpu_library_dir;  // host path of the NVIDIA libraries; empty: none
  // The table's rows that exist on this host, each with its host source (host_paths_root + path).
  struct HostPath {
    std::string source;
    HostPathMount mount;
  };
  std::string lxcfs_dir;  // host path of the lxcfs mount; empty: none
  std::vector<HostPath> host_paths;
  std::vector<BindMount> extra_binds;  // e.g. /run/sysbox for sysbox-runc's daemons

  std::chrono::milliseconds stop_grace{10000};  // the inner container's TERM -> KILL grace
  // How long the supervisor waits for the inner bundle's config.json: the agent may start the
  // supervising container while it still unpacks the image, and writes config.json last.
  std::chrono::milliseconds bundle_wait{60000};
  // > 0: the supervisor stops between the inner runtime's create and start ("created") until the
  // agent has given the inner network namespace its interface, at most this long.
  std::chrono::milliseconds network_wait{0};

  std::string cgroups_path;         // e.g. "/cvm/cvm-<ws>"
  uint64_t memory_limit_bytes = 0;  // the workspace's; the supervisor adds its overhead
  uint64_t cpu_millicores = 0;
  std::string cpuset;  // the workspace's CPUs (cpu_pinning.h); the inner container's are the same
  // Devices the inner container gets: the supervisor creates each node (0666, so that the inner
  // container's mapped root can open its bind mount) and allows it in its cgroup.
  std::vector<DeviceNode> devices;
  std::optional<uint64_t> host_cap_bounding;
  std::optional<uint64_t> host_nofile_hard;
  std::map<std::string, std::string> annotations;
};

// cvm-supervisor's command line inside the supervising container.
[[nodiscard]] std::vector<std::string> supervisor_args(const SupervisorSpecInput& in);

[[nodiscard]] nlohmann::json build_supervisor_spec(const SupervisorSpecInput& in);

}  // namespace cvm::agent
