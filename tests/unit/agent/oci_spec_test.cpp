#include "cvm/agent/oci_spec.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "cvm/agent/capabilities.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

SpecInput base_input() {
  SpecInput in;
  in.hostname = "ws-1";
  in.ids = IdRange{165536, 65536};
  in.cgroups_path = "/cvm/ws-1";
  return in;
}

const json* find_by(const json& array, const char* key, std::string_view value) {
  for (const auto& e : array) {
    if (e.contains(key) && e[key] == value) return &e;
  }
  return nullptr;
}

bool has_device_rule(const json& spec, int64_t major, int64_t minor) {
  for (const auto& d : spec["linux"]["resources"]["devices"]) {
    if (d.value("allow", false) && d.value("major", -1) == major && d.value("minor", -1) == minor) {
      return true;
    }
  }
  return false;
}

TEST(OciSpec, VersionAndProcessBasics) {
  const json spec = build_runtime_spec(base_input());
  EXPECT_EQ(spec["ociVersion"], "1.0.2");
  EXPECT_EQ(spec["hostname"], "ws-1");
  EXPECT_EQ(spec["root"]["path"], "rootfs");
  EXPECT_EQ(spec["process"]["terminal"], false);
  EXPECT_EQ(spec["process"]["user"]["uid"], 0);
  EXPECT_EQ(spec["process"]["cwd"], "/");
  EXPECT_EQ(spec["process"]["noNewPrivileges"], true);
  EXPECT_EQ(spec["linux"]["cgroupsPath"], "/cvm/ws-1");
}

TEST(OciSpec, SbinInitWhenPresent) {
  SpecInput in = base_input();
  in.has_sbin_init = true;
  EXPECT_EQ(build_runtime_spec(in)["process"]["args"], json({"/sbin/init"}));
}

TEST(OciSpec, SleepEntrypointOtherwise) {
  const json args = build_runtime_spec(base_input())["process"]["args"];
  EXPECT_EQ(args, json(sleep_entrypoint()));
  ASSERT_EQ(args.size(), 3u);
  EXPECT_EQ(args[0], "/bin/sh");
  // The TERM trap is what lets SIGTERM stop a shell running as PID 1.
  EXPECT_NE(args[2].get<std::string>().find("trap"), std::string::npos);
}

TEST(OciSpec, ExplicitArgsWin) {
  SpecInput in = base_input();
  in.has_sbin_init = true;
  in.args = {"/usr/bin/env"};
  EXPECT_EQ(build_runtime_spec(in)["process"]["args"], json({"/usr/bin/env"}));
}

TEST(OciSpec, EnvDefaultsAddedOnlyWhenMissing) {
  SpecInput in = base_input();
  in.env = {"PATH=/bin", "FOO=bar"};
  const auto env = build_runtime_spec(in)["process"]["env"].get<std::vector<std::string>>();
  EXPECT_EQ(std::count(env.begin(), env.end(), "PATH=/bin"), 1);
  EXPECT_EQ(std::count_if(env.begin(), env.end(), [](auto& e) { return e.rfind("PATH=", 0) == 0; }),
            1);
  EXPECT_NE(std::find(env.begin(), env.end(), "FOO=bar"), env.end());
  EXPECT_NE(std::find(env.begin(), env.end(), "HOME=/root"), env.end());
  EXPECT_NE(std::find(env.begin(), env.end(), "TERM=xterm"), env.end());
}

TEST(OciSpec, IdMappings) {
  const json spec = build_runtime_spec(base_input());
  for (const char* key : {"uidMappings", "gidMappings"}) {
    const json& m = spec["linux"][key];
    ASSERT_EQ(m.size(), 1u) << key;
    EXPECT_EQ(m[0]["containerID"], 0) << key;
    EXPECT_EQ(m[0]["hostID"], 165536) << key;
    EXPECT_EQ(m[0]["size"], 65536) << key;
  }
}

TEST(OciSpec, AllNamespacesIncludingUser) {
  const json spec = build_runtime_spec(base_input());
  const json& ns = spec["linux"]["namespaces"];
  for (const char* type : {"pid", "ipc", "uts", "mount", "network", "user", "cgroup"}) {
    EXPECT_TRUE(find_by(ns, "type", type)) << type;
  }
  EXPECT_EQ(ns.size(), 7u);
}

