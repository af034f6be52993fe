#pragma once
// GPU discovery on a node: NVML first (see nvml.h), then /proc/driver/nvidia/gpus/*/information
// when NVML is absent but the driver is loaded, and sysfs PCI for the topology (PCI path, NUMA
// node) and for AMD GPUs, which are reported as present and unsupported. No GPU, no NVML, no
// driver: an empty list, never an error. NVIDIA devices visible in sysfs without a loaded driver
// are not reported (there is no /dev/nvidia<minor> to hand to a container); the host probe counts
// them in HostCapabilities.nvidia_pci_gpus.
//
// The parsers are pure (text in, values out); the readers only read files under the roots, which
// follow the agent's --path.procfs / --path.sysfs.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/v1/node.pb.h"

namespace cvm::agent::gpu {

struct GpuRoots {
  std::string procfs = "/proc";
  std::string sysfs = "/sys";
};

// ---- pure parsers -------------------------------------------------------------------------------

// /proc/driver/nvidia/gpus/<bus id>/information ("Model: ...", "GPU UUID: ...", "Bus Location:
// ...", "Device Minor: ..."); nullopt without a UUID or a minor.
struct ProcGpuInfo {
  std::string model;
  std::string uuid;
  std::string bus_location;
  uint32_t minor = 0;
};
[[nodiscard]] std::optional<ProcGpuInfo> parse_proc_gpu_information(std::string_view text);

// NVML writes "00000000:07:00.0", sysfs "0000:07:00.0": the 4-digit lowercase sysfs form; empty
// when it is not a PCI address.
[[nodiscard]] std::string normalize_bus_id(std::string_view bus_id);

// "NVIDIA A100-SXM4-40GB MIG 1g.5gb" -> "1g.5gb"; empty when the name has no MIG profile.
[[nodiscard]] std::string mig_profile_from_name(std::string_view name);

// "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0" -> "pci0000:00/0000:00:01.0/0000:01:00.0":
// the device's path below /sys/devices (what GpuDevice.pci_path holds); empty when not a PCI path.
[[nodiscard]] std::string pci_path_from_sysfs_target(std::string_view resolved);

// A sysfs hex attribute ("0x10de\n") as a number.
[[nodiscard]] std::optional<uint32_t> parse_sysfs_hex(std::string_view text);

// ---- sysfs / procfs readers ---------------------------------------------------------------------

// The PCI path and NUMA node of a device from /sys/bus/pci/devices/<bus id> (empty / nullopt when
// sysfs does not have it or reports -1).
struct PciPlacement {
  std::string pci_path;
  std::optional<int32_t> numa_node;
};
[[nodiscard]] PciPlacement read_pci_placement(const GpuRoots& roots, std::string_view bus_id);

// NVIDIA GPUs from /proc/driver/nvidia/gpus (driver loaded, NVML absent): uuid, model, minor, bus
// id, topology from sysfs; memory is not there (0).
[[nodiscard]] std::vector<cvm::v1::GpuDevice> discover_procfs(const GpuRoots& roots);

// AMD display controllers (vendor 0x1002, PCI class 0x03xxxx) from sysfs: vendor AMD, never
// leased, reported so that a request for them gets GPU_VENDOR_UNSUPPORTED with the node named.
[[nodiscard]] std::vector<cvm::v1::GpuDevice> discover_sysfs_amd(const GpuRoots& roots);

}  // namespace cvm::agent::gpu
