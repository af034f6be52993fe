#include "cvm/broker/topology.h"

#include <algorithm>
#include <limits>

namespace cvm::broker {

namespace {

std::vector<std::string_view> split_path(std::string_view path) {
  std::vector<std::string_view> out;
  while (!path.empty()) {
    const auto slash = path.find('/');
    auto part = path.substr(0, slash);
    if (!part.empty()) out.push_back(part);
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
  return out;
}

PcieLink by_numa(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b, bool paths_known) {
  if (a.has_numa_node() && b.has_numa_node()) {
    return a.numa_node() == b.numa_node() ? PcieLink::kSameNuma : PcieLink::kCrossNuma;
  }
  // Different root complexes with no NUMA information: assume the far side, never a closeness
  // that was not reported.
  return paths_known ? PcieLink::kCrossNuma : PcieLink::kUnknown;
}

bool better(int score, int remaining, int best_score, int best_remaining) {
  if (score != best_score) return score > best_score;
  return remaining > best_remaining;
}

}  // namespace

std::string_view pcie_link_name(PcieLink link) {
  switch (link) {
    case PcieLink::kUnknown:
      return "unknown";
    case PcieLink::kCrossNuma:
      return "cross-NUMA";
    case PcieLink::kSameNuma:
      return "same NUMA node";
    case PcieLink::kHostBridge:
      return "same host bridge";
    case PcieLink::kMultiSwitch:
      return "multiple PCIe switches";
    case PcieLink::kSingleSwitch:
      return "single PCIe switch";
    case PcieLink::kSameBoard:
      return "same board";
  }
  return "unknown";
}

PcieLink pcie_link(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b) {
  if (!a.mig_parent_uuid().empty() && a.mig_parent_uuid() == b.mig_parent_uuid()) {
    return PcieLink::kSameBoard;
  }
  const auto pa = split_path(a.pci_path());
  const auto pb = split_path(b.pci_path());
  // A path is at least "<root bus>/<device>".
  if (pa.size() < 2 || pb.size() < 2) return by_numa(a, b, false);
  if (pa.front() != pb.front()) return by_numa(a, b, true);
  // Bridges are the elements between the root bus and the device itself.
  const size_t bridges_a = pa.size() - 2;
  const size_t bridges_b = pb.size() - 2;
  size_t common = 0;
  while (common < bridges_a && common < bridges_b && pa[1 + common] == pb[1 + common]) ++common;
  if (common == 0) return PcieLink::kHostBridge;
  // Below the shared bridges each side passes through its own downstream port(s): one port each
  // is one switch; more means a hierarchy of switches.
  const size_t rest = std::max(bridges_a - common, bridges_b - common);
  return rest <= 1 ? PcieLink::kSingleSwitch : PcieLink::kMultiSwitch;
}

uint32_t nvlink_links(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b) {
  // MIG instances do not do peer-to-peer over NVLink.
  if (!a.mig_parent_uuid().empty() || !b.mig_parent_uuid().empty()) return 0;
  if (a.uuid() == b.uuid()) return 0;
  uint32_t direct = 0;
  for (const auto& p : a.nvlink_peers()) {
    if (p.uuid() == b.uuid()) direct = std::max(direct, p.links());
  }
  for (const auto& p : b.nvlink_peers()) {
    if (p.uuid() == a.uuid()) direct = std::max(direct, p.links());
  }
  const uint32_t via_switch = std::min(a.nvswitch_links(), b.nvswitch_links());
  return std::max(direct, via_switch);
}

int pcie_score(PcieLink link) {
  switch (link) {
    case PcieLink::kUnknown:
      return 0;
    case PcieLink::kCrossNuma:
      return 10;
    case PcieLink::kSameNuma:
      return 20;
    case PcieLink::kHostBridge:
      return 30;
    case PcieLink::kMultiSwitch:
      return 40;
    case PcieLink::kSingleSwitch:
      return 50;
    case PcieLink::kSameBoard:
      return 60;
  }
  return 0;
}

int pair_score(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b) {
  if (a.uuid() == b.uuid()) return 0;
  return pcie_score(pcie_link(a, b)) + 100 * static_cast<int>(nvlink_links(a, b));
}

ScoreMatrix::ScoreMatrix(std::span<const cvm::v1::GpuDevice* const> devices)
    : n_(devices.size()), scores_(n_ * n_, 0) {
  for (size_t i = 0; i < n_; ++i) {
    for (size_t j = i + 1; j < n_; ++j) {
      const int s = pair_score(*devices[i], *devices[j]);
      scores_[i * n_ + j] = s;
      scores_[j * n_ + i] = s;
    }
  }
}

uint64_t combinations(uint64_t n, uint64_t k) {
  if (k > n) return 0;
  k = std::min(k, n - k);
  uint64_t r = 1;
  for (uint64_t i = 1; i <= k; ++i) {
    // r * (n - k + i) / i stays exact because r is C(n-k+i-1, i-1); guard the multiplication.
    const uint64_t f = n - k + i;
    if (r > std::numeric_limits<uint64_t>::max() / f) return std::numeric_limits<uint64_t>::max();
    r = r * f / i;
  }
  return r;
}

SetChoice choose_best_set(const ScoreMatrix& m, size_t count, uint64_t exhaustive_limit) {
  const size_t n = m.size();
  SetChoice best;
  if (count == 0 || count > n) return best;

  std::vector<int> degree(n, 0);
  int total = 0;
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) degree[i] += m.at(i, j);
    total += degree[i];
  }
  total /= 2;

