#include "cvm/agent/host_probe.h"

#include <gtest/gtest.h>

#include "fixture_tree.h"

namespace cvm::agent {
namespace {

using testing::FixtureTree;

constexpr const char* kCpuinfoVm =
    "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse hypervisor lahf_lm\n\n"
    "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse hypervisor lahf_lm\n\n";
constexpr const char* kCpuinfoMetal =
    "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr\n\nprocessor\t: 1\nflags\t\t: fpu vme\n\n"
    "processor\t: 2\nflags\t\t: fpu vme\n\nprocessor\t: 3\nflags\t\t: fpu vme\n\n";
constexpr const char* kMeminfo =
    "MemTotal:       16384256 kB\nMemFree:         1234567 kB\nMemAvailable:    9999999 kB\n";

// A host with procfs/sysfs/rootfs under one fixture tree; tests add what each case needs.
class HostTree {
 public:
  explicit HostTree(const std::string& kernel = "6.1.0-18-amd64") {
    tree_.write("proc/sys/kernel/osrelease", kernel + "\n");
    tree_.write("proc/cpuinfo", kCpuinfoMetal);
    tree_.write("proc/meminfo", kMeminfo);
    tree_.write("proc/modules", "overlay 151552 0 - Live 0x0000000000000000\n");
    tree_.mkdir("sys/class");
    tree_.mkdir("root");
    roots_.procfs = tree_.path("proc");
    roots_.sysfs = tree_.path("sys");
    roots_.rootfs = tree_.path("root");
  }
  [[nodiscard]] const HostRoots& roots() const { return roots_; }
  [[nodiscard]] const FixtureTree& tree() const { return tree_; }

