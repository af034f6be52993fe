#pragma once
// Kernel limits a node of systemd workspaces needs. The inotify limits are per user of the initial
// user namespace, and every workspace's systemd (and its services, dbus, dockerd) counts against
// the host user that owns the workspace's user namespace: with Debian's default of 128
// fs.inotify.max_user_instances, the 19th or 20th systemd workspace fails to boot ("Failed to
// create inotify object: Too many open files"). The agent raises each limit below the minimum at
// start, as Sysbox's installer does, and says so in its node status; it never lowers one.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace cvm::agent {

struct SysctlMinimum {
  std::string name;  // e.g. "fs.inotify.max_user_instances" (its file: /proc/sys/fs/inotify/...)
  uint64_t minimum = 0;
};

// The minimums: inotify instances and watches for a few hundred workspaces, and the event queue.
const std::vector<SysctlMinimum>& node_sysctl_minimums();

struct SysctlChange {
  std::string name;
  uint64_t from = 0;
  uint64_t to = 0;
  bool operator==(const SysctlChange&) const = default;
};

// Which of `minimums` to raise, given the current values (`read`: nullopt when unreadable, which
// is left alone).
std::vector<SysctlChange> sysctls_to_raise(
    const std::vector<SysctlMinimum>& minimums,
    const std::function<std::optional<uint64_t>(const std::string&)>& read);

// Raises what sysctls_to_raise says under `procfs` (/proc). Returns one line per limit for the
// node status: "raised fs.inotify.max_user_instances 128 -> 8192", or why it could not be.
std::vector<std::string> raise_node_sysctls(const std::string& procfs);

}  // namespace cvm::agent
