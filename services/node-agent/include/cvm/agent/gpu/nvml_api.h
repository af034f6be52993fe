#pragma once
// The part of NVML's C ABI the agent calls, declared here because nvml.h is not packaged for
// Debian main and the library is only ever loaded with dlopen("libnvidia-ml.so.1"). Names,
// values and struct layouts follow NVIDIA's nvml.h (CUDA 12); only versioned entry points that
// every driver since R450 exports are used (nvmlInit_v2, nvmlDeviceGetPciInfo_v3, ...).

#include <cstdint>

extern "C" {

using nvmlReturn_t = int;
inline constexpr nvmlReturn_t NVML_SUCCESS = 0;
inline constexpr nvmlReturn_t NVML_ERROR_UNINITIALIZED = 1;
inline constexpr nvmlReturn_t NVML_ERROR_INVALID_ARGUMENT = 2;
inline constexpr nvmlReturn_t NVML_ERROR_NOT_SUPPORTED = 3;
inline constexpr nvmlReturn_t NVML_ERROR_NOT_FOUND = 6;
inline constexpr nvmlReturn_t NVML_ERROR_DRIVER_NOT_LOADED = 9;
inline constexpr nvmlReturn_t NVML_ERROR_TIMEOUT = 10;
inline constexpr nvmlReturn_t NVML_ERROR_GPU_IS_LOST = 15;
inline constexpr nvmlReturn_t NVML_ERROR_UNKNOWN = 999;

using nvmlDevice_t = struct nvmlDevice_st*;
using nvmlEventSet_t = struct nvmlEventSet_st*;

inline constexpr unsigned NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96;
inline constexpr unsigned NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96;
inline constexpr unsigned NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE = 80;
inline constexpr unsigned NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE = 32;
inline constexpr unsigned NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE = 16;
inline constexpr unsigned NVML_NVLINK_MAX_LINKS = 18;
inline constexpr unsigned NVML_DEVICE_MIG_ENABLE = 1;

struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};

struct nvmlPciInfo_t {
  char busIdLegacy[NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE];
  unsigned int domain;
  unsigned int bus;
  unsigned int device;
  unsigned int pciDeviceId;
  unsigned int pciSubSystemId;
  char busId[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];  // "00000000:07:00.0"
};

using nvmlEnableState_t = int;  // NVML_FEATURE_DISABLED 0, NVML_FEATURE_ENABLED 1

struct nvmlEventData_t {
  nvmlDevice_t device;
  unsigned long long eventType;
  unsigned long long eventData;  // the XID for nvmlEventTypeXidCriticalError
  unsigned int gpuInstanceId;
  unsigned int computeInstanceId;
};

inline constexpr unsigned long long nvmlEventTypeSingleBitEccError = 0x1ULL;
inline constexpr unsigned long long nvmlEventTypeDoubleBitEccError = 0x2ULL;
inline constexpr unsigned long long nvmlEventTypeXidCriticalError = 0x8ULL;

using nvmlMemoryErrorType_t = int;
inline constexpr nvmlMemoryErrorType_t NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1;
using nvmlEccCounterType_t = int;
inline constexpr nvmlEccCounterType_t NVML_VOLATILE_ECC = 0;

// The entry points, as function types for dlsym.
using nvmlInit_v2_fn = nvmlReturn_t();
using nvmlShutdown_fn = nvmlReturn_t();
using nvmlErrorString_fn = const char*(nvmlReturn_t);
using nvmlSystemGetDriverVersion_fn = nvmlReturn_t(char*, unsigned int);
using nvmlDeviceGetCount_v2_fn = nvmlReturn_t(unsigned int*);
using nvmlDeviceGetHandleByIndex_v2_fn = nvmlReturn_t(unsigned int, nvmlDevice_t*);
using nvmlDeviceGetUUID_fn = nvmlReturn_t(nvmlDevice_t, char*, unsigned int);
using nvmlDeviceGetName_fn = nvmlReturn_t(nvmlDevice_t, char*, unsigned int);
using nvmlDeviceGetMemoryInfo_fn = nvmlReturn_t(nvmlDevice_t, nvmlMemory_t*);
using nvmlDeviceGetMinorNumber_fn = nvmlReturn_t(nvmlDevice_t, unsigned int*);
using nvmlDeviceGetPciInfo_v3_fn = nvmlReturn_t(nvmlDevice_t, nvmlPciInfo_t*);
using nvmlDeviceGetNvLinkState_fn = nvmlReturn_t(nvmlDevice_t, unsigned int, nvmlEnableState_t*);
using nvmlDeviceGetNvLinkRemotePciInfo_v2_fn = nvmlReturn_t(nvmlDevice_t, unsigned int,
                                                            nvmlPciInfo_t*);
using nvmlDeviceGetMigMode_fn = nvmlReturn_t(nvmlDevice_t, unsigned int*, unsigned int*);
using nvmlDeviceGetMaxMigDeviceCount_fn = nvmlReturn_t(nvmlDevice_t, unsigned int*);
using nvmlDeviceGetMigDeviceHandleByIndex_fn = nvmlReturn_t(nvmlDevice_t, unsigned int,
                                                            nvmlDevice_t*);
using nvmlDeviceGetGpuInstanceId_fn = nvmlReturn_t(nvmlDevice_t, unsigned int*);
using nvmlDeviceGetComputeInstanceId_fn = nvmlReturn_t(nvmlDevice_t, unsigned int*);
using nvmlDeviceGetTotalEccErrors_fn = nvmlReturn_t(nvmlDevice_t, nvmlMemoryErrorType_t,
                                                    nvmlEccCounterType_t, unsigned long long*);
using nvmlEventSetCreate_fn = nvmlReturn_t(nvmlEventSet_t*);
using nvmlDeviceGetSupportedEventTypes_fn = nvmlReturn_t(nvmlDevice_t, unsigned long long*);
using nvmlDeviceRegisterEvents_fn = nvmlReturn_t(nvmlDevice_t, unsigned long long, nvmlEventSet_t);
using nvmlEventSetWait_v2_fn = nvmlReturn_t(nvmlEventSet_t, nvmlEventData_t*, unsigned int);
using nvmlEventSetFree_fn = nvmlReturn_t(nvmlEventSet_t);

}  // extern "C"