 private:
  FixtureTree tree_;
  HostRoots roots_;
};

// ---- kernel versions ----------------------------------------------------------------------------

TEST(KernelVersion, ParsesDistroReleases) {
  EXPECT_EQ(parse_kernel_version("6.1.0-18-amd64"), (KernelVersion{6, 1, 0}));
  EXPECT_EQ(parse_kernel_version("5.15.0-1049-gcp\n"), (KernelVersion{5, 15, 0}));
  EXPECT_EQ(parse_kernel_version("5.4"), (KernelVersion{5, 4, 0}));
  EXPECT_EQ(parse_kernel_version("6.18.44-fc-v669"), (KernelVersion{6, 18, 44}));
  EXPECT_EQ(parse_kernel_version("4.18.0-513.el8.x86_64"), (KernelVersion{4, 18, 0}));
  EXPECT_EQ(parse_kernel_version("5.12-rc1"), (KernelVersion{5, 12, 0}));
}

TEST(KernelVersion, RejectsGarbage) {
  EXPECT_FALSE(parse_kernel_version(""));
  EXPECT_FALSE(parse_kernel_version("linux"));
  EXPECT_FALSE(parse_kernel_version("6"));
  EXPECT_FALSE(parse_kernel_version("6."));
  EXPECT_FALSE(parse_kernel_version("v6.1"));
}

TEST(KernelVersion, IdmappedMountsFrom512) {
  EXPECT_FALSE(supports_idmapped_mounts("5.11.22"));
  EXPECT_FALSE(supports_idmapped_mounts("5.4.0-150-generic"));
  EXPECT_FALSE(supports_idmapped_mounts("4.19.0"));
  EXPECT_TRUE(supports_idmapped_mounts("5.12.0"));
  EXPECT_TRUE(supports_idmapped_mounts("5.15.0-91-generic"));
  EXPECT_TRUE(supports_idmapped_mounts("6.1.0-18-amd64"));
  EXPECT_TRUE(supports_idmapped_mounts("10.0.0"));
  EXPECT_FALSE(supports_idmapped_mounts("garbage"));  // never claimed on a guess
}

TEST(KernelVersion, AtLeastComparesAllParts) {
  EXPECT_TRUE(kernel_at_least("5.12.3", {5, 12, 3}));
  EXPECT_FALSE(kernel_at_least("5.12.2", {5, 12, 3}));
  EXPECT_TRUE(kernel_at_least("6.0.0", {5, 99, 99}));
}

// ---- pure parsers -------------------------------------------------------------------------------

TEST(Selinux, FromEnforceFile) {
  EXPECT_FALSE(parse_selinux(std::nullopt).enabled);
  EXPECT_FALSE(parse_selinux(std::nullopt).enforcing);
  const auto permissive = parse_selinux("0");
  EXPECT_TRUE(permissive.enabled);
  EXPECT_FALSE(permissive.enforcing);
  const auto enforcing = parse_selinux("1\n");
  EXPECT_TRUE(enforcing.enabled);
  EXPECT_TRUE(enforcing.enforcing);
}

TEST(Modules, MatchesFirstColumnOnly) {
  const std::string modules =
      "overlay 151552 0 - Live 0x0\nshiftfs 32768 0 - Live 0x0\nbridge 311296 0 - Live 0x0\n";
  EXPECT_TRUE(modules_list_has(modules, "shiftfs"));
  EXPECT_TRUE(modules_list_has(modules, "bridge"));
  EXPECT_FALSE(modules_list_has(modules, "shift"));
  EXPECT_FALSE(modules_list_has("xt_shiftfs 1 0 - Live 0x0\nfoo 1 1 shiftfs, Live\n", "shiftfs"));
  EXPECT_FALSE(modules_list_has("", "shiftfs"));
}

TEST(Cpuinfo, HypervisorFlag) {
  EXPECT_TRUE(cpuinfo_has_flag(kCpuinfoVm, "hypervisor"));
  EXPECT_FALSE(cpuinfo_has_flag(kCpuinfoMetal, "hypervisor"));
  EXPECT_FALSE(cpuinfo_has_flag("flags\t: fpu xhypervisor\n", "hypervisor"));
  EXPECT_FALSE(cpuinfo_has_flag("model name\t: hypervisor edition\n", "hypervisor"));
  EXPECT_TRUE(cpuinfo_has_flag("Features\t: fp asimd evtstrm\n", "asimd"));
}

TEST(Cpuinfo, CountsProcessors) {
  EXPECT_EQ(count_cpuinfo_processors(kCpuinfoVm), 2u);
  EXPECT_EQ(count_cpuinfo_processors(kCpuinfoMetal), 4u);
  EXPECT_EQ(count_cpuinfo_processors(""), 0u);
  EXPECT_EQ(count_cpuinfo_processors("Processor\t: ARMv7\n"), 0u);
}

TEST(CpuList, Counts) {
  EXPECT_EQ(parse_cpu_list_count("0"), 1u);
  EXPECT_EQ(parse_cpu_list_count("0-1\n"), 2u);
  EXPECT_EQ(parse_cpu_list_count("0-3,8,10-11"), 7u);
  EXPECT_EQ(parse_cpu_list_count("0-127"), 128u);
}

TEST(CpuList, RejectsMalformed) {
  EXPECT_FALSE(parse_cpu_list_count(""));
  EXPECT_FALSE(parse_cpu_list_count("3-1"));
  EXPECT_FALSE(parse_cpu_list_count("0-"));
  EXPECT_FALSE(parse_cpu_list_count("0,"));
  EXPECT_FALSE(parse_cpu_list_count("a-b"));
  EXPECT_FALSE(parse_cpu_list_count("0;1"));
}

TEST(Meminfo, TotalInBytes) {
  EXPECT_EQ(parse_meminfo_total_bytes(kMeminfo), uint64_t{16384256} * 1024);
  EXPECT_EQ(parse_meminfo_total_bytes("MemFree: 1 kB\nMemTotal: 2 kB\n"), 2048u);
  EXPECT_FALSE(parse_meminfo_total_bytes("MemFree: 1 kB\n"));
  EXPECT_FALSE(parse_meminfo_total_bytes("MemTotal: lots kB\n"));
  EXPECT_FALSE(parse_meminfo_total_bytes("MemTotal: 5 MB\n"));
  EXPECT_FALSE(parse_meminfo_total_bytes(""));
}

TEST(Virtualization, KnownClouds) {
  struct Case {
    const char* vendor;
    const char* product;
    const char* expected;
  };
  const Case cases[] = {
      {"Google", "Google Compute Engine", "Google Compute Engine"},
      {"Amazon EC2", "m5.large", "Amazon EC2"},
      {"Microsoft Corporation", "Virtual Machine", "Microsoft Hyper-V"},
      {"QEMU", "Standard PC (Q35 + ICH9, 2009)", "QEMU"},
      {"Red Hat", "KVM", "KVM"},
      {"VMware, Inc.", "VMware Virtual Platform", "VMware"},
      {"Xen", "HVM domU", "Xen"},
      {"innotek GmbH", "VirtualBox", "VirtualBox"},
      {"OpenStack Foundation", "OpenStack Nova", "OpenStack"},
      {"DigitalOcean", "Droplet", "DigitalOcean"},
      {"Hetzner", "vServer", "Hetzner Cloud"},
      {"Alibaba Cloud", "Alibaba Cloud ECS", "Alibaba Cloud ECS"},
  };
  for (const auto& c : cases) {
    const auto v = classify_virtualization(c.vendor, c.product, /*hypervisor_flag=*/true);
    EXPECT_FALSE(v.bare_metal) << c.vendor;
    EXPECT_EQ(v.name, c.expected) << c.vendor;
    // DMI alone is enough: some VMs hide the cpuid hypervisor bit.
    EXPECT_FALSE(classify_virtualization(c.vendor, c.product, false).bare_metal) << c.vendor;
  }
}

TEST(Virtualization, BareMetal) {
  const auto dell = classify_virtualization("Dell Inc.", "PowerEdge R750", false);
  EXPECT_TRUE(dell.bare_metal);
  EXPECT_EQ(dell.name, "");
  EXPECT_TRUE(classify_virtualization("", "", false).bare_metal);
  // Microsoft hardware that is not a VM (Surface) is bare metal.
  EXPECT_TRUE(classify_virtualization("Microsoft Corporation", "Surface Pro", false).bare_metal);
  EXPECT_TRUE(classify_virtualization("Amazon EC2", "m5.metal", false).bare_metal);
  EXPECT_FALSE(classify_virtualization("Amazon EC2", "m5.metal", true).bare_metal);
}

TEST(Virtualization, UnknownHypervisor) {
  const auto v = classify_virtualization("", "", true);
  EXPECT_FALSE(v.bare_metal);
  EXPECT_EQ(v.name, "unknown hypervisor");
  EXPECT_FALSE(classify_virtualization("Supermicro", "X11", true).bare_metal);
}

TEST(ToolVersions, Parse) {
  EXPECT_EQ(parse_runc_version("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\n"
                               "spec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4\n"),
            "1.1.5+ds1");
  EXPECT_EQ(parse_runc_version("runc version 1.1.12\n"), "1.1.12");
  EXPECT_EQ(parse_runc_version("something else\n"), "");
  EXPECT_EQ(parse_sysbox_version("sysbox-runc\n\tedition: \tCommunity Edition (CE)\n"
                                 "\tversion: \t0.6.2\n\tcommit: \tabc\n"),
            "0.6.2");
  EXPECT_EQ(parse_sysbox_version("nothing"), "");
  EXPECT_EQ(parse_containerd_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n"),
            "1.6.20~ds1");
  EXPECT_EQ(parse_containerd_version("containerd containerd.io 1.5.11 3df54a8\n"), "1.5.11");
  EXPECT_EQ(parse_containerd_version("containerd github.com/containerd/containerd v1.7.2 x\n"),
            "1.7.2");
  EXPECT_EQ(parse_containerd_version("ctr version 1"), "");
}

// ---- probes over fixture trees ------------------------------------------------------------------

TEST(ProbeHost, SelinuxEnforcing) {
  HostTree host;
  host.tree().write("sys/fs/selinux/enforce", "1");
  const auto caps = probe_host(host.roots());
  EXPECT_TRUE(caps.selinux_enabled());
  EXPECT_TRUE(caps.selinux_enforcing());
}

TEST(ProbeHost, SelinuxPermissive) {
  HostTree host;
  host.tree().write("sys/fs/selinux/enforce", "0");
  const auto caps = probe_host(host.roots());
  EXPECT_TRUE(caps.selinux_enabled());
  EXPECT_FALSE(caps.selinux_enforcing());
}

TEST(ProbeHost, NoSelinuxfs) {
  HostTree host;
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.selinux_enabled());
  EXPECT_FALSE(caps.selinux_enforcing());
}

TEST(ProbeHost, GceVm) {
  HostTree host;
  host.tree().write("sys/class/dmi/id/sys_vendor", "Google\n");
  host.tree().write("sys/class/dmi/id/product_name", "Google Compute Engine\n");
  host.tree().write("proc/cpuinfo", kCpuinfoVm);
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.bare_metal());
  EXPECT_EQ(caps.virtualization(), "Google Compute Engine");
}

