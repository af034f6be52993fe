// The supervising container's spec and the documented hostPath table, exhaustively.
#include <gtest/gtest.h>

#include <algorithm>

#include "cvm/agent/capabilities.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/supervisor_spec.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

const json* find_mount(const json& spec, const std::string& destination) {
  for (const auto& m : spec["mounts"]) {
    if (m["destination"] == destination) return &m;
  }
  return nullptr;
}

bool has_option(const json& mount, const std::string& option) {
  if (!mount.contains("options")) return false;
  const auto& o = mount["options"];
  return std::find(o.begin(), o.end(), option) != o.end();
}

TEST(MountTable, EveryRowAsDocumented) {
  // | Caching | Auto-load | /usr/src | /lib/modules | /var/run | /var/lib |
  using V = std::vector<HostPathMount>;
  const V off = {{"/usr/src", true}, {"/lib/modules", true}};
  EXPECT_EQ(supervisor_host_paths(false, false), off);
  EXPECT_EQ(supervisor_host_paths(false, true), off) << "auto-load is n/a with Caching off";
  EXPECT_EQ(
      supervisor_host_paths(true, false),
      (V{{"/usr/src", true}, {"/lib/modules", true}, {"/var/run", true}, {"/var/lib", false}}));
  EXPECT_EQ(
      supervisor_host_paths(true, true),
      (V{{"/usr/src", false}, {"/lib/modules", false}, {"/var/run", true}, {"/var/lib", false}}));
}

SupervisorSpecInput sample_input() {
  SupervisorSpecInput in;
  in.hostname = "ws1";
  in.files = {"/usr/sbin/runc", "/lib/x86_64-linux-gnu/libc.so.6"};
  in.supervisor_binary = "/opt/cvm/cvm-supervisor";
  in.runtime_binary = "/usr/sbin/runc";
  in.inner_bundle = "/var/lib/cvm-agent/workspaces/ws1/bundle";
  in.run_dir = "/var/lib/cvm-agent/workspaces/ws1/run";
  for (const auto& row : supervisor_host_paths(true, false)) {
    in.host_paths.push_back({"/host" + row.path, row});
  }
  in.cgroups_path = "/cvm/cvm-ws1";
  in.memory_limit_bytes = 1ULL << 30;
  in.cpu_millicores = 2000;
  in.devices = {tun_device()};
  in.stop_grace = std::chrono::milliseconds(7000);
  return in;
}

TEST(SupervisorSpec, PrivilegedWithoutUserNamespaceButNamespaced) {
  const json spec = build_supervisor_spec(sample_input());
  const auto& linux_section = spec["linux"];
  EXPECT_FALSE(linux_section.contains("uidMappings"));
  EXPECT_FALSE(linux_section.contains("gidMappings"));
  std::vector<std::string> ns;
  for (const auto& n : linux_section["namespaces"]) ns.push_back(n["type"]);
  EXPECT_EQ(ns, (std::vector<std::string>{"pid", "ipc", "uts", "mount", "network", "cgroup"}));
  EXPECT_TRUE(linux_section["maskedPaths"].empty()) << "a masked /proc blocks the inner proc mount";
  EXPECT_TRUE(spec["root"]["readonly"].get<bool>());
  EXPECT_FALSE(spec["process"]["noNewPrivileges"].get<bool>())
      << "inherited by the workspace's init and sessions: sudo would stop working";
  EXPECT_EQ(linux_section["cgroupsPath"], "/cvm/cvm-ws1");
  EXPECT_EQ(linux_section["resources"]["memory"]["limit"],
            static_cast<int64_t>((1ULL << 30) + kSupervisorMemoryOverhead));
  EXPECT_FALSE(linux_section["resources"]["cpu"].contains("cpus"));
  auto pinned = sample_input();
  pinned.cpuset = "1";
  EXPECT_EQ(build_supervisor_spec(pinned)["linux"]["resources"]["cpu"]["cpus"], "1");
}

