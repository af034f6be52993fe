// One placement decision, in process, over a fleet of mixed capability profiles. Issue 4's target:
// >= 20,000 decisions/s on one core at 5,000 nodes, and the cost at 50,000 nodes <= 2x the cost
// at 5,000 (a full scan is linear, so that part needs sampling).

#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>

#include "cvm/scheduler/placement.h"
#include "placement_fleet.h"

namespace {

using cvm::bench::kGiB;
using cvm::bench::kNow;
using cvm::bench::make_fleet;
using cvm::scheduler::NodeIndex;
using cvm::scheduler::PlacementOptions;
using cvm::scheduler::PlacementRequest;
using cvm::scheduler::Sampling;

const NodeIndex& fleet(int n) {
  static std::map<int, std::unique_ptr<NodeIndex>> fleets;
  auto& f = fleets[n];
  if (!f) f = make_fleet(n);
  return *f;
}

// Every CVM filter on: live, runtime ready, SELinux, Caching -> shiftfs, Auto-load -> headers,
// cpu, memory.
PlacementRequest cached_cvm() {
  PlacementRequest r;
  r.cpu_millicores = 2000;
  r.memory_bytes = 4 * kGiB;
  r.caching = true;
  r.auto_load_shiftfs = true;
  return r;
}

// Every GPU filter on (GPUs exclude Caching): live, runtime ready, SELinux, bare metal, free
// GPUs with the memory, cpu, memory.
PlacementRequest gpu_cvm() {
  PlacementRequest r;
  r.cpu_millicores = 4000;
  r.memory_bytes = 16 * kGiB;
  r.gpu_count = 2;
  r.gpu_vendor = cvm::v1::NVIDIA;
  r.gpu_min_memory_bytes = 80 * kGiB;
  return r;
}

void run(benchmark::State& state, const PlacementRequest& request,
         cvm::v1::ScoringStrategy strategy, Sampling sampling) {
  const NodeIndex& index = fleet(static_cast<int>(state.range(0)));
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.strategy = strategy;
  o.sampling = sampling;
  uint64_t ok = 0;
  uint64_t evaluated = 0;
  for (auto _ : state) {
    auto d = cvm::scheduler::place(index, request, o);
    ok += d.ok() ? 1 : 0;
    evaluated += d.stats.evaluated;
    benchmark::DoNotOptimize(d);
    ++o.start_offset;  // as the service rotates it
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.counters["placed"] = benchmark::Counter(static_cast<double>(ok) / state.iterations());
  state.counters["nodes_evaluated"] =
      benchmark::Counter(static_cast<double>(evaluated) / state.iterations());
}

void BM_CachedCvm_Binpack(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::BINPACK, Sampling::kNone);
}
void BM_CachedCvm_Spread(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::SPREAD, Sampling::kNone);
}
void BM_GpuCvm_Binpack(benchmark::State& state) {
  run(state, gpu_cvm(), cvm::v1::BINPACK, Sampling::kNone);
}
void BM_CachedCvm_Binpack_SampledLog2(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::BINPACK, Sampling::kLog2);
}
void BM_GpuCvm_Binpack_SampledLog2(benchmark::State& state) {
  run(state, gpu_cvm(), cvm::v1::BINPACK, Sampling::kLog2);
}

// A request nothing fits: the full scan plus building the per-filter message.
void BM_NoFit_Message(benchmark::State& state) {
  PlacementRequest r = cached_cvm();
  r.cpu_millicores = 1'000'000;
  run(state, r, cvm::v1::BINPACK, Sampling::kLog2);
}

BENCHMARK(BM_CachedCvm_Binpack)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_CachedCvm_Spread)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_GpuCvm_Binpack)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_CachedCvm_Binpack_SampledLog2)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_GpuCvm_Binpack_SampledLog2)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_NoFit_Message)->Arg(5'000)->Arg(50'000);

}  // namespace

BENCHMARK_MAIN();