TEST(ProbeHost, BareMetal) {
  HostTree host;
  host.tree().write("sys/class/dmi/id/sys_vendor", "Dell Inc.\n");
  host.tree().write("sys/class/dmi/id/product_name", "PowerEdge R750\n");
  const auto caps = probe_host(host.roots());
  EXPECT_TRUE(caps.bare_metal());
  EXPECT_EQ(caps.virtualization(), "");
}

TEST(PciGpu, ClassifiesDisplayControllersByVendor) {
  EXPECT_EQ(classify_pci_gpu("0x10de\n", "0x030200\n"), cvm::v1::NVIDIA);  // 3D controller
  EXPECT_EQ(classify_pci_gpu("0x10DE", "0x030000"), cvm::v1::NVIDIA);      // VGA
  EXPECT_EQ(classify_pci_gpu("0x1002", "0x030000"), cvm::v1::AMD);
  EXPECT_EQ(classify_pci_gpu("0x1002", "0x038000"), cvm::v1::AMD);
  // A GPU's HDMI audio and USB-C functions are not more GPUs.
  EXPECT_EQ(classify_pci_gpu("0x10de", "0x040300"), cvm::v1::GPU_VENDOR_UNSPECIFIED);
  EXPECT_EQ(classify_pci_gpu("0x10de", "0x0c0330"), cvm::v1::GPU_VENDOR_UNSPECIFIED);
  EXPECT_EQ(classify_pci_gpu("0x8086", "0x030000"), cvm::v1::GPU_VENDOR_UNSPECIFIED);  // Intel
  EXPECT_EQ(classify_pci_gpu("", ""), cvm::v1::GPU_VENDOR_UNSPECIFIED);
  EXPECT_EQ(classify_pci_gpu("0x10de", "0x03"), cvm::v1::GPU_VENDOR_UNSPECIFIED);
}

