#include "cvm/agent/gpu/nvml.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "cvm/agent/gpu/nvml_api.h"

namespace cvm::agent::gpu {

// Entry points looked up once. Required ones fail the load when missing; the others (NVLink, MIG,
// ECC, events) are null on drivers or devices without the feature and the feature is skipped.
struct Nvml::Api {
  nvmlInit_v2_fn* init = nullptr;
  nvmlShutdown_fn* shutdown = nullptr;
  nvmlErrorString_fn* error_string = nullptr;
  nvmlSystemGetDriverVersion_fn* driver_version = nullptr;
  nvmlDeviceGetCount_v2_fn* count = nullptr;
  nvmlDeviceGetHandleByIndex_v2_fn* handle = nullptr;
  nvmlDeviceGetUUID_fn* uuid = nullptr;
  nvmlDeviceGetName_fn* name = nullptr;
  nvmlDeviceGetMemoryInfo_fn* memory = nullptr;
  nvmlDeviceGetMinorNumber_fn* minor = nullptr;
  nvmlDeviceGetPciInfo_v3_fn* pci = nullptr;
  nvmlDeviceGetNvLinkState_fn* nvlink_state = nullptr;
  nvmlDeviceGetNvLinkRemotePciInfo_v2_fn* nvlink_remote = nullptr;
  nvmlDeviceGetMigMode_fn* mig_mode = nullptr;
  nvmlDeviceGetMaxMigDeviceCount_fn* mig_count = nullptr;
  nvmlDeviceGetMigDeviceHandleByIndex_fn* mig_handle = nullptr;
  nvmlDeviceGetGpuInstanceId_fn* gi_id = nullptr;
  nvmlDeviceGetComputeInstanceId_fn* ci_id = nullptr;
  nvmlDeviceGetTotalEccErrors_fn* ecc = nullptr;
  nvmlEventSetCreate_fn* event_set_create = nullptr;
  nvmlDeviceGetSupportedEventTypes_fn* supported_events = nullptr;
  nvmlDeviceRegisterEvents_fn* register_events = nullptr;
  nvmlEventSetWait_v2_fn* event_wait = nullptr;
  nvmlEventSetFree_fn* event_set_free = nullptr;