TEST(OciSpec, DefaultMounts) {
  const json spec = build_runtime_spec(base_input());
  const json& mounts = spec["mounts"];
  for (const char* dest : {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"}) {
    EXPECT_TRUE(find_by(mounts, "destination", dest)) << dest;
  }
  const json* sys = find_by(mounts, "destination", "/sys");
  ASSERT_TRUE(sys);
  EXPECT_EQ((*sys)["type"], "sysfs");
  const auto opts = (*sys)["options"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(opts.begin(), opts.end(), "ro"), opts.end());
}

TEST(OciSpec, DevptsGidOnlyWhenMapped) {
  SpecInput in = base_input();
  auto devpts_opts = [](const json& spec) {
    return (*find_by(spec["mounts"], "destination", "/dev/pts"))["options"]
        .get<std::vector<std::string>>();
  };
  auto opts = devpts_opts(build_runtime_spec(in));
  EXPECT_NE(std::find(opts.begin(), opts.end(), "gid=5"), opts.end());
  in.ids.count = 1;  // only root mapped: gid 5 does not exist in the container
  opts = devpts_opts(build_runtime_spec(in));
  EXPECT_EQ(std::find(opts.begin(), opts.end(), "gid=5"), opts.end());
}

TEST(OciSpec, MaskedAndReadonlyPaths) {
  const json spec = build_runtime_spec(base_input());
  const auto masked = spec["linux"]["maskedPaths"].get<std::vector<std::string>>();
  const auto ro = spec["linux"]["readonlyPaths"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(masked.begin(), masked.end(), "/proc/kcore"), masked.end());
  EXPECT_NE(std::find(masked.begin(), masked.end(), "/sys/firmware"), masked.end());
  EXPECT_NE(std::find(ro.begin(), ro.end(), "/proc/sys"), ro.end());
  EXPECT_NE(std::find(ro.begin(), ro.end(), "/proc/sysrq-trigger"), ro.end());
}

TEST(OciSpec, DevicesDefaultDenyPlusOciDefaults) {
  const json spec = build_runtime_spec(base_input());
  const json& rules = spec["linux"]["resources"]["devices"];
  ASSERT_FALSE(rules.empty());
  EXPECT_EQ(rules[0]["allow"], false);
  EXPECT_EQ(rules[0]["access"], "rwm");
  EXPECT_FALSE(rules[0].contains("major"));
  for (auto [major, minor] :
       std::vector<std::pair<int, int>>{{1, 3}, {1, 5}, {1, 7}, {1, 8}, {1, 9}, {5, 0}, {5, 2}}) {
    EXPECT_TRUE(has_device_rule(spec, major, minor)) << major << ":" << minor;
  }
  EXPECT_TRUE(find_by(rules, "type", "c"));
  // /dev/pts/*: a rule for major 136 without a minor.
  EXPECT_TRUE(std::any_of(rules.begin(), rules.end(), [](const json& r) {
    return r.value("major", -1) == 136 && !r.contains("minor") && r["allow"] == true;
  }));
}

TEST(OciSpec, TunAndFuseOnlyWhenAsked) {
  SpecInput in = base_input();
  json spec = build_runtime_spec(in);
  EXPECT_FALSE(has_device_rule(spec, 10, 200));
  EXPECT_FALSE(has_device_rule(spec, 10, 229));
  EXPECT_FALSE(spec["linux"].contains("devices"));

  in.tun = true;
  spec = build_runtime_spec(in);
  EXPECT_TRUE(has_device_rule(spec, 10, 200));
  EXPECT_FALSE(has_device_rule(spec, 10, 229));
  ASSERT_EQ(spec["linux"]["devices"].size(), 1u);
  EXPECT_EQ(spec["linux"]["devices"][0]["path"], "/dev/net/tun");
  EXPECT_EQ(spec["linux"]["devices"][0]["major"], 10);
  EXPECT_EQ(spec["linux"]["devices"][0]["minor"], 200);

  in.tun = false;
  in.fuse = true;
  spec = build_runtime_spec(in);
  EXPECT_FALSE(has_device_rule(spec, 10, 200));
  EXPECT_TRUE(has_device_rule(spec, 10, 229));
  ASSERT_EQ(spec["linux"]["devices"].size(), 1u);
  EXPECT_EQ(spec["linux"]["devices"][0]["path"], "/dev/fuse");

  in.tun = true;
  EXPECT_EQ(build_runtime_spec(in)["linux"]["devices"].size(), 2u);
}

TEST(OciSpec, CpuQuotaMath) {
  EXPECT_EQ(cpu_quota_us(0), 0);
  EXPECT_EQ(cpu_quota_us(1000), 100000);
  EXPECT_EQ(cpu_quota_us(500), 50000);
  EXPECT_EQ(cpu_quota_us(2500), 250000);
  EXPECT_EQ(cpu_quota_us(1), kMinCpuQuotaUs);   // 100 us would be refused by the kernel
  EXPECT_EQ(cpu_quota_us(10), kMinCpuQuotaUs);  // exactly the minimum
  EXPECT_EQ(cpu_quota_us(1500, 50000), 75000);
}

TEST(OciSpec, CpuAndMemoryResources) {
  SpecInput in = base_input();
  json res = build_runtime_spec(in)["linux"]["resources"];
  EXPECT_FALSE(res.contains("cpu"));
  EXPECT_FALSE(res.contains("memory"));

  in.cpu_millicores = 1500;
  in.memory_limit_bytes = uint64_t{2} << 30;
  res = build_runtime_spec(in)["linux"]["resources"];
  EXPECT_EQ(res["cpu"]["quota"], 150000);
  EXPECT_EQ(res["cpu"]["period"], 100000);
  EXPECT_EQ(res["cpu"]["shares"], 1536);
  EXPECT_EQ(res["memory"]["limit"], int64_t{2} << 30);
  EXPECT_FALSE(res["cpu"].contains("cpus")) << "not pinned unless told";
  in.cpuset = "0-1";
  res = build_runtime_spec(in)["linux"]["resources"];
  EXPECT_EQ(res["cpu"]["cpus"], "0-1");
  EXPECT_EQ(res["cpu"]["quota"], 150000);
}

TEST(OciSpec, CapabilitiesIntersectedWithHostBoundingSet) {
  SpecInput in = base_input();
  auto caps_of = [](const json& spec) {
    return spec["process"]["capabilities"]["bounding"].get<std::vector<std::string>>();
  };
  auto caps = caps_of(build_runtime_spec(in));
  EXPECT_NE(std::find(caps.begin(), caps.end(), "CAP_SYS_RESOURCE"), caps.end());
  EXPECT_NE(std::find(caps.begin(), caps.end(), "CAP_SYS_ADMIN"), caps.end());

  in.host_cap_bounding = 0x000001fffeffffffULL;  // this CI host: no CAP_SYS_RESOURCE (24)
  const json spec = build_runtime_spec(in);
  caps = caps_of(spec);
  EXPECT_EQ(std::find(caps.begin(), caps.end(), "CAP_SYS_RESOURCE"), caps.end());
  EXPECT_NE(std::find(caps.begin(), caps.end(), "CAP_SYS_ADMIN"), caps.end());
  // All the workspace profile holds, but the one the host lacks.
  EXPECT_EQ(caps.size(), system_container_capabilities().size() - 1);
  EXPECT_EQ(spec["process"]["capabilities"]["effective"],
            spec["process"]["capabilities"]["bounding"]);
  EXPECT_EQ(spec["process"]["capabilities"]["permitted"],
            spec["process"]["capabilities"]["bounding"]);
  EXPECT_FALSE(spec["process"]["capabilities"].contains("inheritable"));
  EXPECT_FALSE(spec["process"]["capabilities"].contains("ambient"));

  in.capability_profile = CapabilityProfile::kDocker;
  in.host_cap_bounding = (uint64_t{1} << 0) | (uint64_t{1} << 5);  // CHOWN, KILL
  EXPECT_EQ(caps_of(build_runtime_spec(in)), (std::vector<std::string>{"CAP_CHOWN", "CAP_KILL"}));
}

TEST(OciSpec, NofileClampedToHostHardLimit) {
  SpecInput in = base_input();
  auto nofile = [](const json& spec) { return spec["process"]["rlimits"][0]; };
  EXPECT_EQ(nofile(build_runtime_spec(in))["hard"], 1048576);
  in.host_nofile_hard = 20000;
  const json r = nofile(build_runtime_spec(in));
  EXPECT_EQ(r["type"], "RLIMIT_NOFILE");
  EXPECT_EQ(r["hard"], 20000);
  EXPECT_EQ(r["soft"], 20000);
}

TEST(OciSpec, AnnotationsPassThrough) {
  SpecInput in = base_input();
  EXPECT_FALSE(build_runtime_spec(in).contains("annotations"));
  in.annotations["cvm.workspace"] = "ws-1";
  EXPECT_EQ(build_runtime_spec(in)["annotations"]["cvm.workspace"], "ws-1");
}

// ---- capabilities -------------------------------------------------------------------------------

TEST(OciSpec, AnythingButAMachineReadsItsCgroupAndSysctlsOnly) {
  const json spec = build_runtime_spec(base_input());
  const json* cgroup = find_by(spec["mounts"], "destination", "/sys/fs/cgroup");
  ASSERT_NE(cgroup, nullptr);
  const auto options = (*cgroup)["options"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(options.begin(), options.end(), "ro"), options.end());
  const auto ro = spec["linux"]["readonlyPaths"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(ro.begin(), ro.end(), "/proc/sys"), ro.end());
  EXPECT_EQ(find_by(spec["mounts"], "destination", "/run"), nullptr);
  EXPECT_FALSE(spec["process"]["terminal"].get<bool>());
  const auto env = spec["process"]["env"].get<std::vector<std::string>>();
  EXPECT_EQ(std::find(env.begin(), env.end(), "container=cvm"), env.end());
}

TEST(OciSpec, AMachineOwnsItsCgroupSysctlsRunAndConsole) {
  SpecInput in = base_input();
  in.machine = true;
  in.console = true;
  const json spec = build_runtime_spec(in);
  const json* cgroup = find_by(spec["mounts"], "destination", "/sys/fs/cgroup");
  ASSERT_NE(cgroup, nullptr);
  const auto options = (*cgroup)["options"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(options.begin(), options.end(), "rw"), options.end());
  EXPECT_EQ(std::find(options.begin(), options.end(), "ro"), options.end());
  // Namespaced sysctls are the machine's (dockerd writes ip_forward); the rest stays read-only.
  const auto ro = spec["linux"]["readonlyPaths"].get<std::vector<std::string>>();
  EXPECT_EQ(std::find(ro.begin(), ro.end(), "/proc/sys"), ro.end());
  EXPECT_NE(std::find(ro.begin(), ro.end(), "/proc/sysrq-trigger"), ro.end());
  for (const char* tmpfs : {"/run", "/run/lock"}) {
    const json* m = find_by(spec["mounts"], "destination", tmpfs);
    ASSERT_NE(m, nullptr) << tmpfs;
    EXPECT_EQ((*m)["type"], "tmpfs") << tmpfs;
  }
  // /run comes after /sys/fs/cgroup and before /run/lock: mounts are made in order.
  std::vector<std::string> order;
  for (const auto& m : spec["mounts"]) order.push_back(m["destination"]);
  const auto run = std::find(order.begin(), order.end(), "/run");
  EXPECT_LT(run, std::find(order.begin(), order.end(), "/run/lock"));
  EXPECT_TRUE(spec["process"]["terminal"].get<bool>());
  auto env = spec["process"]["env"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(env.begin(), env.end(), "container=cvm"), env.end());
  // An image that says what container it is keeps its word.
  in.env = {"container=lxc"};
  env = build_runtime_spec(in)["process"]["env"].get<std::vector<std::string>>();
  EXPECT_EQ(std::count_if(env.begin(), env.end(),
                          [](const std::string& e) { return e.rfind("container=", 0) == 0; }),
            1);
}

TEST(OciSpec, BindsAreNosuidUnlessSaidOtherwise) {
  SpecInput in = base_input();
  in.binds = {{"/a", "/x", true, true}, {"/b", "/var/lib/docker", false, false}};
  const json spec = build_runtime_spec(in);
  const json* x = find_by(spec["mounts"], "destination", "/x");
  const json* docker = find_by(spec["mounts"], "destination", "/var/lib/docker");
  ASSERT_NE(x, nullptr);
  ASSERT_NE(docker, nullptr);
  const auto xo = (*x)["options"].get<std::vector<std::string>>();
  const auto dop = (*docker)["options"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(xo.begin(), xo.end(), "nosuid"), xo.end());
  EXPECT_NE(std::find(xo.begin(), xo.end(), "ro"), xo.end());
  EXPECT_EQ(std::find(dop.begin(), dop.end(), "nosuid"), dop.end());
  EXPECT_NE(std::find(dop.begin(), dop.end(), "rw"), dop.end());
}

TEST(OciSpec, NoCpuSectionWithoutAQuota) {
  SpecInput in = base_input();
  in.cpu_millicores = 0;
  in.memory_limit_bytes = 1 << 30;
  const json spec = build_runtime_spec(in);
  EXPECT_FALSE(spec["linux"]["resources"].contains("cpu"));
  EXPECT_TRUE(spec["linux"]["resources"].contains("memory"));
}

TEST(Capabilities, NamesAndNumbers) {
  EXPECT_EQ(capability_name(0), "CAP_CHOWN");
  EXPECT_EQ(capability_name(21), "CAP_SYS_ADMIN");
  EXPECT_EQ(capability_name(24), "CAP_SYS_RESOURCE");
  EXPECT_EQ(capability_name(40), "CAP_CHECKPOINT_RESTORE");
  EXPECT_EQ(capability_name(41), "");
  EXPECT_EQ(capability_name(-1), "");
  EXPECT_EQ(capability_number("CAP_SYS_ADMIN"), 21);
  EXPECT_EQ(capability_number("sys_admin"), 21);
  EXPECT_EQ(capability_number("CAP_NOPE"), std::nullopt);
}

TEST(Capabilities, StatusMask) {
  const std::string status = "Name:\tbash\nCapInh:\t0000000000000000\nCapBnd:\t000001fffeffffff\n";
  const auto bnd = parse_status_cap_mask(status);
  ASSERT_TRUE(bnd.ok());
  EXPECT_EQ(*bnd, 0x000001fffeffffffULL);
  EXPECT_EQ(*parse_status_cap_mask(status, "CapInh"), 0u);
  EXPECT_TRUE(parse_status_cap_mask("Name:\tx\n").error().is_not_found());
  EXPECT_FALSE(parse_status_cap_mask("CapBnd:\tzz\n").ok());
  EXPECT_FALSE(parse_status_cap_mask("CapBnd:\t\n").ok());
}

TEST(Capabilities, MaskToNamesAndIntersection) {
  EXPECT_EQ(capability_names_from_mask(0b100001),
            (std::vector<std::string>{"CAP_CHOWN", "CAP_KILL"}));
  EXPECT_EQ(capability_names_from_mask(0).size(), 0u);
  const auto machine = system_container_capabilities();
  EXPECT_EQ(machine.size(),
            static_cast<size_t>(kLastCapability + 1) - never_in_a_workspace().size());
  const auto holds = [&](const char* cap) {
    return std::find(machine.begin(), machine.end(), cap) != machine.end();
  };
  for (const auto& dropped : never_in_a_workspace())
    EXPECT_FALSE(holds(dropped.c_str())) << dropped;
  // What systemd, Docker, sudo and poweroff inside need stays.
  for (const char* kept : {"CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_NET_ADMIN", "CAP_SETUID",
                           "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
                           "CAP_DAC_READ_SEARCH", "CAP_SYS_NICE", "CAP_IPC_LOCK"}) {
    EXPECT_TRUE(holds(kept)) << kept;
  }
  EXPECT_EQ(intersect_capabilities({"CAP_KILL", "CAP_NOPE", "CAP_KILL", "CAP_CHOWN"}, ~0ULL),
            (std::vector<std::string>{"CAP_KILL", "CAP_CHOWN"}));
  EXPECT_EQ(docker_default_capabilities().size(), 14u);
}

}  // namespace
}  // namespace cvm::agent