void add_pci(const testing::FixtureTree& tree, const std::string& addr, const std::string& vendor,
             const std::string& cls) {
  tree.write("sys/bus/pci/devices/" + addr + "/vendor", vendor + "\n");
  tree.write("sys/bus/pci/devices/" + addr + "/class", cls + "\n");
}

TEST(ProbeHost, BareMetalWithEightNvidiaGpus) {
  HostTree host;
  host.tree().write("sys/class/dmi/id/sys_vendor", "Supermicro\n");
  host.tree().write("sys/class/dmi/id/product_name", "SYS-421GE-TNRT\n");
  for (int i = 0; i < 8; ++i) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "0000:%02x:00.0", 0x18 + i * 0x10);
    add_pci(host.tree(), addr, "0x10de", "0x030200");
    std::snprintf(addr, sizeof addr, "0000:%02x:00.1", 0x18 + i * 0x10);
    add_pci(host.tree(), addr, "0x10de", "0x040300");  // its audio function
  }
  add_pci(host.tree(), "0000:00:02.0", "0x8086", "0x030000");  // the board's own VGA
  const auto caps = probe_host(host.roots());
  EXPECT_TRUE(caps.bare_metal());
  EXPECT_FALSE(caps.hypervisor_flag());
  EXPECT_EQ(caps.nvidia_pci_gpus(), 8u);
  EXPECT_EQ(caps.amd_pci_gpus(), 0u);
}