  [[nodiscard]] std::string text(nvmlReturn_t r) const {
    const char* s = error_string != nullptr ? error_string(r) : nullptr;
    return s != nullptr ? s : "NVML error " + std::to_string(r);
  }
};

namespace {

template <class Fn>
void bind(void* handle, const char* name, Fn*& out) {
  // dlsym returns void*; the cast to a function pointer is what POSIX documents for it.
  out = reinterpret_cast<Fn*>(dlsym(handle, name));
}

std::string uuid_of(const Nvml::Api& api, nvmlDevice_t dev) {
  char buf[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = {};
  if (api.uuid(dev, buf, sizeof buf) != NVML_SUCCESS) return {};
  return std::string(buf, strnlen(buf, sizeof buf));
}

}  // namespace

Result<std::unique_ptr<Nvml>> Nvml::load(const std::string& library) {
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return make_error(ErrorDomain::kNotFound,
                      "cannot load " + library + ": " + (err != nullptr ? err : "not found"));
  }
  auto api = std::make_unique<Api>();
  bind(handle, "nvmlInit_v2", api->init);
  bind(handle, "nvmlShutdown", api->shutdown);
  bind(handle, "nvmlErrorString", api->error_string);
  bind(handle, "nvmlSystemGetDriverVersion", api->driver_version);
  bind(handle, "nvmlDeviceGetCount_v2", api->count);
  bind(handle, "nvmlDeviceGetHandleByIndex_v2", api->handle);
  bind(handle, "nvmlDeviceGetUUID", api->uuid);
  bind(handle, "nvmlDeviceGetName", api->name);
  bind(handle, "nvmlDeviceGetMemoryInfo", api->memory);
  bind(handle, "nvmlDeviceGetMinorNumber", api->minor);
  bind(handle, "nvmlDeviceGetPciInfo_v3", api->pci);
  bind(handle, "nvmlDeviceGetNvLinkState", api->nvlink_state);
  bind(handle, "nvmlDeviceGetNvLinkRemotePciInfo_v2", api->nvlink_remote);
  bind(handle, "nvmlDeviceGetMigMode", api->mig_mode);
  bind(handle, "nvmlDeviceGetMaxMigDeviceCount", api->mig_count);
  bind(handle, "nvmlDeviceGetMigDeviceHandleByIndex", api->mig_handle);
  bind(handle, "nvmlDeviceGetGpuInstanceId", api->gi_id);
  bind(handle, "nvmlDeviceGetComputeInstanceId", api->ci_id);
  bind(handle, "nvmlDeviceGetTotalEccErrors", api->ecc);
  bind(handle, "nvmlEventSetCreate", api->event_set_create);
  bind(handle, "nvmlDeviceGetSupportedEventTypes", api->supported_events);
  bind(handle, "nvmlDeviceRegisterEvents", api->register_events);
  bind(handle, "nvmlEventSetWait_v2", api->event_wait);
  bind(handle, "nvmlEventSetFree", api->event_set_free);
  if (api->init == nullptr || api->shutdown == nullptr || api->count == nullptr ||
      api->handle == nullptr || api->uuid == nullptr || api->name == nullptr ||
      api->memory == nullptr || api->minor == nullptr || api->pci == nullptr) {
    dlclose(handle);
    return make_error(ErrorDomain::kNotFound, library + " lacks the NVML entry points needed");
  }
  if (const auto r = api->init(); r != NVML_SUCCESS) {
    auto err = make_error(ErrorDomain::kSystem, "nvmlInit: " + api->text(r), r);
    dlclose(handle);
    return err;
  }
  return std::unique_ptr<Nvml>(new Nvml(handle, std::move(api)));
}

Nvml::Nvml(void* handle, std::unique_ptr<Api> api) : handle_(handle), api_(std::move(api)) {}

Nvml::~Nvml() {
  if (event_set_ != nullptr && api_->event_set_free != nullptr) {
    api_->event_set_free(static_cast<nvmlEventSet_t>(event_set_));
  }
  api_->shutdown();
  dlclose(handle_);
}

std::string Nvml::driver_version() const {
  if (api_->driver_version == nullptr) return {};
  char buf[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE] = {};
  if (api_->driver_version(buf, sizeof buf) != NVML_SUCCESS) return {};
  return std::string(buf, strnlen(buf, sizeof buf));
}

Result<std::vector<cvm::v1::GpuDevice>> Nvml::devices(const GpuRoots& roots) const {
  unsigned count = 0;
  if (const auto r = api_->count(&count); r != NVML_SUCCESS) {
    return make_error(ErrorDomain::kSystem, "nvmlDeviceGetCount: " + api_->text(r), r);
  }
  struct Whole {
    nvmlDevice_t dev;
    cvm::v1::GpuDevice gpu;
    std::vector<std::string> nvlink_remotes;  // normalized bus ids, one per active link
  };
  std::vector<Whole> whole;
  std::map<std::string, std::string> uuid_by_bus;
  for (unsigned i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    if (api_->handle(i, &dev) != NVML_SUCCESS) continue;
    Whole w{dev, {}, {}};
    auto& g = w.gpu;
    g.set_vendor(cvm::v1::NVIDIA);
    g.set_discovered_by("nvml");
    g.set_healthy(true);
    g.set_uuid(uuid_of(*api_, dev));
    if (g.uuid().empty()) continue;  // nothing to lease it by
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE] = {};
    if (api_->name(dev, name, sizeof name) == NVML_SUCCESS) {
      g.set_name(std::string(name, strnlen(name, sizeof name)));
    }
    nvmlMemory_t mem{};
    if (const auto r = api_->memory(dev, &mem); r == NVML_SUCCESS) {
      g.set_memory_bytes(mem.total);
    } else {
      g.set_healthy(false);
      g.set_health_reason("not answering: " + api_->text(r));
    }
    unsigned minor = 0;
    if (api_->minor(dev, &minor) == NVML_SUCCESS) g.set_minor(minor);
    nvmlPciInfo_t pci{};
    if (api_->pci(dev, &pci) == NVML_SUCCESS) {
      g.set_pci_bus_id(
          normalize_bus_id(std::string_view(pci.busId, strnlen(pci.busId, sizeof pci.busId))));
      uuid_by_bus[g.pci_bus_id()] = g.uuid();
      const auto place = read_pci_placement(roots, g.pci_bus_id());
      g.set_pci_path(place.pci_path);
      if (place.numa_node) g.set_numa_node(*place.numa_node);
    }
    if (api_->nvlink_state != nullptr && api_->nvlink_remote != nullptr) {
      for (unsigned link = 0; link < NVML_NVLINK_MAX_LINKS; ++link) {
        nvmlEnableState_t active = 0;
        const auto r = api_->nvlink_state(dev, link, &active);
        if (r == NVML_ERROR_NOT_SUPPORTED || r == NVML_ERROR_INVALID_ARGUMENT) break;
        if (r != NVML_SUCCESS || active == 0) continue;
        nvmlPciInfo_t remote{};
        if (api_->nvlink_remote(dev, link, &remote) != NVML_SUCCESS) continue;
        w.nvlink_remotes.push_back(normalize_bus_id(
            std::string_view(remote.busId, strnlen(remote.busId, sizeof remote.busId))));
      }
    }
    if (api_->mig_mode != nullptr) {
      unsigned current = 0;
      unsigned pending = 0;
      if (api_->mig_mode(dev, &current, &pending) == NVML_SUCCESS) {
        g.set_mig_enabled(current == NVML_DEVICE_MIG_ENABLE);
      }
    }
    whole.push_back(std::move(w));
  }

