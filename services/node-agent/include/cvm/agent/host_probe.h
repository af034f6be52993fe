#pragma once
// What the node is: SELinux, kernel features, virtualization, capacity, runtime versions.
//
// Parsing lives in pure functions (text in, values out) so fixture strings cover every case; the
// probe_* functions only read files under HostRoots and hand the text over. HostRoots follows
// node_exporter's --path.procfs/--path.sysfs/--path.rootfs: an agent running in a container with
// the host's /proc, /sys and / mounted elsewhere points them there, and tests point them at
// fixture trees.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "cvm/agent/tool_paths.h"
#include "cvm/base/result.h"
#include "cvm/v1/node.pb.h"

namespace cvm::agent {

struct HostRoots {
  std::string procfs = "/proc";
  std::string sysfs = "/sys";
  std::string rootfs = "/";
};

// ---- pure parsers -------------------------------------------------------------------------------

struct KernelVersion {
  int major = 0;
  int minor = 0;
  int patch = 0;
  auto operator<=>(const KernelVersion&) const = default;
};

// "6.1.0-18-amd64", "5.15.0-1049-gcp", "5.4", "6.18.44-fc-v669\n" -> numbers; nullopt if not a
// kernel release string.
[[nodiscard]] std::optional<KernelVersion> parse_kernel_version(std::string_view osrelease);
// Unparseable versions are treated as old: a feature is never claimed on a guess.
[[nodiscard]] bool kernel_at_least(std::string_view osrelease, KernelVersion minimum);
// ID-mapped mounts (mount_setattr MOUNT_ATTR_IDMAP) arrived in Linux 5.12.
[[nodiscard]] bool supports_idmapped_mounts(std::string_view osrelease);

struct SelinuxState {
  bool enabled = false;
  bool enforcing = false;
};
// selinuxfs exposes `enforce` only while SELinux is enabled; its content is "1" when enforcing and
// "0" when permissive. `enforce_content` is nullopt when the file is absent.
[[nodiscard]] SelinuxState parse_selinux(std::optional<std::string_view> enforce_content);

// Whether /proc/modules text lists `module` (first column).
[[nodiscard]] bool modules_list_has(std::string_view proc_modules, std::string_view module);

// Whether any "flags" (x86) or "Features" (arm64) line of /proc/cpuinfo holds `flag`.
[[nodiscard]] bool cpuinfo_has_flag(std::string_view cpuinfo, std::string_view flag);
// The number of "processor" entries in /proc/cpuinfo (0 if none).
[[nodiscard]] uint32_t count_cpuinfo_processors(std::string_view cpuinfo);
// CPU count of a sysfs cpu list such as "0-3,8,10-11\n"; nullopt when malformed.
[[nodiscard]] std::optional<uint32_t> parse_cpu_list_count(std::string_view list);
// MemTotal of /proc/meminfo in bytes; nullopt when missing or malformed.
[[nodiscard]] std::optional<uint64_t> parse_meminfo_total_bytes(std::string_view meminfo);

struct Virtualization {
  bool bare_metal = true;
  std::string name;  // e.g. "Google Compute Engine"; empty on bare metal
};
// From DMI sys_vendor / product_name and the cpuinfo `hypervisor` flag. A known cloud or hypervisor
// vendor wins; otherwise the hypervisor flag alone means "a VM of unknown kind". Cloud bare-metal
// instance types (AWS "*.metal") count as bare metal: NVIDIA GPUs are allowed there.
[[nodiscard]] Virtualization classify_virtualization(std::string_view sys_vendor,
                                                     std::string_view product_name,
                                                     bool hypervisor_flag);

// A PCI function's GPU vendor from sysfs `vendor` and `class` ("0x10de", "0x030200"): NVIDIA
// (0x10de) or AMD (0x1002) display controllers (class 0x03xxxx) only, so a GPU's audio or USB
// function is not counted as another GPU. GPU_VENDOR_UNSPECIFIED for anything else.
[[nodiscard]] cvm::v1::GpuVendor classify_pci_gpu(std::string_view vendor,
                                                  std::string_view pci_class);

// Version strings from the tools' --version output; empty when not recognised.
[[nodiscard]] std::string parse_runc_version(std::string_view output);        // "1.1.5+ds1"
[[nodiscard]] std::string parse_sysbox_version(std::string_view output);      // "0.6.2"
[[nodiscard]] std::string parse_containerd_version(std::string_view output);  // "1.6.20~ds1"

// ---- probes (read files under HostRoots) --------------------------------------------------------

[[nodiscard]] cvm::v1::HostCapabilities probe_host(const HostRoots& roots);
[[nodiscard]] cvm::v1::Capacity probe_capacity(const HostRoots& roots);

struct PciGpuCount {
  uint32_t nvidia = 0;
  uint32_t amd = 0;
};
// GPUs present on the PCI bus (<sysfs>/bus/pci/devices/*/{vendor,class}), driver or not. The NVML
// inventory says which are usable; this says which are there.
[[nodiscard]] PciGpuCount probe_pci_gpus(const HostRoots& roots);

// Whether <rootfs>/lib/modules/<kernel>/ holds shiftfs.ko[.xz|.zst|.gz]. The walk is bounded (depth
// and entries) so a huge or looping module tree cannot stall the probe.
[[nodiscard]] bool shiftfs_module_available(const HostRoots& roots, std::string_view kernel);

// The capability bounding set of this process (<procfs>/self/status CapBnd). Containers can only
// get capabilities inside it; e.g. hosts running the agent in a container may lack
// CAP_SYS_RESOURCE.
[[nodiscard]] Result<uint64_t> read_cap_bounding(const HostRoots& roots);

// Runs `runc --version`, `sysbox-runc --version`, `containerd --version`. Without sysbox-runc the
// runtime is "runc" and `detail` says runc + a user namespace stands in for Sysbox; `ready` means
// runc (and sysbox-runc, when present) answered.
[[nodiscard]] cvm::v1::RuntimeInfo probe_runtime(const ToolPaths& tools);

// GPU discovery belongs next to these probes: a `probe_gpus(const HostRoots&)` reading
// /proc/driver/nvidia and <sysfs>/bus/pci/devices/*/vendor, with NVML when it can be dlopen'ed.

}  // namespace cvm::agent