TEST(ProbeHost, AmdGpu) {
  HostTree host;
  add_pci(host.tree(), "0000:03:00.0", "0x1002", "0x030000");
  const auto caps = probe_host(host.roots());
  EXPECT_EQ(caps.amd_pci_gpus(), 1u);
  EXPECT_EQ(caps.nvidia_pci_gpus(), 0u);
}

TEST(ProbeHost, GceVmWithAGpuIsStillAVm) {
  HostTree host;
  host.tree().write("sys/class/dmi/id/sys_vendor", "Google\n");
  host.tree().write("sys/class/dmi/id/product_name", "Google Compute Engine\n");
  host.tree().write("proc/cpuinfo", kCpuinfoVm);
  add_pci(host.tree(), "0000:00:04.0", "0x10de", "0x030200");
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.bare_metal());
  EXPECT_TRUE(caps.hypervisor_flag());
  EXPECT_EQ(caps.nvidia_pci_gpus(), 1u);
}

TEST(ProbeHost, NoPciBusNoGpus) {
  HostTree host;
  const auto caps = probe_host(host.roots());
  EXPECT_EQ(caps.nvidia_pci_gpus(), 0u);
  EXPECT_EQ(caps.amd_pci_gpus(), 0u);
}

TEST(ProbeHost, VmWithoutDmiIsCaughtByHypervisorFlag) {
  HostTree host;  // e.g. Firecracker: no DMI at all
  host.tree().write("proc/cpuinfo", kCpuinfoVm);
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.bare_metal());
  EXPECT_EQ(caps.virtualization(), "unknown hypervisor");
}

TEST(ProbeHost, ShiftfsLoadedViaProcModules) {
  HostTree host;
  host.tree().write("proc/modules", "overlay 1 0 - Live 0x0\nshiftfs 32768 0 - Live 0x0\n");
  const auto caps = probe_host(host.roots());
  EXPECT_TRUE(caps.shiftfs_loaded());
  EXPECT_TRUE(caps.shiftfs_module_available());
}

TEST(ProbeHost, ShiftfsLoadedViaSysModule) {
  HostTree host;
  host.tree().mkdir("sys/module/shiftfs");
  EXPECT_TRUE(probe_host(host.roots()).shiftfs_loaded());
}

TEST(ProbeHost, ShiftfsModuleAvailableNotLoaded) {
  HostTree host("5.15.0-91-generic");
  host.tree().write("root/lib/modules/5.15.0-91-generic/kernel/fs/shiftfs.ko.zst", "elf");
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.shiftfs_loaded());
  EXPECT_TRUE(caps.shiftfs_module_available());
}

TEST(ProbeHost, ShiftfsModuleFoundViaModulesDep) {
  HostTree host("5.15.0-91-generic");
  host.tree().write("root/lib/modules/5.15.0-91-generic/modules.dep",
                    "kernel/fs/overlayfs/overlay.ko:\nupdates/dkms/shiftfs.ko:\n");
  EXPECT_TRUE(probe_host(host.roots()).shiftfs_module_available());
}

TEST(ProbeHost, ShiftfsModuleForAnotherKernelDoesNotCount) {
  HostTree host("5.15.0-91-generic");
  host.tree().write("root/lib/modules/5.15.0-80-generic/kernel/fs/shiftfs.ko", "elf");
  host.tree().write("root/lib/modules/5.15.0-91-generic/kernel/fs/overlayfs/overlay.ko", "elf");
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.shiftfs_loaded());
  EXPECT_FALSE(caps.shiftfs_module_available());
}

TEST(ProbeHost, ShiftfsAbsent) {
  HostTree host;
  const auto caps = probe_host(host.roots());
  EXPECT_FALSE(caps.shiftfs_loaded());
  EXPECT_FALSE(caps.shiftfs_module_available());
}

