// The GPU broker's decision for one 8-GPU node (DGX-like: two NVLink islands of 4), in process:
// choose_gpus for 1, 2, 4 and 8 GPUs over a mix of lease patterns, and choose_node over a fleet.
// The target: p99 <= 100 us per decision on an 8-GPU node. Each iteration is timed on its
// own so the percentiles come from the decisions themselves, reported as counters (p50_us,
// p99_us); first_fit_p99_us is the same requests answered first-fit by minor (no topology) in the
// same run, the baseline the topology search costs against.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "cvm/broker/allocator.h"
#include "dgx_fixture.h"

namespace {

using cvm::broker::GpuLeases;
using cvm::broker::NodeGpuInventory;

struct Case {
  GpuLeases leased;
  uint32_t count;
};

// Lease patterns: every subset a real node goes through, drawn at random (fixed seed).
std::vector<Case> cases(uint32_t count) {
  std::mt19937 rng(7);
  std::vector<Case> out;
  for (int i = 0; i < 256; ++i) {
    Case c{{}, count};
    const int held = static_cast<int>(rng() % (9 - count));
    std::vector<int> idx{0, 1, 2, 3, 4, 5, 6, 7};
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int k = 0; k < held; ++k) c.leased.add(cvm::broker::fixture::gpu_uuid(idx[k]), "ws");
    out.push_back(std::move(c));
  }
  return out;
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const auto k = static_cast<size_t>(p * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

// First fit by minor with no topology: the simplest decision, as a baseline.
NodeGpuInventory without_topology(NodeGpuInventory n) {
  for (auto& g : n.gpus) {
    g.clear_nvlink_peers();
    g.clear_pci_path();
    g.clear_numa_node();
  }
  return n;
}

void BM_ChooseGpus8(benchmark::State& state) {
  const auto count = static_cast<uint32_t>(state.range(0));
  const auto node = cvm::broker::fixture::dgx();
  const auto plain = without_topology(node);
  const auto cs = cases(count);
  std::vector<double> us;
  std::vector<double> base_us;
  us.reserve(1 << 16);
  size_t i = 0;
  for (auto _ : state) {
    const auto& c = cs[i++ % cs.size()];
    const auto t0 = std::chrono::steady_clock::now();
    auto choice = cvm::broker::choose_gpus(node, c.leased, c.count, 0);
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(choice);
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    state.PauseTiming();
    const auto b0 = std::chrono::steady_clock::now();
    auto base = cvm::broker::choose_gpus(plain, c.leased, c.count, 0);
    const auto b1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(base);
    base_us.push_back(std::chrono::duration<double, std::micro>(b1 - b0).count());
    state.ResumeTiming();
  }
  state.counters["p50_us"] = percentile(us, 0.50);
  state.counters["p99_us"] = percentile(us, 0.99);
  state.counters["first_fit_p99_us"] = percentile(base_us, 0.99);
}
BENCHMARK(BM_ChooseGpus8)->Arg(1)->Arg(2)->Arg(4)->Arg(8);

// The broker picking a node itself (no node named) over 64 DGX-like nodes, packed.
void BM_ChooseNode64(benchmark::State& state) {
  std::vector<NodeGpuInventory> nodes;
  std::vector<GpuLeases> leases;
  std::mt19937 rng(3);
  for (int n = 0; n < 64; ++n) {
    nodes.push_back(cvm::broker::fixture::dgx("node-" + std::to_string(n)));
    nodes.back().heartbeat_unix_ms = 1;
    GpuLeases l;
    for (int g = 0; g < 8; ++g) {
      if (rng() % 3 == 0) l.add(cvm::broker::fixture::gpu_uuid(g), "ws");
    }
    leases.push_back(std::move(l));
  }
  std::vector<const NodeGpuInventory*> ptrs;
  for (const auto& n : nodes) ptrs.push_back(&n);
  std::vector<double> us;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto c = cvm::broker::choose_node(
        ptrs,
        [&](const std::string& id) { return leases[static_cast<size_t>(std::stoi(id.substr(5)))]; },
        {.count = static_cast<uint32_t>(state.range(0)), .health = {.now_unix_ms = 1}});
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(c);
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  state.counters["p50_us"] = percentile(us, 0.50);
  state.counters["p99_us"] = percentile(us, 0.99);
}
BENCHMARK(BM_ChooseNode64)->Arg(1)->Arg(4);

}  // namespace

BENCHMARK_MAIN();
