// A TEST DOUBLE of NVIDIA's libnvidia-ml.so.1, built as a shared library of that name: there is no
// NVIDIA GPU or driver on the machines these tests run on, so the agent's real NVML code (dlopen,
// dlsym, the calls and their error paths) is exercised against this stand-in instead. It
// implements exactly the entry points the agent binds, with the ABI of nvml_api.h.
//
// Configuration (read by nvmlInit_v2): $CVM_FAKE_NVML_CONFIG names a JSON file:
//   {"driver": "550.54.15", "init_error": 0, "no_events": false,
//    "devices": [{"uuid": "GPU-..", "name": "..", "memory": bytes, "minor": 0,
//                 "bus_id": "00000000:07:00.0", "nvlinks": ["00000000:0f:00.0", ...],
//                 "ecc": 0, "mig": [{"uuid": "MIG-..", "name": ".. MIG 1g.10gb",
//                                   "memory": bytes, "gi": 7, "ci": 0}]}]}
// Health at run time: $CVM_FAKE_NVML_EVENTS names a file the test appends lines to, read on every
// event wait and query:  "xid <uuid> <code>", "dbe <uuid>", "ecc <uuid> <count>",
// "lost <uuid>", "found <uuid>".
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "cvm/agent/gpu/nvml_api.h"

struct nvmlDevice_st {
  std::string uuid;
  std::string name;
  unsigned long long memory = 0;
  unsigned minor = 0;
  std::string bus_id;
  std::vector<std::string> nvlinks;
  unsigned long long ecc = 0;
  bool lost = false;
  bool mig_enabled = false;
  std::vector<std::unique_ptr<nvmlDevice_st>> mig;
  unsigned gi = 0;
  unsigned ci = 0;
};

struct nvmlEventSet_st {
  unsigned long long types = 0;
};

namespace {

struct Pending {
  nvmlDevice_t device;
  unsigned long long type;
  unsigned long long data;
};

struct State {
  std::mutex mu;
  bool initialized = false;
  std::string driver;
  bool no_events = false;
  std::vector<std::unique_ptr<nvmlDevice_st>> devices;
  std::deque<Pending> pending;
  std::streamoff events_offset = 0;
};

State& state() {
  static State s;
  return s;
}

nvmlDevice_t find(State& s, const std::string& uuid) {
  for (auto& d : s.devices) {
    if (d->uuid == uuid) return d.get();
  }
  return nullptr;
}

// Applies the lines appended to the events file since the last read. Caller holds the lock.
void read_events(State& s) {
  const char* path = std::getenv("CVM_FAKE_NVML_EVENTS");
  if (path == nullptr) return;
  std::ifstream in(path);
  if (!in) return;
  in.seekg(s.events_offset);
  std::string line;
  while (std::getline(in, line)) {
    if (in.eof()) break;  // a line still being written
    s.events_offset = in.tellg();
    std::istringstream ls(line);
    std::string what;
    std::string uuid;
    ls >> what >> uuid;
    auto* d = find(s, uuid);
    if (d == nullptr) continue;
    if (what == "xid") {
      unsigned long long code = 0;
      ls >> code;
      s.pending.push_back({d, nvmlEventTypeXidCriticalError, code});
    } else if (what == "dbe") {
      s.pending.push_back({d, nvmlEventTypeDoubleBitEccError, 0});
    } else if (what == "ecc") {
      ls >> d->ecc;
    } else if (what == "lost") {
      d->lost = true;
    } else if (what == "found") {
      d->lost = false;
    }
  }
}

std::unique_ptr<nvmlDevice_st> device_from(const nlohmann::json& j) {
  auto d = std::make_unique<nvmlDevice_st>();
  d->uuid = j.value("uuid", "");
  d->name = j.value("name", "");
  d->memory = j.value("memory", 0ULL);
  d->minor = j.value("minor", 0U);
  d->bus_id = j.value("bus_id", "");
  d->ecc = j.value("ecc", 0ULL);
  d->gi = j.value("gi", 0U);
  d->ci = j.value("ci", 0U);
  if (j.contains("nvlinks")) d->nvlinks = j["nvlinks"].get<std::vector<std::string>>();
  if (j.contains("mig")) {
    d->mig_enabled = true;
    for (const auto& m : j["mig"]) d->mig.push_back(device_from(m));
  }
  return d;
}

void copy(char* out, unsigned length, const std::string& s) {
  if (length == 0) return;
  std::strncpy(out, s.c_str(), length - 1);
  out[length - 1] = '\0';
}

void fill_pci(nvmlPciInfo_t* pci, const std::string& bus_id) {
  std::memset(pci, 0, sizeof *pci);
  copy(pci->busId, sizeof pci->busId, bus_id);
  copy(pci->busIdLegacy, sizeof pci->busIdLegacy, bus_id.substr(bus_id.size() > 12 ? 4 : 0));
}

}  // namespace