  auto evaluate = [&](const std::vector<size_t>& set, int& score, int& remaining) {
    score = 0;
    int degrees = 0;
    for (size_t a = 0; a < set.size(); ++a) {
      degrees += degree[set[a]];
      for (size_t b = a + 1; b < set.size(); ++b) score += m.at(set[a], set[b]);
    }
    // Pairs inside the set were subtracted twice through the degrees.
    remaining = total - degrees + score;
  };

  best.score = std::numeric_limits<int>::min();
  best.remaining_score = std::numeric_limits<int>::min();

  if (combinations(n, count) <= exhaustive_limit) {
    // Lexicographic order of index sets: on equal scores the first one seen (lowest minors) wins.
    std::vector<size_t> set(count);
    for (size_t i = 0; i < count; ++i) set[i] = i;
    while (true) {
      int score = 0;
      int remaining = 0;
      evaluate(set, score, remaining);
      if (better(score, remaining, best.score, best.remaining_score)) {
        best.indices = set;
        best.score = score;
        best.remaining_score = remaining;
      }
      size_t i = count;
      while (i > 0 && set[i - 1] == n - count + i - 1) --i;
      if (i == 0) break;
      ++set[i - 1];
      for (size_t j = i; j < count; ++j) set[j] = set[j - 1] + 1;
    }
    return best;
  }

  // Greedy: grow a set from every seed by the device adding the most score (ties: the one whose
  // loss hurts the leftover least, then the lowest index); keep the best grown set.
  std::vector<char> in(n, 0);
  for (size_t seed = 0; seed < n; ++seed) {
    std::fill(in.begin(), in.end(), 0);
    std::vector<size_t> set{seed};
    in[seed] = 1;
    while (set.size() < count) {
      size_t pick = n;
      int pick_gain = std::numeric_limits<int>::min();
      for (size_t j = 0; j < n; ++j) {
        if (in[j]) continue;
        int gain = 0;
        for (size_t s : set) gain += m.at(j, s);
        if (pick == n || gain > pick_gain || (gain == pick_gain && degree[j] < degree[pick])) {
          pick = j;
          pick_gain = gain;
        }
      }
      set.push_back(pick);
      in[pick] = 1;
    }
    std::sort(set.begin(), set.end());
    int score = 0;
    int remaining = 0;
    evaluate(set, score, remaining);
    if (better(score, remaining, best.score, best.remaining_score) ||
        (score == best.score && remaining == best.remaining_score && set < best.indices)) {
      best.indices = std::move(set);
      best.score = score;
      best.remaining_score = remaining;
    }
  }
  return best;
}

}  // namespace cvm::broker