TEST(SupervisorSpec, RunsTheSupervisorOnTheInnerBundle) {
  const json spec = build_supervisor_spec(sample_input());
  const std::vector<std::string> args = spec["process"]["args"];
  EXPECT_EQ(args, supervisor_args(sample_input()));
  EXPECT_EQ(args.front(), kSupervisorBinary);
  EXPECT_NE(std::find(args.begin(), args.end(), "/usr/sbin/runc"), args.end());
  EXPECT_NE(std::find(args.begin(), args.end(), "7000"), args.end()) << "the grace is passed on";

  const json* binary = find_mount(spec, std::string(kSupervisorBinary));
  ASSERT_NE(binary, nullptr);
  EXPECT_EQ((*binary)["source"], "/opt/cvm/cvm-supervisor");
  EXPECT_TRUE(has_option(*binary, "ro"));
  for (const auto& file : sample_input().files) {
    const json* m = find_mount(spec, file);
    ASSERT_NE(m, nullptr) << file;
    EXPECT_TRUE(has_option(*m, "ro")) << file;
  }
  const json* inner = find_mount(spec, std::string(kSupervisorInnerBundle));
  ASSERT_NE(inner, nullptr);
  EXPECT_EQ((*inner)["source"], "/var/lib/cvm-agent/workspaces/ws1/bundle");
  EXPECT_TRUE(has_option(*inner, "rw"));
  EXPECT_FALSE(has_option(*inner, "nosuid")) << "the inner rootfs would inherit nosuid (sudo)";
  EXPECT_EQ(find_mount(spec, std::string(kSupervisorStorageDir)), nullptr) << "none was given";
  const json* run = find_mount(spec, std::string(kSupervisorRunDir));
  ASSERT_NE(run, nullptr);
  EXPECT_TRUE(has_option(*run, "rw"));
  const json* cgroup = find_mount(spec, "/sys/fs/cgroup");
  ASSERT_NE(cgroup, nullptr);
  EXPECT_TRUE(has_option(*cgroup, "rw")) << "runc makes the inner cgroup below the supervisor's";
  EXPECT_EQ(find_mount(spec, std::string(kSupervisorGpuLibDir)), nullptr);
}

TEST(SupervisorSpec, WorkspaceStorageAndItsConsoleLog) {
  auto in = sample_input();
  in.storage_dir = "/var/lib/cvm-agent/storage/ws1";
  in.console_log_max_bytes = 4096;
  const json spec = build_supervisor_spec(in);
  const json* storage = find_mount(spec, std::string(kSupervisorStorageDir));
  ASSERT_NE(storage, nullptr);
  EXPECT_EQ((*storage)["source"], in.storage_dir);
  EXPECT_TRUE(has_option(*storage, "rw"));
  EXPECT_FALSE(has_option(*storage, "nosuid")) << "the inner Docker's layers hold setuid files";
  const std::vector<std::string> args = spec["process"]["args"];
  const auto at = std::find(args.begin(), args.end(), "--console-log");
  ASSERT_NE(at, args.end());
  EXPECT_EQ(*(at + 1), std::string(kSupervisorStorageDir) + "/console.log");
  const auto max = std::find(args.begin(), args.end(), "--console-log-max");
  ASSERT_NE(max, args.end());
  EXPECT_EQ(*(max + 1), "4096");
}

TEST(SupervisorSpec, HostPathsFromTheTableWithTheirModes) {
  const json spec = build_supervisor_spec(sample_input());
  for (const auto& row : supervisor_host_paths(true, false)) {
    const json* m = find_mount(spec, row.path);
    ASSERT_NE(m, nullptr) << row.path;
    EXPECT_EQ((*m)["source"], "/host" + row.path);
    EXPECT_EQ(has_option(*m, "ro"), row.read_only) << row.path;
    EXPECT_EQ(has_option(*m, "rw"), !row.read_only) << row.path;
  }
}

TEST(SupervisorSpec, DevicesAreCreatedOpenableAndAllowed) {
  auto in = sample_input();
  in.devices.push_back(DeviceNode{"/dev/nvidia3", 195, 3, 0666});
  const json spec = build_supervisor_spec(in);
  const auto& nodes = spec["linux"]["devices"];
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[0]["path"], "/dev/net/tun");
  EXPECT_EQ(nodes[0]["fileMode"], 0666) << "mapped root of the inner container must open it";
  EXPECT_EQ(nodes[1]["path"], "/dev/nvidia3");
  EXPECT_EQ(nodes[1]["major"], 195);
  bool allowed = false;
  for (const auto& rule : spec["linux"]["resources"]["devices"]) {
    if (rule.value("major", -1) == 195 && rule.value("minor", -1) == 3) allowed = rule["allow"];
  }
  EXPECT_TRUE(allowed);
}

TEST(SupervisorSpec, CapabilitiesAreClampedToTheHostBoundingSet) {
  auto in = sample_input();
  const json unclamped = build_supervisor_spec(in);
  const std::vector<std::string> all = unclamped["process"]["capabilities"]["bounding"];
  EXPECT_EQ(all, supervisor_capabilities());
  EXPECT_EQ(std::count(all.begin(), all.end(), "CAP_SYS_MODULE"), 0);
  EXPECT_EQ(std::count(all.begin(), all.end(), "CAP_SYS_ADMIN"), 1);
  // A host without CAP_SYS_RESOURCE (as this project's CI host).
  in.host_cap_bounding = ~(uint64_t{1} << *capability_number("CAP_SYS_RESOURCE"));
  const json clamped = build_supervisor_spec(in);
  const std::vector<std::string> caps = clamped["process"]["capabilities"]["effective"];
  EXPECT_EQ(std::count(caps.begin(), caps.end(), "CAP_SYS_RESOURCE"), 0);
  EXPECT_EQ(caps.size(), all.size() - 1);
}

