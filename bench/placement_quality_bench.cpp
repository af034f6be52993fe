// Placement quality of the capability index search (the default, Search::kIndex from
// kIndexMinNodes nodes on) against the exact full scan (Search::kScan), on random fleets filling
// up. Each step draws a random request (plain or cached CVM, container, GPU; random size) and a
// random strategy, decides it both ways on the same index state, then reserves the index's choice
// as the scheduler does, so later decisions see a fuller fleet. Reports per fleet size:
//   identical   share of decisions where both chose the same node
//   gap         |chosen utilization - best utilization| (0 = as good as the best; the index
//               guarantees <= kScoreEpsilon), mean / p99 / max
//   agree       share of decisions where both agreed on success or failure (must be 100%)
// Usage: placement_quality_bench [DECISIONS_PER_FLEET] (default 4000)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cvm/scheduler/placement.h"
#include "placement_fleet.h"

namespace {

using cvm::bench::kGiB;
using cvm::bench::kNow;
using cvm::scheduler::PlacementOptions;
using cvm::scheduler::PlacementRequest;
using cvm::scheduler::Search;

PlacementRequest random_request(std::mt19937_64& rng) {
  PlacementRequest r;
  r.cpu_millicores = 250 * (1 + rng() % 32);
  r.memory_bytes = (kGiB / 4) * (1 + rng() % 64);
  r.cvm = rng() % 10 != 0;
  r.caching = rng() % 2 == 0;
  r.auto_load_shiftfs = rng() % 2 == 0;
  if (rng() % 5 == 0) {
    r.gpu_count = 1 + static_cast<uint32_t>(rng() % 4);
    r.gpu_vendor = cvm::v1::NVIDIA;
    r.caching = false;
    r.gpu_min_memory_bytes = rng() % 2 == 0 ? 0 : 60 * kGiB;
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const int decisions = argc > 1 ? std::atoi(argv[1]) : 4000;
  std::printf("%8s %6s %10s %10s %12s %12s %12s %8s\n", "nodes", "seeds", "decisions", "identical",
              "gap mean", "gap p99", "gap max", "agree");
  bool ok = true;
  for (int n : {500, 5'000, 50'000}) {
    std::vector<double> gaps;
    uint64_t identical = 0, placed = 0, agree = 0, total = 0;
    const int seeds = n >= 50'000 ? 2 : 4;
    for (int seed = 1; seed <= seeds; ++seed) {
      auto index = cvm::bench::make_fleet(n, static_cast<uint64_t>(seed));
      std::mt19937_64 rng(static_cast<uint64_t>(seed) * 7919);
      for (int i = 0; i < decisions / seeds; ++i) {
        const auto req = random_request(rng);
        PlacementOptions o;
        o.now_unix_ms = kNow;
        o.strategy = rng() % 2 == 0 ? cvm::v1::BINPACK : cvm::v1::SPREAD;
        o.max_candidates = 3;
        PlacementOptions scan = o;
        scan.search = Search::kScan;
        o.search = Search::kIndex;
        const auto got = cvm::scheduler::place(*index, req, o);
        const auto want = cvm::scheduler::place(*index, req, scan);
        ++total;
        if (got.ok() == want.ok()) ++agree;
        if (!got.ok() || !want.ok()) continue;
        ++placed;
        gaps.push_back(std::abs(got.best().utilization - want.best().utilization));
        if (got.best().node_id == want.best().node_id) ++identical;
        index->reserve("b" + std::to_string(i), got.best().node_id,
                       cvm::scheduler::reservation_for(req));
      }
    }
    std::sort(gaps.begin(), gaps.end());
    double mean = 0;
    for (double g : gaps) mean += g;
    mean = gaps.empty() ? 0 : mean / static_cast<double>(gaps.size());
    const double p99 = gaps.empty() ? 0 : gaps[gaps.size() * 99 / 100];
    const double max = gaps.empty() ? 0 : gaps.back();
    std::printf("%8d %6d %10llu %9.2f%% %12.3g %12.3g %12.3g %7.2f%%\n", n, seeds,
                static_cast<unsigned long long>(total),
                placed == 0 ? 0.0 : 100.0 * static_cast<double>(identical) / placed, mean, p99, max,
                100.0 * static_cast<double>(agree) / static_cast<double>(total));
    if (agree != total || max > cvm::scheduler::kScoreEpsilon) ok = false;
  }
  std::printf("%s\n", ok ? "quality: every decision within kScoreEpsilon of the exact best"
                         : "quality: OUTSIDE THE GUARANTEE");
  return ok ? 0 : 1;
}