extern "C" {

// The symbols are looked up by name with dlsym; their types are checked against nvml_api.h here.
__attribute__((visibility("default"))) nvmlReturn_t nvmlInit_v2() {
  auto& s = state();
  std::lock_guard lock(s.mu);
  const char* path = std::getenv("CVM_FAKE_NVML_CONFIG");
  if (path == nullptr) return NVML_ERROR_DRIVER_NOT_LOADED;
  std::ifstream in(path);
  if (!in) return NVML_ERROR_DRIVER_NOT_LOADED;
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) return NVML_ERROR_UNKNOWN;
  if (const int err = j.value("init_error", 0); err != 0) return err;
  s.driver = j.value("driver", "550.54.15");
  s.no_events = j.value("no_events", false);
  s.devices.clear();
  s.pending.clear();
  s.events_offset = 0;
  if (j.contains("devices")) {
    for (const auto& d : j["devices"]) s.devices.push_back(device_from(d));
  }
  // Only lines appended after init count: tests write events once the agent watches.
  if (const char* ev = std::getenv("CVM_FAKE_NVML_EVENTS")) {
    std::ifstream e(ev, std::ios::ate);
    if (e) s.events_offset = e.tellg();
  }
  s.initialized = true;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlShutdown() {
  auto& s = state();
  std::lock_guard lock(s.mu);
  s.initialized = false;
  s.devices.clear();
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) const char* nvmlErrorString(nvmlReturn_t r) {
  switch (r) {
    case NVML_SUCCESS:
      return "Success";
    case NVML_ERROR_DRIVER_NOT_LOADED:
      return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST:
      return "GPU is lost";
    case NVML_ERROR_TIMEOUT:
      return "Timeout";
    case NVML_ERROR_NOT_SUPPORTED:
      return "Not Supported";
    case NVML_ERROR_NOT_FOUND:
      return "Not Found";
    default:
      return "Unknown Error";
  }
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlSystemGetDriverVersion(char* out,
                                                                               unsigned length) {
  auto& s = state();
  std::lock_guard lock(s.mu);
  copy(out, length, s.driver);
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetCount_v2(unsigned* count) {
  auto& s = state();
  std::lock_guard lock(s.mu);
  if (!s.initialized) return NVML_ERROR_UNINITIALIZED;
  *count = static_cast<unsigned>(s.devices.size());
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(
    unsigned index, nvmlDevice_t* device) {
  auto& s = state();
  std::lock_guard lock(s.mu);
  if (index >= s.devices.size()) return NVML_ERROR_INVALID_ARGUMENT;
  *device = s.devices[index].get();
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char* out,
                                                                      unsigned length) {
  copy(out, length, d->uuid);
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char* out,
                                                                      unsigned length) {
  copy(out, length, d->name);
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d,
                                                                            nvmlMemory_t* m) {
  auto& s = state();
  std::lock_guard lock(s.mu);
  read_events(s);
  if (d->lost) return NVML_ERROR_GPU_IS_LOST;
  m->total = d->memory;
  m->free = d->memory;
  m->used = 0;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d,
                                                                             unsigned* minor) {
  *minor = d->minor;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d,
                                                                            nvmlPciInfo_t* pci) {
  fill_pci(pci, d->bus_id);
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetNvLinkState(
    nvmlDevice_t d, unsigned link, nvmlEnableState_t* active) {
  if (d->nvlinks.empty()) return NVML_ERROR_NOT_SUPPORTED;
  if (link >= 12) return NVML_ERROR_INVALID_ARGUMENT;  // a 12-link GPU, as an A100
  *active = link < d->nvlinks.size() ? 1 : 0;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(
    nvmlDevice_t d, unsigned link, nvmlPciInfo_t* pci) {
  if (link >= d->nvlinks.size()) return NVML_ERROR_INVALID_ARGUMENT;
  fill_pci(pci, d->nvlinks[link]);
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d,
                                                                         unsigned* current,
                                                                         unsigned* pending) {
  *current = d->mig_enabled ? 1 : 0;
  *pending = *current;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(
    nvmlDevice_t d, unsigned* count) {
  *count = d->mig_enabled ? 7 : 0;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(
    nvmlDevice_t d, unsigned index, nvmlDevice_t* mig) {
  if (index >= d->mig.size()) return NVML_ERROR_NOT_FOUND;  // an empty slot, as NVML says
  *mig = d->mig[index].get();
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d,
                                                                               unsigned* id) {
  *id = d->gi;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d,
                                                                                   unsigned* id) {
  *id = d->ci;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetTotalEccErrors(
    nvmlDevice_t d, nvmlMemoryErrorType_t type, nvmlEccCounterType_t counter,
    unsigned long long* count) {
  auto& s = state();
  std::lock_guard lock(s.mu);
  read_events(s);
  if (type != NVML_MEMORY_ERROR_TYPE_UNCORRECTED || counter != NVML_VOLATILE_ECC) {
    return NVML_ERROR_NOT_SUPPORTED;
  }
  if (d->lost) return NVML_ERROR_GPU_IS_LOST;
  *count = d->ecc;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t* set) {
  if (state().no_events) return NVML_ERROR_NOT_SUPPORTED;
  *set = new nvmlEventSet_st;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceGetSupportedEventTypes(
    nvmlDevice_t, unsigned long long* types) {
  *types = nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError |
           nvmlEventTypeSingleBitEccError;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlDeviceRegisterEvents(
    nvmlDevice_t, unsigned long long types, nvmlEventSet_t set) {
  set->types |= types;
  return NVML_SUCCESS;
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set,
                                                                        nvmlEventData_t* data,
                                                                        unsigned timeout_ms) {
  // Emulates the driver's blocking wait: return an event when one is pending, else block in
  // short slices until the timeout.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto& s = state();
  while (true) {
    {
      std::lock_guard lock(s.mu);
      read_events(s);
      while (!s.pending.empty()) {
        const auto p = s.pending.front();
        s.pending.pop_front();
        if ((p.type & set->types) == 0) continue;
        std::memset(data, 0, sizeof *data);
        data->device = p.device;
        data->eventType = p.type;
        data->eventData = p.data;
        return NVML_SUCCESS;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) return NVML_ERROR_TIMEOUT;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

__attribute__((visibility("default"))) nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
  delete set;
  return NVML_SUCCESS;
}

}  // extern "C"
