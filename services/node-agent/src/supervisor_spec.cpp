#include "cvm/agent/supervisor_spec.h"

#include <algorithm>

#include "cvm/agent/capabilities.h"
#include "file_util.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

json tmpfs(std::string_view destination, std::string_view mode) {
  return {{"destination", destination},
          {"type", "tmpfs"},
          {"source", "tmpfs"},
          {"options", {"nosuid", "nodev", "mode=" + std::string(mode)}}};
}

json bind_json(const std::string& source, std::string_view destination, bool read_only,
               bool nosuid = true) {
  json options = {"rbind", read_only ? "ro" : "rw"};
  if (nosuid) options.push_back("nosuid");
  return {{"destination", destination},
          {"type", "bind"},
          {"source", source},
          {"options", std::move(options)}};
}

}  // namespace

std::vector<HostPathMount> supervisor_host_paths(bool caching, bool auto_load_shiftfs) {
  // Auto-load needs the kernel sources and module tree writable (it builds and loads shiftfs);
  // it only applies with Caching on, as the documentation's "n/a" says.
  const bool kernel_rw = caching && auto_load_shiftfs;
  std::vector<HostPathMount> out = {{"/usr/src", !kernel_rw}, {"/lib/modules", !kernel_rw}};
  if (caching) {
    out.push_back({"/var/run", true});
    out.push_back({"/var/lib", false});
  }
  return out;
}

std::vector<std::string> supervisor_capabilities() {
  // runc needs SYS_ADMIN (mounts, namespaces, pivot_root), SETUID/SETGID (id maps), CHOWN/FOWNER/
  // DAC_* (preparing the rootfs), MKNOD (device nodes), SETPCAP (dropping the inner set), KILL,
  // SYS_CHROOT, SYS_PTRACE (reading /proc/<pid> of the inner init), NET_ADMIN (lo in the inner
  // netns), SYS_RESOURCE (rlimits; dropped by the bounding-set intersection where the host lacks
  // it). Sysbox's daemons need the same set.
  return {"CAP_CHOWN",           "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
          "CAP_FSETID",          "CAP_KILL",         "CAP_SETGID",          "CAP_SETUID",
          "CAP_SETPCAP",         "CAP_SETFCAP",      "CAP_NET_ADMIN",       "CAP_NET_RAW",
          "CAP_SYS_CHROOT",      "CAP_SYS_PTRACE",   "CAP_SYS_ADMIN",       "CAP_SYS_RESOURCE",
          "CAP_MKNOD",           "CAP_AUDIT_WRITE",  "CAP_IPC_LOCK",        "CAP_SYS_NICE",
          "CAP_NET_BIND_SERVICE"};
}

Result<std::vector<std::string>> parse_ldd_output(std::string_view output) {
  std::vector<std::string> out;
  for (std::string_view line : detail::trimmed_lines(output)) {
    if (line.empty()) continue;
    std::string_view path;
    if (const size_t arrow = line.find("=>"); arrow != std::string_view::npos) {
      std::string_view rest = detail::trim(line.substr(arrow + 2));
      if (rest.rfind("not found", 0) == 0) {
        return make_error(
            ErrorDomain::kNotFound,
            "shared library " + std::string(detail::trim(line.substr(0, arrow))) + " not found");
      }
      path = rest.substr(0, rest.find(' '));
    } else if (line.front() == '/') {
      path = line.substr(0, line.find(' '));
    } else {
      continue;  // linux-vdso.so.1, "statically linked", "not a dynamic executable"
    }
    if (path.empty() || path.front() != '/') continue;
    if (std::find(out.begin(), out.end(), path) == out.end()) out.emplace_back(path);
  }
  return out;
}

std::vector<std::string> supervisor_args(const SupervisorSpecInput& in) {
  std::vector<std::string> args = {std::string(kSupervisorBinary),
                                   "--runtime",
                                   in.runtime_binary,
                                   "--root",
                                   std::string(kSupervisorRuntimeRoot),
                                   "--bundle",
                                   std::string(kSupervisorInnerBundle),
                                   "--id",
                                   std::string(kInnerContainerId),
                                   "--run-dir",
                                   std::string(kSupervisorRunDir),
                                   "--grace-ms",
                                   std::to_string(in.stop_grace.count()),
                                   "--bundle-wait-ms",
                                   std::to_string(in.bundle_wait.count()),
                                   "--console-log",
                                   in.storage_dir.empty()
                                       ? std::string(kSupervisorRunDir) + "/console.log"
                                       : std::string(kSupervisorStorageDir) + "/console.log",
                                   "--console-log-max",
                                   std::to_string(in.console_log_max_bytes)};
  if (in.network_wait.count() > 0) {
    args.insert(args.end(), {"--network-wait-ms", std::to_string(in.network_wait.count())});
  }
  return args;
}

