#pragma once
// Handing a container's cgroup to the root of its user namespace ("delegation"), so that an init
// system inside (systemd) can make its own sub-cgroups, move its services into them and limit
// them, while the limits the node set on the container's own cgroup stay out of its reach.
//
// What is handed over follows the kernel's delegation rules (Documentation/admin-guide/
// cgroup-v2.rst, "Delegation Containment"): on cgroup v2 the directory and its cgroup.procs,
// cgroup.threads and cgroup.subtree_control; on cgroup v1 (each controller's hierarchy and named
// ones such as name=systemd) the directory and the files that move tasks (cgroup.procs, tasks)
// and the two that only affect children (cgroup.clone_children, notify_on_release). Interface
// files that set limits (memory.limit_in_bytes, cpu.cfs_quota_us, pids.max, ...) stay the node's:
// owned by a host ID the workspace does not map, they read as nobody's and cannot be written.
//
// Pure parsing and planning, plus one small applier; used by cvm-supervisor (which must stay free
// of the agent's libraries) and unit-tested against fixture trees.

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

namespace cvm::supervisor {

struct CgroupHierarchy {
  enum class Kind { kV1, kV2 };
  Kind kind = Kind::kV1;
  std::string mount_point;  // e.g. /sys/fs/cgroup/memory, /sys/fs/cgroup/unified, /sys/fs/cgroup
  std::string root;         // the mount's root within the hierarchy (mountinfo field 4)
  bool operator==(const CgroupHierarchy&) const = default;
};

// The cgroup mounts of a /proc/<pid>/mountinfo text (cgroup and cgroup2 file systems), in order.
[[nodiscard]] std::vector<CgroupHierarchy> parse_cgroup_mounts(std::string_view mountinfo);

// The files and directories to hand to the container's root for the container cgroup
// `cgroup_path` (absolute within each hierarchy, as the runtime's cgroupsPath) below each mount.
// A hierarchy mounted below the path's own root is skipped (the path is not reachable there).
[[nodiscard]] std::vector<std::string> delegation_paths(
    const std::vector<CgroupHierarchy>& hierarchies, std::string_view cgroup_path);

// chowns each path that exists to uid:gid (lchown: never follows a link). Returns "" or the
// first error, naming the path; a path that does not exist (a file a kernel version lacks) is
// not an error.
[[nodiscard]] std::string apply_delegation(const std::vector<std::string>& paths, uid_t uid,
                                           gid_t gid);

}  // namespace cvm::supervisor
