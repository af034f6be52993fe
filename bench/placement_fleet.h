#pragma once
// The benchmark fleet: deterministic, mixed capability profiles (shared by the placement benches).

#include <cstdint>
#include <memory>
#include <random>
#include <string>

#include "cvm/scheduler/placement.h"

namespace cvm::bench {

// The names every placement bench uses (`using namespace cvm::bench;` brings them in).
using cvm::scheduler::NodeIndex;
using cvm::scheduler::PlacementOptions;
using cvm::scheduler::PlacementRequest;
using cvm::scheduler::Sampling;
using cvm::scheduler::Search;

constexpr int64_t kNow = 1'700'000'000'000;
constexpr uint64_t kGiB = 1ULL << 30;

// A deterministic fleet: mostly healthy CVM-capable nodes, with the rarer profiles a real fleet
// has (SELinux on, no shiftfs, no headers, cloud VMs, GPU boxes, stale or not-ready nodes).
inline std::unique_ptr<NodeIndex> make_fleet(int n, uint64_t seed = 42) {
  auto index = std::make_unique<NodeIndex>();
  std::mt19937_64 rng(seed);
  auto pct = [&](int p) { return static_cast<int>(rng() % 100) < p; };
  for (int i = 0; i < n; ++i) {
    cvm::v1::NodeStatus s;
    s.set_node_id("node-" + std::to_string(i));
    s.set_heartbeat_unix_ms(pct(2) ? kNow - 60'000 : kNow - static_cast<int64_t>(rng() % 5'000));
    s.mutable_runtime()->set_ready(!pct(3));
    auto* host = s.mutable_host();
    const bool enforcing = pct(8);
    host->set_selinux_enforcing(enforcing);
    host->set_selinux_enabled(enforcing || pct(4));
    host->set_shiftfs_loaded(pct(40));
    host->set_shiftfs_module_available(pct(30));
    host->set_idmapped_mounts(pct(40));
    host->set_kernel_headers(pct(75));
    const bool bare_metal = pct(35);
    host->set_bare_metal(bare_metal);
    const uint64_t cores = 8ULL << (rng() % 4);  // 8..64
    s.mutable_capacity()->set_cpu_millicores(cores * 1000);
    s.mutable_capacity()->set_memory_bytes(cores * 4 * kGiB);
    const uint64_t used = rng() % 95;  // percent
    s.mutable_allocated()->set_cpu_millicores(cores * 1000 * used / 100);
    s.mutable_allocated()->set_memory_bytes(cores * 4 * kGiB * ((used + rng() % 10) % 100) / 100);
    if (bare_metal && pct(40)) {
      const uint64_t mem = pct(50) ? 40 * kGiB : 80 * kGiB;
      for (uint32_t g = 0; g < 8; ++g) {
        auto* gpu = s.add_gpus();
        gpu->set_uuid("GPU-" + std::to_string(i) + "-" + std::to_string(g));
        gpu->set_minor(g);
        gpu->set_memory_bytes(mem);
        gpu->set_vendor(cvm::v1::NVIDIA);
        gpu->set_healthy(!pct(2));
      }
    }
    index->upsert(s, static_cast<uint64_t>(i) + 1);
    // Some GPUs already leased.
    for (const auto& gpu : s.gpus()) {
      if (pct(50)) index->set_gpu_leased(s.node_id(), gpu.uuid(), true);
    }
  }
  return index;
}

// Every CVM filter on: live, runtime ready, SELinux, Caching -> shiftfs, Auto-load -> headers,
// cpu, memory.
inline PlacementRequest cached_cvm() {
  PlacementRequest r;
  r.cpu_millicores = 2000;
  r.memory_bytes = 4 * kGiB;
  r.caching = true;
  r.auto_load_shiftfs = true;
  return r;
}

}  // namespace cvm::bench
