#pragma once
// The OCI runtime spec (config.json) of a workspace container, as a pure function of plain data.
// Targets runc 1.1.x (spec 1.0.2). Every container gets its own user namespace mapped onto the
// workspace's exclusive ID range; that is what stands in for Sysbox where it is absent.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cvm/agent/id_range.h"

namespace cvm::agent {

inline constexpr std::string_view kOciVersion = "1.0.2";
inline constexpr uint64_t kCpuPeriodUs = 100000;
// The kernel refuses CFS quotas under 1 ms.
inline constexpr int64_t kMinCpuQuotaUs = 1000;

// The entrypoint of images without /sbin/init. `sleep & wait` keeps the shell able to run its
// TERM trap at once (a foreground sleep would delay it for up to an hour); PID 1 ignores signals
// it has no handler for, so without the trap only SIGKILL would stop it.
inline const std::vector<std::string>& sleep_entrypoint() {
  static const std::vector<std::string> args = {
      "/bin/sh", "-c", "trap \"exit 0\" TERM; while :; do sleep 3600 & wait $!; done"};
  return args;
}

// A bind mount of a host path (or, for an inner container, a path of its supervisor).
struct BindMount {
  std::string source;
  std::string destination;
  bool read_only = true;
  bool nosuid = true;
  bool operator==(const BindMount&) const = default;
};

// A character device the container gets: allowed in its device cgroup and present in its /dev.
// Without a user namespace runc creates the node (mknod) with `file_mode`, owned by container
// root; in a user namespace runc bind-mounts the node at `path` from the host (or supervisor), so
// the mode there is what counts.
struct DeviceNode {
  std::string path;  // in the container, e.g. "/dev/nvidia0"
  int64_t major = 0;
  int64_t minor = 0;
  uint32_t file_mode = 0666;
  bool operator==(const DeviceNode&) const = default;
};

// /dev/net/tun (10:200) and /dev/fuse (10:229).
[[nodiscard]] DeviceNode tun_device();
[[nodiscard]] DeviceNode fuse_device();

enum class CapabilityProfile {
  kSystemContainer,  // system_container_capabilities(), held in the container's user namespace
  kDocker,           // Docker's default set (plain containers)
};

struct SpecInput {
  std::string hostname = "workspace";
  // The process: explicit args win; else /sbin/init when the rootfs has it; else the sleep loop.
  std::vector<std::string> args;
  bool has_sbin_init = false;
  std::vector<std::string> env;  // KEY=VALUE; PATH/HOME/TERM are added when missing
  std::string cwd = "/";
  std::string rootfs = "rootfs";  // relative to the bundle
  bool rootfs_readonly = false;

  IdRange ids;  // container 0..count-1 -> host base..base+count-1, for UIDs and GIDs

  CapabilityProfile capability_profile = CapabilityProfile::kSystemContainer;
  // The host's bounding set (read_cap_bounding); nullopt keeps the profile as is.
  std::optional<uint64_t> host_cap_bounding;

  // runc cannot raise the hard limit above its own without CAP_SYS_RESOURCE on the host, so the
  // caller passes its own hard limit (getrlimit) and the request is clamped to it.
  uint64_t nofile = 1048576;
  std::optional<uint64_t> host_nofile_hard;
  // no_new_privs also disables setuid binaries (sudo) inside; a workspace that needs them sets
  // this to false.
  bool no_new_privileges = true;
  // The container is a machine (a CVM's inner container): its init is a system manager such as
  // systemd, which must own its cgroup (the mount is writable; the supervisor delegates the
  // directory), write namespaced sysctls (/proc/sys is not read-only: the kernel still refuses
  // the node-wide ones to a user namespace), and find tmpfs on /run and /run/lock. `container=`
  // in its environment tells systemd it is one and skips units that need a kernel of its own.
  bool machine = false;
  // PID 1 gets a terminal as /dev/console (the runtime's console socket hands its master to
  // whoever keeps the console log); without one its console output goes nowhere.
  bool console = false;

  std::string cgroups_path;         // e.g. "/cvm/<container id>"; empty: runc chooses
  uint64_t memory_limit_bytes = 0;  // 0: unlimited
  uint64_t cpu_millicores = 0;      // 0: unlimited
  std::string cpuset;               // linux.resources.cpu.cpus ("0-1"); empty: every CPU
  bool tun = false;                 // /dev/net/tun (10:200)
  bool fuse = false;                // /dev/fuse (10:229)
  std::vector<DeviceNode> devices;  // more devices (assigned GPUs), after TUN/FUSE
  std::vector<BindMount> binds;     // after the standard mounts (GPU driver libraries)

  std::map<std::string, std::string> annotations;
  // linux.seccomp (parse_seccomp_profile); nullopt: no filter.
  std::optional<nlohmann::json> seccomp;
};

// CFS quota for `millicores` over `period_us` (1000 m = one CPU = a full period); 0 means no
// limit. Clamped up to kMinCpuQuotaUs.
[[nodiscard]] int64_t cpu_quota_us(uint64_t millicores, uint64_t period_us = kCpuPeriodUs);

[[nodiscard]] nlohmann::json build_runtime_spec(const SpecInput& input);

}  // namespace cvm::agent
