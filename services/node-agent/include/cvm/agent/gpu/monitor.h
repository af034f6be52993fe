#pragma once
// The agent's GPU view: discovers at start (NVML, else procfs, plus AMD from sysfs) and, where
// NVML is available, keeps health current from a thread that waits on NVML's event set and polls
// ECC counters and liveness. The agent copies snapshot() into each NodeStatus heartbeat.

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cvm/agent/gpu/discovery.h"
#include "cvm/agent/gpu/health.h"
#include "cvm/agent/gpu/nvml.h"
#include "cvm/base/clock.h"
#include "cvm/v1/node.pb.h"

namespace cvm::agent::gpu {

struct GpuMonitorOptions {
  GpuRoots roots;
  std::string nvml_library = kNvmlLibrary;
  // How long one NVML event wait blocks, and so how often ECC and liveness are polled.
  std::chrono::milliseconds poll{5000};
};

// Discovery without monitoring: what GpuMonitor::start reports first. `source` says which path
// found the GPUs ("nvml", "procfs", "none") and `detail` why NVML was not used.
struct Discovery {
  std::vector<cvm::v1::GpuDevice> gpus;
  std::string source;
  std::string detail;
};
Discovery discover_gpus(const GpuRoots& roots, const Nvml* nvml, const std::string& nvml_error);

class GpuMonitor {
 public:
  GpuMonitor(GpuMonitorOptions options, const Clock& clock);
  ~GpuMonitor();  // stops and joins the health thread
  GpuMonitor(const GpuMonitor&) = delete;
  GpuMonitor& operator=(const GpuMonitor&) = delete;

  // Discovers now (synchronously) and starts the health thread when NVML is there. Never fails:
  // a node without GPUs has an empty snapshot.
  void start();
  void stop();

  // The devices with their current health. Thread-safe.
  [[nodiscard]] std::vector<cvm::v1::GpuDevice> snapshot() const;
  [[nodiscard]] std::string source() const;
  [[nodiscard]] std::string detail() const;
  // Health events seen since start (tests wait on it instead of sleeping).
  [[nodiscard]] uint64_t events_seen() const { return events_.load(); }

 private:
  void run();

  GpuMonitorOptions options_;
  const Clock& clock_;
  std::unique_ptr<Nvml> nvml_;
  mutable std::mutex mu_;
  Discovery discovery_;
  GpuHealthTracker health_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> events_{0};
  std::thread thread_;
};

}  // namespace cvm::agent::gpu