TEST(SupervisorSpec, GpuLibrariesAndExtraBinds) {
  auto in = sample_input();
  in.gpu_library_dir = "/usr/local/nvidia/lib64";
  in.extra_binds = {{"/run/sysbox", "/run/sysbox", false}};
  const json spec = build_supervisor_spec(in);
  const json* gpu = find_mount(spec, std::string(kSupervisorGpuLibDir));
  ASSERT_NE(gpu, nullptr);
  EXPECT_EQ((*gpu)["source"], "/usr/local/nvidia/lib64");
  EXPECT_TRUE(has_option(*gpu, "ro"));
  const json* sysbox = find_mount(spec, "/run/sysbox");
  ASSERT_NE(sysbox, nullptr);
  EXPECT_TRUE(has_option(*sysbox, "rw"));
}

TEST(SupervisorSpec, NoLimitMeansNoMemoryLimit) {
  auto in = sample_input();
  in.memory_limit_bytes = 0;
  const json spec = build_supervisor_spec(in);
  EXPECT_FALSE(spec["linux"]["resources"].contains("memory"));
}

TEST(Ldd, ParsesLibrariesLoaderAndSkipsVdso) {
  const auto libs = parse_ldd_output(
      "\tlinux-vdso.so.1 (0x00007ffd)\n"
      "\tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f1f)\n"
      "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1e)\n"
      "\t/lib64/ld-linux-x86-64.so.2 (0x00007f1f578c9000)\n"
      "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1e)\n");
  ASSERT_TRUE(libs.ok());
  EXPECT_EQ(*libs, (std::vector<std::string>{"/lib/x86_64-linux-gnu/libseccomp.so.2",
                                             "/lib/x86_64-linux-gnu/libc.so.6",
                                             "/lib64/ld-linux-x86-64.so.2"}));
}

TEST(Ldd, StaticBinaryHasNone) {
  auto libs = parse_ldd_output("\tstatically linked\n");
  ASSERT_TRUE(libs.ok());
  EXPECT_TRUE(libs->empty());
  libs = parse_ldd_output("\tnot a dynamic executable\n");
  ASSERT_TRUE(libs.ok());
  EXPECT_TRUE(libs->empty());
}

TEST(Ldd, MissingLibraryIsAnError) {
  const auto libs = parse_ldd_output("\tlibfoo.so.1 => not found\n");
  ASSERT_FALSE(libs.ok());
  EXPECT_TRUE(libs.error().is_not_found());
  EXPECT_NE(libs.error().message.find("libfoo.so.1"), std::string::npos);
}

TEST(SupervisorStatus, ParsesEveryState) {
  using S = SupervisorStatus::State;
  auto s = parse_supervisor_status(R"({"state":"running","pid":7})");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->state, S::kRunning);
  EXPECT_EQ(s->pid, 7);
  s = parse_supervisor_status(R"({"state":"failed","message":"runc create: exit 1: boom"})");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->state, S::kFailed);
  EXPECT_EQ(s->message, "runc create: exit 1: boom");
  s = parse_supervisor_status(R"({"state":"exited","code":3})");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->code, 3);
  EXPECT_EQ(parse_supervisor_status(R"({"state":"stopped"})")->state, S::kStopped);
  EXPECT_EQ(parse_supervisor_status(R"({"state":"stopping"})")->state, S::kStopping);
  s = parse_supervisor_status(R"({"state":"created","pid":12})");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->state, S::kCreated);
  EXPECT_EQ(s->pid, 12);
}

TEST(SupervisorArgs, NetworkWaitOnlyWhenTheNetworkIsOn) {
  SupervisorSpecInput in = sample_input();
  const auto without = supervisor_args(in);
  EXPECT_EQ(std::find(without.begin(), without.end(), "--network-wait-ms"), without.end());
  in.network_wait = std::chrono::milliseconds(45000);
  const auto with = supervisor_args(in);
  auto it = std::find(with.begin(), with.end(), "--network-wait-ms");
  ASSERT_NE(it, with.end());
  ASSERT_NE(it + 1, with.end());
  EXPECT_EQ(*(it + 1), "45000");
}

TEST(SupervisorStatus, RejectsGarbage) {
  for (const char* bad : {"", "{", "[]", R"({"state":1})", R"({"state":"dancing"})", "null"}) {
    EXPECT_FALSE(parse_supervisor_status(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace cvm::agent
