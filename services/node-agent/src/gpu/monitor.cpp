#include "cvm/agent/gpu/monitor.h"

#include <spdlog/spdlog.h>

namespace cvm::agent::gpu {

Discovery discover_gpus(const GpuRoots& roots, const Nvml* nvml, const std::string& nvml_error) {
  Discovery d;
  if (nvml != nullptr) {
    if (auto devs = nvml->devices(roots)) {
      d.gpus = std::move(*devs);
      d.source = "nvml";
      d.detail = "NVML, driver " + nvml->driver_version();
    } else {
      d.detail = devs.error().message;
    }
  } else {
    d.detail = nvml_error;
  }
  if (d.source.empty()) {
    d.gpus = discover_procfs(roots);
    d.source = d.gpus.empty() ? "none" : "procfs";
  }
  for (auto& amd : discover_sysfs_amd(roots)) d.gpus.push_back(std::move(amd));
  return d;
}

GpuMonitor::GpuMonitor(GpuMonitorOptions options, const Clock& clock)
    : options_(std::move(options)), clock_(clock) {}

GpuMonitor::~GpuMonitor() { stop(); }

void GpuMonitor::start() {
  std::string nvml_error;
  auto nvml = Nvml::load(options_.nvml_library);
  if (nvml) {
    nvml_ = std::move(*nvml);
  } else {
    nvml_error = nvml.error().message;
  }
  auto d = discover_gpus(options_.roots, nvml_.get(), nvml_error);
  spdlog::info("GPUs: {} found through {}{}", d.gpus.size(), d.source,
               d.detail.empty() ? "" : " (" + d.detail + ")");
  {
    std::lock_guard lock(mu_);
    discovery_ = std::move(d);
  }
  if (!nvml_) return;
  if (auto st = nvml_->watch_events(); !st) {
    spdlog::warn("GPU health events unavailable: {}; polling only", st.error().message);
  }
  stop_ = false;
  thread_ = std::thread([this] { run(); });
}

void GpuMonitor::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void GpuMonitor::run() {
  std::vector<std::string> uuids;
  {
    std::lock_guard lock(mu_);
    for (const auto& g : discovery_.gpus) {
      if (g.discovered_by() == "nvml" && g.mig_parent_uuid().empty()) uuids.push_back(g.uuid());
    }
  }
  auto last_poll = std::chrono::steady_clock::time_point{};
  while (!stop_) {
    // The event wait is the thread's pacing: it returns at once on an event and otherwise after
    // a short slice, so stop() never waits long.
    const auto slice =
        std::min<std::chrono::milliseconds>(options_.poll, std::chrono::milliseconds(200));
    auto ev = nvml_->wait_event(static_cast<unsigned>(slice.count()));
    if (ev && ev->has_value()) {
      const auto& e = **ev;
      std::lock_guard lock(mu_);
      const auto now = clock_.now_unix_ms();
      bool event = false;
      if (e.xid) event = health_.on_xid(e.uuid, e.xid_code, now);
      if (e.double_bit_ecc) event = health_.on_double_bit_ecc(e.uuid, now) || event;
      if (event) {
        ++events_;
        spdlog::warn("GPU {}: {}", e.uuid, e.xid ? xid_text(e.xid_code) : "double-bit ECC error");
      }
    } else if (!ev) {
      // No event set (or it broke): pace the polls instead.
      std::this_thread::sleep_for(slice);
    }
    if (std::chrono::steady_clock::now() - last_poll < options_.poll) continue;
    last_poll = std::chrono::steady_clock::now();
    for (const auto& uuid : uuids) {
      const auto error = nvml_->query_error(uuid);
      auto ecc = nvml_->ecc_uncorrected(uuid);
      std::lock_guard lock(mu_);
      const auto now = clock_.now_unix_ms();
      if (health_.on_query(uuid, error.value_or(""), now) && error) {
        ++events_;
        spdlog::warn("GPU {} is not answering: {}", uuid, *error);
      }
      if (ecc && health_.on_ecc_count(uuid, *ecc, now)) {
        ++events_;
        spdlog::warn("GPU {}: new uncorrectable ECC errors ({} in total)", uuid, *ecc);
      }
    }
  }
}

std::vector<cvm::v1::GpuDevice> GpuMonitor::snapshot() const {
  std::lock_guard lock(mu_);
  auto out = discovery_.gpus;
  for (auto& g : out) health_.apply(g);
  return out;
}

std::string GpuMonitor::source() const {
  std::lock_guard lock(mu_);
  return discovery_.source;
}

std::string GpuMonitor::detail() const {
  std::lock_guard lock(mu_);
  return discovery_.detail;
}

}  // namespace cvm::agent::gpu
