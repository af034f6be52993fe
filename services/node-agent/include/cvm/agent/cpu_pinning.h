#pragma once
// Which CPUs a workspace with a CPU request runs on. Programs size themselves by the CPUs they may
// run on (sched_getaffinity: nproc, Go's runtime.NumCPU behind `docker info`, make -j, JVMs), not
// by a CFS quota, so a workspace asking for 2 CPUs is also pinned to 2 of the node's: inside it
// then looks like a 2-CPU machine. Pins are shared, not exclusive (the quota still bounds use);
// each new workspace takes the CPUs fewest running workspaces are pinned to, so two 1-CPU
// workspaces on a 2-CPU node do not end up contending for one CPU while the other idles.
// A workspace without a CPU request is not pinned.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cvm::agent {

// "0-3,8,10-11" (the kernel's cpuset list format) -> {0,1,2,3,8,10,11}, sorted, unique.
// nullopt for anything malformed (a reversed range, junk, an empty item).
std::optional<std::vector<int>> parse_cpu_list(std::string_view text);
// The inverse: sorted CPUs as ranges ("0-3,8"); "" for none.
std::string format_cpu_list(std::vector<int> cpus);

// CPUs for a workspace asking for `millicores` (ceil to whole CPUs, at most all of `node_cpus`),
// least used first by `pinned` (the CPU lists of the workspaces already pinned on the node), ties
// to the lowest CPU number. Empty when millicores is 0 or the node has no CPUs.
std::vector<int> choose_cpus(const std::vector<int>& node_cpus, uint64_t millicores,
                             const std::vector<std::vector<int>>& pinned);

}  // namespace cvm::agent
