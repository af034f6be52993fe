#include "cvm/agent/oci_spec.h"

#include <algorithm>
#include <string_view>

#include "cvm/agent/capabilities.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

bool has_env_key(const std::vector<std::string>& env, std::string_view key) {
  return std::any_of(env.begin(), env.end(), [&](const std::string& kv) {
    return kv.size() > key.size() && kv.compare(0, key.size(), key) == 0 && kv[key.size()] == '=';
  });
}

std::vector<std::string> process_env(const std::vector<std::string>& given, bool machine) {
  std::vector<std::string> env = given;
  // systemd reads it to know it runs in a container (systemd-detect-virt: container-other).
  if (machine && !has_env_key(env, "container")) env.emplace_back("container=cvm");
  if (!has_env_key(env, "PATH")) {
    env.emplace_back("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  }
  if (!has_env_key(env, "HOME")) env.emplace_back("HOME=/root");
  if (!has_env_key(env, "TERM")) env.emplace_back("TERM=xterm");
  return env;
}

std::vector<std::string> process_args(const SpecInput& in) {
  if (!in.args.empty()) return in.args;
  if (in.has_sbin_init) return {"/sbin/init"};
  return sleep_entrypoint();
}

json capabilities(const SpecInput& in) {
  std::vector<std::string> caps = in.capability_profile == CapabilityProfile::kDocker
                                      ? docker_default_capabilities()
                                      : system_container_capabilities();
  if (in.host_cap_bounding) caps = intersect_capabilities(caps, *in.host_cap_bounding);
  // Inheritable and ambient stay empty: non-root programs exec'ed inside must not pick the set up
  // (CVE-2022-29162).
  return {{"bounding", caps}, {"effective", caps}, {"permitted", caps}};
}

json mounts(const SpecInput& in) {
  std::vector<std::string> devpts = {"nosuid", "noexec", "newinstance", "ptmxmode=0666",
                                     "mode=0620"};
  // gid=5 (tty) must exist inside the user namespace or the devpts mount fails.
  if (in.ids.count > 5) devpts.emplace_back("gid=5");
  json all = json::array({
      {{"destination", "/proc"}, {"type", "proc"}, {"source", "proc"}},
      {{"destination", "/dev"},
       {"type", "tmpfs"},
       {"source", "tmpfs"},
       {"options", {"nosuid", "strictatime", "mode=755", "size=65536k"}}},
      {{"destination", "/dev/pts"}, {"type", "devpts"}, {"source", "devpts"}, {"options", devpts}},
      {{"destination", "/dev/shm"},
       {"type", "tmpfs"},
       {"source", "shm"},
       {"options", {"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}}},
      {{"destination", "/dev/mqueue"},
       {"type", "mqueue"},
       {"source", "mqueue"},
       {"options", {"nosuid", "noexec", "nodev"}}},
      // A fresh sysfs mount is allowed in a user namespace because the container also owns its
      // network namespace (verified with runc 1.1.5); no bind of the host's /sys is needed.
      {{"destination", "/sys"},
       {"type", "sysfs"},
       {"source", "sysfs"},
       {"options", {"nosuid", "noexec", "nodev", "ro"}}},
  });
  // The container's own cgroup (cgroup namespace). A machine's init manages it (writable, and
  // delegated to its root by the supervisor); anything else only reads it.
  all.push_back({{"destination", "/sys/fs/cgroup"},
                 {"type", "cgroup"},
                 {"source", "cgroup"},
                 {"options", {"nosuid", "noexec", "nodev", "relatime", in.machine ? "rw" : "ro"}}});
  if (in.machine) {
    all.push_back({{"destination", "/run"},
                   {"type", "tmpfs"},
                   {"source", "tmpfs"},
                   {"options", {"nosuid", "nodev", "mode=755", "size=20%"}}});
    all.push_back({{"destination", "/run/lock"},
                   {"type", "tmpfs"},
                   {"source", "tmpfs"},
                   {"options", {"nosuid", "nodev", "noexec", "mode=1777", "size=5m"}}});
  }
  return all;
}

json device_rule(bool allow, std::string_view type, std::optional<int64_t> major,
                 std::optional<int64_t> minor) {
  json rule = {{"allow", allow}, {"access", "rwm"}};
  if (!type.empty()) rule["type"] = type;
  if (major) rule["major"] = *major;
  if (minor) rule["minor"] = *minor;
  return rule;
}

json device_node(const DeviceNode& d) {
  return {{"path", d.path},          {"type", "c"}, {"major", d.major}, {"minor", d.minor},
          {"fileMode", d.file_mode}, {"uid", 0},    {"gid", 0}};
}

std::vector<DeviceNode> all_devices(const SpecInput& in) {
  std::vector<DeviceNode> out;
  if (in.tun) out.push_back(tun_device());
  if (in.fuse) out.push_back(fuse_device());
  out.insert(out.end(), in.devices.begin(), in.devices.end());
  return out;
}

json resources(const SpecInput& in) {
  json devices = json::array({
      device_rule(false, "", std::nullopt, std::nullopt),  // default deny
      device_rule(true, "c", 1, 3),                        // /dev/null
      device_rule(true, "c", 1, 5),                        // /dev/zero
      device_rule(true, "c", 1, 7),                        // /dev/full
      device_rule(true, "c", 1, 8),                        // /dev/random
      device_rule(true, "c", 1, 9),                        // /dev/urandom
      device_rule(true, "c", 5, 0),                        // /dev/tty
      device_rule(true, "c", 5, 2),                        // /dev/ptmx
      device_rule(true, "c", 136, std::nullopt),           // /dev/pts/*
  });
  for (const auto& d : all_devices(in)) devices.push_back(device_rule(true, "c", d.major, d.minor));

  json res = {{"devices", std::move(devices)}};
  if (in.memory_limit_bytes > 0) {
    res["memory"] = {{"limit", static_cast<int64_t>(in.memory_limit_bytes)}};
  }
  if (in.cpu_millicores > 0) {
    // Shares keep the same proportions as the quotas when CPUs are contended.
    const uint64_t shares = std::max<uint64_t>(2, in.cpu_millicores * 1024 / 1000);
    res["cpu"] = {
        {"quota", cpu_quota_us(in.cpu_millicores)}, {"period", kCpuPeriodUs}, {"shares", shares}};
  }
  if (!in.cpuset.empty()) res["cpu"]["cpus"] = in.cpuset;
  return res;
}

json bind_mount(const BindMount& b) {
  std::vector<std::string> options = {"rbind", b.read_only ? "ro" : "rw"};
  if (b.nosuid) options.emplace_back("nosuid");
  return {{"destination", b.destination},
          {"type", "bind"},
          {"source", b.source},
          {"options", std::move(options)}};
}

json readonly_paths(const SpecInput& in) {
  json paths = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"};
  // dockerd writes net.ipv4.ip_forward, systemd-sysctl the rest of the namespaced ones; writes to
  // node-wide sysctls still fail (their files belong to a root the user namespace does not map).
  if (!in.machine) paths.push_back("/proc/sys");
  return paths;
}

json id_mappings(IdRange ids) {
  return json::array({{{"containerID", 0}, {"hostID", ids.base}, {"size", ids.count}}});
}

}  // namespace

DeviceNode tun_device() { return {"/dev/net/tun", 10, 200, 0666}; }
DeviceNode fuse_device() { return {"/dev/fuse", 10, 229, 0666}; }

int64_t cpu_quota_us(uint64_t millicores, uint64_t period_us) {
  if (millicores == 0) return 0;
  const uint64_t quota = millicores * period_us / 1000;
  return std::max<int64_t>(kMinCpuQuotaUs, static_cast<int64_t>(quota));
}

nlohmann::json build_runtime_spec(const SpecInput& in) {
  const uint64_t nofile =
      in.host_nofile_hard ? std::min(in.nofile, *in.host_nofile_hard) : in.nofile;

  json process = {
      {"terminal", in.console},
      {"user", {{"uid", 0}, {"gid", 0}}},
      {"args", process_args(in)},
      {"env", process_env(in.env, in.machine)},
      {"cwd", in.cwd.empty() ? "/" : in.cwd},
      {"capabilities", capabilities(in)},
      {"rlimits", json::array({{{"type", "RLIMIT_NOFILE"}, {"hard", nofile}, {"soft", nofile}}})},
      {"noNewPrivileges", in.no_new_privileges},
  };

  json devices = json::array();
  for (const auto& d : all_devices(in)) devices.push_back(device_node(d));

  json linux_section = {
      {"uidMappings", id_mappings(in.ids)},
      {"gidMappings", id_mappings(in.ids)},
      {"namespaces", json::array({{{"type", "pid"}},
                                  {{"type", "ipc"}},
                                  {{"type", "uts"}},
                                  {{"type", "mount"}},
                                  {{"type", "network"}},
                                  {{"type", "user"}},
                                  {{"type", "cgroup"}}})},
      {"resources", resources(in)},
      {"maskedPaths",
       {"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
        "/proc/scsi"}},
      {"readonlyPaths", readonly_paths(in)},
  };
  if (!devices.empty()) linux_section["devices"] = std::move(devices);
  if (!in.cgroups_path.empty()) linux_section["cgroupsPath"] = in.cgroups_path;
  if (in.seccomp) linux_section["seccomp"] = *in.seccomp;

  json all_mounts = mounts(in);
  for (const auto& b : in.binds) all_mounts.push_back(bind_mount(b));

  json spec = {
      {"ociVersion", kOciVersion},
      {"process", std::move(process)},
      {"root", {{"path", in.rootfs}, {"readonly", in.rootfs_readonly}}},
      {"hostname", in.hostname},
      {"mounts", std::move(all_mounts)},
      {"linux", std::move(linux_section)},
  };
  if (!in.annotations.empty()) spec["annotations"] = in.annotations;
  return spec;
}

}  // namespace cvm::agent