  std::vector<cvm::v1::GpuDevice> out;
  for (auto& w : whole) {
    // A link whose far end is another GPU of this node is a peer link; any other far end is an
    // NVSwitch (the fabric reaches every GPU on it).
    std::map<std::string, uint32_t> peers;
    uint32_t switch_links = 0;
    for (const auto& remote : w.nvlink_remotes) {
      const auto it = uuid_by_bus.find(remote);
      if (it != uuid_by_bus.end() && it->second != w.gpu.uuid()) {
        ++peers[it->second];
      } else if (it == uuid_by_bus.end()) {
        ++switch_links;
      }
    }
    for (const auto& [uuid, links] : peers) {
      auto* p = w.gpu.add_nvlink_peers();
      p->set_uuid(uuid);
      p->set_links(links);
    }
    w.gpu.set_nvswitch_links(switch_links);
    out.push_back(w.gpu);

    if (!w.gpu.mig_enabled() || api_->mig_count == nullptr || api_->mig_handle == nullptr) {
      continue;
    }
    unsigned max = 0;
    if (api_->mig_count(w.dev, &max) != NVML_SUCCESS) continue;
    for (unsigned k = 0; k < max; ++k) {
      nvmlDevice_t mig = nullptr;
      if (api_->mig_handle(w.dev, k, &mig) != NVML_SUCCESS) continue;  // an empty slot
      cvm::v1::GpuDevice m;
      m.set_vendor(cvm::v1::NVIDIA);
      m.set_discovered_by("nvml");
      m.set_healthy(true);
      m.set_uuid(uuid_of(*api_, mig));
      if (m.uuid().empty()) continue;
      char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE] = {};
      if (api_->name(mig, name, sizeof name) == NVML_SUCCESS) {
        m.set_name(std::string(name, strnlen(name, sizeof name)));
      }
      nvmlMemory_t mem{};
      if (api_->memory(mig, &mem) == NVML_SUCCESS) m.set_memory_bytes(mem.total);
      m.set_minor(w.gpu.minor());  // /dev/nvidia<minor> of the parent, plus the MIG caps
      m.set_pci_bus_id(w.gpu.pci_bus_id());
      m.set_pci_path(w.gpu.pci_path());
      if (w.gpu.has_numa_node()) m.set_numa_node(w.gpu.numa_node());
      m.set_mig_parent_uuid(w.gpu.uuid());
      m.set_mig_profile(mig_profile_from_name(m.name()));
      unsigned id = 0;
      if (api_->gi_id != nullptr && api_->gi_id(mig, &id) == NVML_SUCCESS) {
        m.set_mig_gpu_instance_id(id);
      }
      if (api_->ci_id != nullptr && api_->ci_id(mig, &id) == NVML_SUCCESS) {
        m.set_mig_compute_instance_id(id);
      }
      out.push_back(std::move(m));
    }
  }
  return out;
}

