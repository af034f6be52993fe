#include "cvm/agent/node_tuning.h"

#include <cerrno>
#include <cstring>
#include <fstream>

#include "file_util.h"

namespace cvm::agent {

const std::vector<SysctlMinimum>& node_sysctl_minimums() {
  // A systemd + Docker workspace holds a dozen or more inotify instances; 8192 leaves room for
  // hundreds of workspaces and the node's own services.
  static const std::vector<SysctlMinimum> minimums = {
      {"fs.inotify.max_user_instances", 8192},
      {"fs.inotify.max_user_watches", 1048576},
      {"fs.inotify.max_queued_events", 1048576},
  };
  return minimums;
}

std::vector<SysctlChange> sysctls_to_raise(
    const std::vector<SysctlMinimum>& minimums,
    const std::function<std::optional<uint64_t>(const std::string&)>& read) {
  std::vector<SysctlChange> out;
  for (const auto& m : minimums) {
    const auto now = read(m.name);
    if (now && *now < m.minimum) out.push_back({m.name, *now, m.minimum});
  }
  return out;
}

namespace {

std::string sysctl_path(const std::string& procfs, const std::string& name) {
  std::string rel = name;
  for (auto& c : rel) {
    if (c == '.') c = '/';
  }
  return detail::join_path(procfs, "sys/" + rel);
}

}  // namespace

std::vector<std::string> raise_node_sysctls(const std::string& procfs) {
  const auto read = [&](const std::string& name) -> std::optional<uint64_t> {
    const auto text = detail::read_file(sysctl_path(procfs, name), 64);
    if (!text) return std::nullopt;
    try {
      return std::stoull(std::string(detail::trim(*text)));
    } catch (const std::exception&) {
      return std::nullopt;
    }
  };
  std::vector<std::string> lines;
  for (const auto& c : sysctls_to_raise(node_sysctl_minimums(), read)) {
    std::ofstream out(sysctl_path(procfs, c.name));
    out << c.to << "\n";
    out.flush();
    if (out && read(c.name) == c.to) {
      lines.push_back("raised " + c.name + " " + std::to_string(c.from) + " -> " +
                      std::to_string(c.to));
    } else {
      lines.push_back(c.name + " is " + std::to_string(c.from) + " (wanted " +
                      std::to_string(c.to) + ", cannot raise it: " + std::strerror(errno) +
                      "): systemd workspaces may fail to boot past a few dozen");
    }
  }
  return lines;
}

}  // namespace cvm::agent