TEST(ProbeHost, ShiftfsSearchIsBoundedInDepth) {
  HostTree host("6.1.0");
  std::string deep = "root/lib/modules/6.1.0";
  for (int i = 0; i < 12; ++i) deep += "/d" + std::to_string(i);
  host.tree().write(deep + "/shiftfs.ko", "elf");
  EXPECT_FALSE(probe_host(host.roots()).shiftfs_module_available());
}

TEST(ProbeHost, KernelVersionsAndIdmappedMounts) {
  for (const auto& [kernel, idmapped] : std::vector<std::pair<std::string, bool>>{
           {"5.11.0-49-generic", false}, {"5.15.0-91-generic", true}, {"6.8.0-31-generic", true}}) {
    HostTree host(kernel);
    const auto caps = probe_host(host.roots());
    EXPECT_EQ(caps.kernel_version(), kernel);
    EXPECT_EQ(caps.idmapped_mounts(), idmapped) << kernel;
  }
}

TEST(ProbeHost, KernelHeadersUnderUsrSrc) {
  HostTree host("6.1.0-18-amd64");
  host.tree().mkdir("root/usr/src/linux-headers-6.1.0-18-amd64");
  EXPECT_TRUE(probe_host(host.roots()).kernel_headers());
}

TEST(ProbeHost, KernelHeadersViaModulesBuild) {
  HostTree host("6.1.0-18-amd64");
  host.tree().mkdir("root/lib/modules/6.1.0-18-amd64/build");
  EXPECT_TRUE(probe_host(host.roots()).kernel_headers());
}

TEST(ProbeHost, ModulesBuildLinkResolvesInsideRootfs) {
  HostTree host("6.1.0-18-amd64");
  host.tree().symlink("/usr/src/linux-headers-6.1.0-18-common",
                      "root/lib/modules/6.1.0-18-amd64/build");
  host.tree().mkdir("root/usr/src/linux-headers-6.1.0-18-common");
  EXPECT_TRUE(probe_host(host.roots()).kernel_headers());
}

TEST(ProbeHost, DanglingModulesBuildLinkIsNoHeaders) {
  HostTree host("6.1.0-18-amd64");
  // Debian leaves build -> /usr/src/linux-headers-... behind when the headers package is removed.
  host.tree().symlink("/nonexistent/linux-headers-6.1.0-18-amd64",
                      "root/lib/modules/6.1.0-18-amd64/build");
  EXPECT_FALSE(probe_host(host.roots()).kernel_headers());
}

TEST(ProbeHost, KernelHeadersAbsent) {
  HostTree host("6.1.0-18-amd64");
  host.tree().mkdir("root/usr/src/linux-headers-6.1.0-17-amd64");  // another kernel's
  EXPECT_FALSE(probe_host(host.roots()).kernel_headers());
}

TEST(ProbeHost, MissingTreeGivesConservativeAnswers) {
  HostRoots roots{"/nonexistent/proc", "/nonexistent/sys", "/nonexistent/root"};
  const auto caps = probe_host(roots);
  EXPECT_FALSE(caps.selinux_enabled());
  EXPECT_EQ(caps.kernel_version(), "");
  EXPECT_FALSE(caps.idmapped_mounts());
  EXPECT_FALSE(caps.kernel_headers());
  EXPECT_FALSE(caps.shiftfs_module_available());
}

TEST(ProbeCapacity, FromCpuinfoAndMeminfo) {
  HostTree host;
  const auto capacity = probe_capacity(host.roots());
  EXPECT_EQ(capacity.cpu_millicores(), 4000u);
  EXPECT_EQ(capacity.memory_bytes(), uint64_t{16384256} * 1024);
}

TEST(ProbeCapacity, FallsBackToSysfsOnline) {
  HostTree host;
  host.tree().write("proc/cpuinfo", "Features\t: fp asimd\n");
  host.tree().write("sys/devices/system/cpu/online", "0-5,8\n");
  EXPECT_EQ(probe_capacity(host.roots()).cpu_millicores(), 7000u);
}

