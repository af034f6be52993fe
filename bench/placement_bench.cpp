// One placement decision, in process, over a fleet of mixed capability profiles. The
// targets: >= 20,000 decisions/s on one core at 5,000 nodes, and the cost at 50,000 nodes <= 2x
// the cost at 5,000, with full placement quality (no sampling).
//
// Each scenario runs at 500, 5,000 and 50,000 nodes twice: with the default search (Search::kAuto:
// the capability index from kIndexMinNodes nodes on, a full scan below) and with the full scan
// (Search::kScan), the baseline measured in the same run. A summary at the end prints the CPU
// time per decision, the speed-up over the scan and the 50k/5k ratio. The index's placement
// quality against the scan is measured by placement_quality_bench.

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cvm/scheduler/placement.h"
#include "placement_fleet.h"

namespace {

using namespace cvm::bench;  // NOLINT(google-build-using-namespace): the bench's own names

const NodeIndex& fleet(int n) {
  static std::map<int, std::unique_ptr<NodeIndex>> fleets;
  auto& f = fleets[n];
  if (!f) f = make_fleet(n);
  return *f;
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
         cvm::v1::ScoringStrategy strategy, Sampling sampling, Search search) {
  const NodeIndex& index = fleet(static_cast<int>(state.range(0)));
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.strategy = strategy;
  o.sampling = sampling;
  o.search = search;
  o.max_candidates = 3;  // the scheduler's default
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

Search search_arg(const benchmark::State& state) {
  return state.range(1) == 0 ? Search::kAuto : Search::kScan;
}

void BM_CachedCvm_Binpack(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::BINPACK, Sampling::kNone, search_arg(state));
}
void BM_CachedCvm_Spread(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::SPREAD, Sampling::kNone, search_arg(state));
}
void BM_GpuCvm_Binpack(benchmark::State& state) {
  run(state, gpu_cvm(), cvm::v1::BINPACK, Sampling::kNone, search_arg(state));
}
void BM_GpuCvm_Spread(benchmark::State& state) {
  run(state, gpu_cvm(), cvm::v1::SPREAD, Sampling::kNone, search_arg(state));
}
void BM_CachedCvm_Binpack_SampledLog2(benchmark::State& state) {
  run(state, cached_cvm(), cvm::v1::BINPACK, Sampling::kLog2, Search::kAuto);
}
void BM_GpuCvm_Binpack_SampledLog2(benchmark::State& state) {
  run(state, gpu_cvm(), cvm::v1::BINPACK, Sampling::kLog2, Search::kAuto);
}

// A request nothing fits: the full scan plus building the per-filter message (after the index
// found nothing).
void BM_NoFit_Message(benchmark::State& state) {
  PlacementRequest r = cached_cvm();
  r.cpu_millicores = 1'000'000;
  run(state, r, cvm::v1::BINPACK, Sampling::kNone, Search::kAuto);
}

// What keeping the index costs: a heartbeat that changes a node's load (so it moves in the
// index; upsert also rebuilds the node's record from the NodeStatus), and a reserve + release.
void BM_Upsert_LoadChanged(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  auto index = make_fleet(n);
  std::vector<cvm::v1::NodeStatus> statuses;
  for (int i = 0; i < 256; ++i) {
    const auto* rec = index->find("node-" + std::to_string(i * (n / 256)));
    cvm::v1::NodeStatus s;
    s.set_node_id(rec->node_id);
    s.set_heartbeat_unix_ms(kNow);
    s.mutable_runtime()->set_ready(true);
    s.mutable_capacity()->set_cpu_millicores(rec->capacity_cpu_millicores);
    s.mutable_capacity()->set_memory_bytes(rec->capacity_memory_bytes);
    statuses.push_back(std::move(s));
  }
  uint64_t i = 0;
  for (auto _ : state) {
    auto& s = statuses[i % statuses.size()];
    s.mutable_allocated()->set_cpu_millicores((i * 37) % s.capacity().cpu_millicores());
    s.mutable_allocated()->set_memory_bytes((i * 7919 * kGiB / 16) % s.capacity().memory_bytes());
    index->upsert(s, i);
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void BM_ReserveRelease(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  auto index = make_fleet(n);
  uint64_t i = 0;
  const cvm::scheduler::Reservation amount{1000, kGiB, 0};
  for (auto _ : state) {
    const std::string node = "node-" + std::to_string((i * 7919) % static_cast<uint64_t>(n));
    index->reserve("b", node, amount);
    index->release("b");
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

BENCHMARK(BM_Upsert_LoadChanged)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_ReserveRelease)->Arg(5'000)->Arg(50'000);

// Args: nodes, search (0 = default, 1 = full scan).
void sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {500, 5'000, 50'000}) {
    b->Args({n, 0});
    b->Args({n, 1});
  }
}

BENCHMARK(BM_CachedCvm_Binpack)->Apply(sizes);
BENCHMARK(BM_CachedCvm_Spread)->Apply(sizes);
BENCHMARK(BM_GpuCvm_Binpack)->Apply(sizes);
BENCHMARK(BM_GpuCvm_Spread)->Apply(sizes);
BENCHMARK(BM_CachedCvm_Binpack_SampledLog2)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_GpuCvm_Binpack_SampledLog2)->Arg(5'000)->Arg(50'000);
BENCHMARK(BM_NoFit_Message)->Arg(5'000)->Arg(50'000);

// Keeps the CPU time per decision of every run for the summary.
class Capture : public benchmark::ConsoleReporter {
 public:
  Capture() : ConsoleReporter(OO_Tabular) {}  // no colour codes: the output goes into reports
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type == Run::RT_Iteration && !r.error_occurred) {
        ns_[r.benchmark_name()] = r.GetAdjustedCPUTime();
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
  double ns(const std::string& name) const {
    auto it = ns_.find(name);
    return it == ns_.end() ? 0 : it->second;
  }

 private:
  std::map<std::string, double> ns_;
};

void summary(const Capture& c) {
  std::printf(
      "\nPer-decision CPU time (ns), default search vs full scan measured in the same run:\n");
  std::printf("%-22s %10s %10s %10s %10s %10s %10s %12s %10s\n", "scenario", "500", "5k", "50k",
              "scan 500", "scan 5k", "scan 50k", "50k/5k", "scan 50k/5k");
  for (const char* s :
       {"BM_CachedCvm_Binpack", "BM_CachedCvm_Spread", "BM_GpuCvm_Binpack", "BM_GpuCvm_Spread"}) {
    const auto at = [&](int n, int scan) {
      return c.ns(std::string(s) + "/" + std::to_string(n) + "/" + std::to_string(scan));
    };
    const auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
    std::printf("%-22s %10.0f %10.0f %10.0f %10.0f %10.0f %10.0f %11.2fx %9.2fx\n", s + 3,
                at(500, 0), at(5'000, 0), at(50'000, 0), at(500, 1), at(5'000, 1), at(50'000, 1),
                ratio(at(50'000, 0), at(5'000, 0)), ratio(at(50'000, 1), at(5'000, 1)));
  }
  std::printf("(targets: 50k/5k <= 2x; 5k >= 20,000 decisions/s, i.e. <= 50,000 ns)\n");
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  Capture capture;
  benchmark::RunSpecifiedBenchmarks(&capture);
  summary(capture);
  benchmark::Shutdown();
  return 0;
}
