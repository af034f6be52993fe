#pragma once
// NVML through dlopen: the library is loaded at run time so one agent binary runs on nodes with
// and without the NVIDIA driver. The C boundary (dlopen/dlsym, nvmlReturn_t, init/shutdown) is
// wrapped here once; everything above sees Result values and GpuDevice messages.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cvm/agent/gpu/discovery.h"
#include "cvm/base/result.h"
#include "cvm/v1/node.pb.h"

namespace cvm::agent::gpu {

inline constexpr const char* kNvmlLibrary = "libnvidia-ml.so.1";

// A health event from an NVML event set.
struct NvmlEvent {
  std::string uuid;  // the GPU (parent GPU for events of a MIG instance)
  bool xid = false;  // an XID critical error (code in `xid_code`)
  uint32_t xid_code = 0;
  bool double_bit_ecc = false;
};

class Nvml {
 public:
  // dlopen + dlsym + nvmlInit_v2. Fails (kNotFound) when the library is absent, and with NVML's
  // own text when init fails (e.g. "Driver Not Loaded").
  static Result<std::unique_ptr<Nvml>> load(const std::string& library = kNvmlLibrary);
  ~Nvml();  // nvmlShutdown + dlclose
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  [[nodiscard]] std::string driver_version() const;

  // Every device: whole GPUs (NVIDIA, UUID, name, memory, minor, PCI bus id, NVLink peers among
  // the node's GPUs, NVSwitch links, MIG mode) and, for GPUs in MIG mode, each MIG instance as a
  // device of its own. `roots` adds the sysfs PCI path and NUMA node. A device that fails to
  // answer is reported unhealthy with NVML's error, not dropped.
  Result<std::vector<cvm::v1::GpuDevice>> devices(const GpuRoots& roots) const;

  // Health: registers XID and double-bit ECC events of every GPU into one event set.
  Status watch_events();
  // Waits up to timeout_ms for one event; nullopt on timeout.
  Result<std::optional<NvmlEvent>> wait_event(unsigned timeout_ms) const;
  // The volatile uncorrected ECC count of a GPU (kNotFound when the GPU does not support ECC).
  Result<uint64_t> ecc_uncorrected(const std::string& uuid) const;
  // Whether the GPU still answers (nvmlDeviceGetMemoryInfo); the error text when not.
  [[nodiscard]] std::optional<std::string> query_error(const std::string& uuid) const;

  struct Api;

 private:
  Nvml(void* handle, std::unique_ptr<Api> api);
  void* handle_;
  std::unique_ptr<Api> api_;
  void* event_set_ = nullptr;
};

}  // namespace cvm::agent::gpu