TEST(ProbeCapacity, NothingReadable) {
  const auto capacity = probe_capacity(HostRoots{"/nonexistent", "/nonexistent", "/nonexistent"});
  EXPECT_EQ(capacity.cpu_millicores(), 0u);
  EXPECT_EQ(capacity.memory_bytes(), 0u);
}

TEST(CapBounding, ReadsSelfStatus) {
  HostTree host;
  host.tree().write("proc/self/status", "Name:\tx\nCapBnd:\t000001fffeffffff\n");
  const auto mask = read_cap_bounding(host.roots());
  ASSERT_TRUE(mask.ok());
  EXPECT_EQ(*mask, 0x000001fffeffffffULL);
}

// ---- runtime probe with fixture tool scripts ----------------------------------------------------

class ToolScripts {
 public:
  std::string add(const std::string& name, const std::string& script) {
    tree_.write(name, "#!/bin/sh\n" + script + "\n");
    tree_.chmod(name, std::filesystem::perms::owner_all);
    return tree_.path(name);
  }
  std::string missing(const std::string& name) const { return tree_.path(name); }

 private:
  FixtureTree tree_;
};

TEST(ProbeRuntime, RuncWithoutSysbox) {
  ToolScripts bin;
  ToolPaths tools;
  tools.runc = bin.add("runc", "echo 'runc version 1.1.5+ds1'; echo 'spec: 1.0.2-dev'");
  tools.sysbox_runc = bin.missing("sysbox-runc");
  tools.containerd = bin.add(
      "containerd", "echo 'containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1'");
  const auto info = probe_runtime(tools);
  EXPECT_TRUE(info.ready());
  EXPECT_EQ(info.runtime(), "runc");
  EXPECT_FALSE(info.sysbox());
  EXPECT_EQ(info.runc_version(), "1.1.5+ds1");
  EXPECT_EQ(info.sysbox_version(), "");
  EXPECT_EQ(info.containerd_version(), "1.6.20~ds1");
  EXPECT_NE(info.detail().find("user namespace"), std::string::npos) << info.detail();
}

TEST(ProbeRuntime, WithSysbox) {
  ToolScripts bin;
  ToolPaths tools;
  tools.runc = bin.add("runc", "echo 'runc version 1.1.12'");
  tools.sysbox_runc =
      bin.add("sysbox-runc", "printf 'sysbox-runc\\n\\tedition: \\tCE\\n\\tversion: \\t0.6.2\\n'");
  tools.containerd = bin.missing("containerd");
  const auto info = probe_runtime(tools);
  EXPECT_TRUE(info.ready());
  EXPECT_TRUE(info.sysbox());
  EXPECT_EQ(info.runtime(), "sysbox-runc");
  EXPECT_EQ(info.sysbox_version(), "0.6.2");
  EXPECT_EQ(info.containerd_version(), "");
  EXPECT_EQ(info.detail(), "");
}

TEST(ProbeRuntime, BrokenRuncIsNotReady) {
  ToolScripts bin;
  ToolPaths tools;
  tools.runc = bin.add("runc", "echo 'runc: libseccomp.so.2: cannot open' >&2; exit 127");
  tools.sysbox_runc = bin.missing("sysbox-runc");
  tools.containerd = bin.missing("containerd");
  const auto info = probe_runtime(tools);
  EXPECT_FALSE(info.ready());
  EXPECT_NE(info.detail().find("libseccomp.so.2"), std::string::npos) << info.detail();
}

TEST(ProbeRuntime, HangingToolTimesOut) {
  ToolScripts bin;
  ToolPaths tools;
  tools.runc = bin.add("runc", "exec sleep 30");
  tools.sysbox_runc = bin.missing("sysbox-runc");
  tools.containerd = bin.missing("containerd");
  tools.probe_timeout = std::chrono::milliseconds(300);
  const auto start = std::chrono::steady_clock::now();
  const auto info = probe_runtime(tools);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_FALSE(info.ready());
  EXPECT_NE(info.detail().find("timed out"), std::string::npos) << info.detail();
}

}  // namespace
}  // namespace cvm::agent
