// What candidate sampling (and the capability index, the default search) costs in placement
// quality, measured while a fleet fills up. Each iteration places one request (every CVM filter
// on) with the mode under test and reserves it on the chosen node, as the scheduler does, so later
// decisions see a fuller fleet. Outside the timed part a full scan (Search::kScan) of the same
// state gives the best possible choice, and the counters report:
//   regret      mean (best utilization - chosen utilization) after placement; 0 = always the best
//   optimal     share of decisions that chose a node as good as the best one
//   nodes_used  distinct nodes the placements went to (bin-packing wants few)
// BM_Fill_Default is the default decision (no sampling; the capability index at these sizes):
// exact up to kScoreEpsilon, so its regret is 0 and its optimal share 1.

#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <set>
#include <string>

#include "cvm/scheduler/placement.h"
#include "placement_fleet.h"

namespace {

using namespace cvm::bench;  // NOLINT(google-build-using-namespace): the bench's own names

void fill(benchmark::State& state, Sampling sampling, uint32_t percent, Search search,
          bool reference = true) {
  const int n = static_cast<int>(state.range(0));
  auto index = cvm::bench::make_fleet(n);
  const auto req = cached_cvm();  // every CVM filter on
  const auto amount = cvm::scheduler::reservation_for(req);
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.sampling = sampling;
  o.sample_percent = percent;
  o.search = search;
  PlacementOptions full = o;
  full.sampling = Sampling::kNone;
  full.search = Search::kScan;
  double regret = 0;
  uint64_t optimal = 0;
  uint64_t decisions = 0;
  std::set<std::string> used;
  uint64_t id = 0;
  for (auto _ : state) {
    auto d = cvm::scheduler::place(*index, req, o);
    ++o.start_offset;
    state.PauseTiming();
    if (d.ok() && !reference) {
      ++decisions;
      used.insert(d.best().node_id);
      index->reserve("b" + std::to_string(id++), d.best().node_id, amount);
    } else if (d.ok()) {
      const auto best = cvm::scheduler::place(*index, req, full);
      const double r = best.ok() ? best.best().utilization - d.best().utilization : 0;
      regret += r;
      optimal += r <= 1e-12 ? 1 : 0;
      ++decisions;
      used.insert(d.best().node_id);
      index->reserve("b" + std::to_string(id++), d.best().node_id, amount);
    }
    state.ResumeTiming();
  }
  const double k = decisions == 0 ? 1 : static_cast<double>(decisions);
  if (reference) {
    state.counters["regret"] = regret / k;
    state.counters["optimal"] = static_cast<double>(optimal) / k;
  }
  state.counters["nodes_used"] = static_cast<double>(used.size());
  state.counters["placed"] = static_cast<double>(decisions);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void BM_Fill_FullScan(benchmark::State& s) { fill(s, Sampling::kNone, 100, Search::kScan); }
void BM_Fill_Default(benchmark::State& s) { fill(s, Sampling::kNone, 100, Search::kAuto); }
// The same fill-up without the reference scan between decisions (no regret counters): the
// reference's pass over every node evicts the index from the caches, so with it the default's
// time at 50,000 nodes is that of a cold cache.
void BM_Fill_Default_NoReference(benchmark::State& s) {
  fill(s, Sampling::kNone, 100, Search::kAuto, false);
}
void BM_Fill_SampledLog2(benchmark::State& s) { fill(s, Sampling::kLog2, 100, Search::kAuto); }
void BM_Fill_Sampled5Percent(benchmark::State& s) { fill(s, Sampling::kPercent, 5, Search::kAuto); }

// A fixed number of placements, so every mode fills the fleet by the same amount.
BENCHMARK(BM_Fill_FullScan)->Arg(5'000)->Arg(50'000)->Iterations(3000);
BENCHMARK(BM_Fill_Default)->Arg(5'000)->Arg(50'000)->Iterations(3000);
BENCHMARK(BM_Fill_Default_NoReference)->Arg(5'000)->Arg(50'000)->Iterations(3000);
BENCHMARK(BM_Fill_SampledLog2)->Arg(5'000)->Arg(50'000)->Iterations(3000);
BENCHMARK(BM_Fill_Sampled5Percent)->Arg(5'000)->Arg(50'000)->Iterations(3000);

}  // namespace

BENCHMARK_MAIN();