nlohmann::json build_supervisor_spec(const SupervisorSpecInput& in) {
  // The default workspace spec is the base (same /proc, /dev, /sys, masks, device allow-list,
  // limits); what differs for the supervisor is applied on top.
  SpecInput base;
  base.hostname = in.hostname;
  base.args = supervisor_args(in);
  base.env = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"};
  base.rootfs = "rootfs";
  // Empty and shared by nothing, but read-only all the same: the supervisor writes only to its
  // tmpfs mounts and the run dir.
  base.rootfs_readonly = true;
  // no_new_privs is inherited by every descendant and cannot be cleared: set on the supervisor,
  // it would reach the workspace's init and every `runc exec` of a session (runc exec takes the
  // container's process settings), and sudo inside would refuse to run. The inner spec decides.
  base.no_new_privileges = false;
  base.ids = IdRange{0, 0};
  base.host_cap_bounding = in.host_cap_bounding;
  base.host_nofile_hard = in.host_nofile_hard;
  base.cgroups_path = in.cgroups_path;
  base.memory_limit_bytes =
      in.memory_limit_bytes == 0 ? 0 : in.memory_limit_bytes + kSupervisorMemoryOverhead;
  base.cpu_millicores = in.cpu_millicores;
  base.cpuset = in.cpuset;
  base.devices = in.devices;
  base.annotations = in.annotations;
  json spec = build_runtime_spec(base);

  // No user namespace: the supervisor is real root, which runc needs to map the inner container
  // onto its ID range and to create device nodes (mknod) for it.
  json& linux_section = spec["linux"];
  linux_section.erase("uidMappings");
  linux_section.erase("gidMappings");
  json namespaces = json::array();
  for (const auto& ns : linux_section["namespaces"]) {
    if (ns.value("type", "") != "user") namespaces.push_back(ns);
  }
  linux_section["namespaces"] = std::move(namespaces);

  // No masked or read-only /proc and /sys paths: the kernel lets a user namespace (the inner
  // container) mount a fresh proc or sysfs only where the one it would cover is fully visible
  // ("mount_too_revealing"), and the user never reaches the supervisor anyway.
  linux_section["maskedPaths"] = json::array();
  linux_section["readonlyPaths"] = json::array();

  std::vector<std::string> caps = supervisor_capabilities();
  if (in.host_cap_bounding) caps = intersect_capabilities(caps, *in.host_cap_bounding);
  spec["process"]["capabilities"] = {{"bounding", caps}, {"effective", caps}, {"permitted", caps}};

  json& mounts = spec["mounts"];
  for (auto& m : mounts) {
    // runc creates the inner container's cgroup below the supervisor's (cgroup namespace).
    if (m.value("type", "") == "cgroup") {
      m["options"] = {"nosuid", "noexec", "nodev", "relatime", "rw"};
    }
  }
  mounts.push_back(tmpfs("/run", "755"));  // the inner runtime's state (--root)
  mounts.push_back(tmpfs("/tmp", "1777"));
  for (const auto& file : in.files) mounts.push_back(bind_json(file, file, true));
  mounts.push_back(bind_json(in.supervisor_binary, kSupervisorBinary, true));
  // Not nosuid: the inner rootfs would inherit it, and sudo, su and ping would not work there.
  mounts.push_back(bind_json(in.inner_bundle, kSupervisorInnerBundle, false, /*nosuid=*/false));
  if (!in.storage_dir.empty()) {
    mounts.push_back(bind_json(in.storage_dir, kSupervisorStorageDir, false, /*nosuid=*/false));
  }
  mounts.push_back(bind_json(in.run_dir, kSupervisorRunDir, false));
  if (!in.gpu_library_dir.empty()) {
    mounts.push_back(bind_json(in.gpu_library_dir, kSupervisorGpuLibDir, true));
  }
  if (!in.lxcfs_dir.empty()) mounts.push_back(bind_json(in.lxcfs_dir, kSupervisorLxcfsDir, true));
  for (const auto& hp : in.host_paths) {
    mounts.push_back(bind_json(hp.source, hp.mount.path, hp.mount.read_only));
  }
  for (const auto& b : in.extra_binds)
    mounts.push_back(bind_json(b.source, b.destination, b.read_only));
  return spec;
}

}  // namespace cvm::agent