Status Nvml::watch_events() {
  if (api_->event_set_create == nullptr || api_->register_events == nullptr ||
      api_->event_wait == nullptr) {
    return make_error(ErrorDomain::kNotFound, "this NVML has no event sets");
  }
  nvmlEventSet_t set = nullptr;
  if (const auto r = api_->event_set_create(&set); r != NVML_SUCCESS) {
    return make_error(ErrorDomain::kSystem, "nvmlEventSetCreate: " + api_->text(r), r);
  }
  event_set_ = set;
  unsigned count = 0;
  (void)api_->count(&count);
  for (unsigned i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    if (api_->handle(i, &dev) != NVML_SUCCESS) continue;
    unsigned long long wanted = nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError;
    unsigned long long supported = wanted;
    if (api_->supported_events != nullptr &&
        api_->supported_events(dev, &supported) == NVML_SUCCESS) {
      wanted &= supported;
    }
    // Not every GPU supports every event (GeForce has no ECC): register what it has.
    if (wanted != 0) (void)api_->register_events(dev, wanted, set);
  }
  return {};
}

Result<std::optional<NvmlEvent>> Nvml::wait_event(unsigned timeout_ms) const {
  if (event_set_ == nullptr) return make_error(ErrorDomain::kInvalid, "no event set");
  nvmlEventData_t data{};
  const auto r = api_->event_wait(static_cast<nvmlEventSet_t>(event_set_), &data, timeout_ms);
  if (r == NVML_ERROR_TIMEOUT) return std::optional<NvmlEvent>{};
  if (r != NVML_SUCCESS) {
    return make_error(ErrorDomain::kSystem, "nvmlEventSetWait: " + api_->text(r), r);
  }
  NvmlEvent e;
  e.uuid = data.device != nullptr ? uuid_of(*api_, data.device) : std::string{};
  e.xid = (data.eventType & nvmlEventTypeXidCriticalError) != 0;
  e.xid_code = e.xid ? static_cast<uint32_t>(data.eventData) : 0;
  e.double_bit_ecc = (data.eventType & nvmlEventTypeDoubleBitEccError) != 0;
  return std::optional<NvmlEvent>{std::move(e)};
}

Result<uint64_t> Nvml::ecc_uncorrected(const std::string& uuid) const {
  if (api_->ecc == nullptr) return make_error(ErrorDomain::kNotFound, "no ECC counters");
  unsigned count = 0;
  (void)api_->count(&count);
  for (unsigned i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    if (api_->handle(i, &dev) != NVML_SUCCESS || uuid_of(*api_, dev) != uuid) continue;
    unsigned long long n = 0;
    const auto r = api_->ecc(dev, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, &n);
    if (r == NVML_ERROR_NOT_SUPPORTED) {
      return make_error(ErrorDomain::kNotFound, "ECC not supported on " + uuid);
    }
    if (r != NVML_SUCCESS) return make_error(ErrorDomain::kSystem, api_->text(r), r);
    return static_cast<uint64_t>(n);
  }
  return make_error(ErrorDomain::kNotFound, "no GPU " + uuid);
}

std::optional<std::string> Nvml::query_error(const std::string& uuid) const {
  unsigned count = 0;
  (void)api_->count(&count);
  for (unsigned i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    if (api_->handle(i, &dev) != NVML_SUCCESS || uuid_of(*api_, dev) != uuid) continue;
    nvmlMemory_t mem{};
    const auto r = api_->memory(dev, &mem);
    if (r == NVML_SUCCESS) return std::nullopt;
    return api_->text(r);
  }
  return std::string("no longer listed by NVML");
}

}  // namespace cvm::agent::gpu
