#pragma once
// How well two GPUs of one node talk to each other, and which set of free GPUs a multi-GPU lease
// should get. Pure: the inputs are the GpuDevice fields the agent reports (NVLink peers, NVSwitch
// links, the sysfs PCI path, the NUMA node), nothing is read from the host here.
//
// The pair score follows NVIDIA's device plugin allocator (go-gpuallocator, best-effort policy):
// every pair has one PCIe relation worth 10 (across NUMA nodes) to 60 (same board), and each
// NVLink between them adds 100, so an NVLink pair always beats any PCIe-only pair. A set's score
// is the sum of its pairs' scores.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/v1/node.pb.h"

namespace cvm::broker {

// The PCIe relation of two GPUs, in NVML's topology levels from farthest to closest.
enum class PcieLink {
  kUnknown,       // no PCI path or NUMA node reported
  kCrossNuma,     // NVML SYSTEM: through the interconnect between CPU sockets
  kSameNuma,      // NVML NODE: same NUMA node, different host bridges
  kHostBridge,    // NVML HOSTBRIDGE: same root complex, different root ports
  kMultiSwitch,   // NVML MULTIPLE: below the same root port, through more than one switch
  kSingleSwitch,  // NVML SINGLE: below one PCIe switch
  kSameBoard,     // NVML INTERNAL: instances of one GPU (MIG) or GPUs of one board
};

std::string_view pcie_link_name(PcieLink link);

// From the two devices' pci_path ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0")
// and numa_node. MIG instances of the same parent are kSameBoard.
PcieLink pcie_link(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b);

// Active NVLink links between two GPUs: the direct links either side reports (the larger count,
// so a one-sided report still counts), or, when both sit on an NVSwitch fabric, the smaller of
// their switch link counts.
uint32_t nvlink_links(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b);

int pcie_score(PcieLink link);
int pair_score(const cvm::v1::GpuDevice& a, const cvm::v1::GpuDevice& b);

// Pair scores of a list of devices, row-major n x n (0 on the diagonal).
class ScoreMatrix {
 public:
  explicit ScoreMatrix(std::span<const cvm::v1::GpuDevice* const> devices);
  [[nodiscard]] int at(size_t i, size_t j) const { return scores_[i * n_ + j]; }
  [[nodiscard]] size_t size() const { return n_; }

 private:
  size_t n_;
  std::vector<int> scores_;
};

struct SetChoice {
  std::vector<size_t> indices;  // ascending
  int score = 0;                // sum of pair scores inside the set
  int remaining_score = 0;      // sum of pair scores among the free devices left over
};

// The best `count` of the n devices scored by `m` (n >= count >= 1), by, in order:
//  1. the highest set score (NVLink-connected sets first, then the closest PCIe relation);
//  2. the highest score left among the devices not taken, so a single-GPU lease goes to the
//     island that is already broken up and whole NVLink islands stay free for larger requests;
//  3. the lowest indices (callers order devices by minor), so the choice is deterministic.
// Every combination is tried while there are at most `exhaustive_limit` of them (C(8,4) = 70 on an
// 8-GPU node); beyond that (nodes exposing many MIG instances) a greedy growth from every seed.
SetChoice choose_best_set(const ScoreMatrix& m, size_t count, uint64_t exhaustive_limit = 20000);

// C(n, k), saturating at UINT64_MAX.
uint64_t combinations(uint64_t n, uint64_t k);

}  // namespace cvm::broker
