// CPU pinning: the kernel's list format both ways, and which CPUs a workspace gets.
#include "cvm/agent/cpu_pinning.h"

#include <gtest/gtest.h>

namespace cvm::agent {
namespace {

using V = std::vector<int>;

TEST(CpuList, ParsesTheKernelsFormat) {
  EXPECT_EQ(parse_cpu_list("0-3,8,10-11\n"), V({0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(parse_cpu_list("5"), V({5}));
  EXPECT_EQ(parse_cpu_list("3,1,1-2"), V({1, 2, 3}));
  EXPECT_EQ(parse_cpu_list(""), V());
  EXPECT_EQ(parse_cpu_list("\n"), V());
}

TEST(CpuList, RefusesWhatIsNotOne) {
  for (const char* bad :
       {"3-1", "a", "1,", ",1", "1--2", "-1", "1-", "1 2", "0-99999999", "1,,2"}) {
    EXPECT_FALSE(parse_cpu_list(bad)) << bad;
  }
}

TEST(CpuList, FormatsRangesAndRoundTrips) {
  EXPECT_EQ(format_cpu_list({}), "");
  EXPECT_EQ(format_cpu_list({3}), "3");
  EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(format_cpu_list({2, 0, 1, 1}), "0-2");
  for (const char* s : {"0", "0-1", "0,2,4", "1-3,7-9,15"}) {
    EXPECT_EQ(format_cpu_list(*parse_cpu_list(s)), s);
  }
}

TEST(ChooseCpus, NoRequestNoPin) {
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 0, {}), V());
  EXPECT_EQ(choose_cpus({}, 2000, {}), V());
}

TEST(ChooseCpus, RoundsUpToWholeCpusAndCapsAtTheNode) {
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 1, {}), V({0}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 500, {}), V({0}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 1000, {}), V({0}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 1001, {}), V({0, 1}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 2500, {}), V({0, 1, 2}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 64000, {}), V({0, 1, 2, 3}));
}

TEST(ChooseCpus, TakesTheLeastUsedCpus) {
  // Two 1-CPU workspaces on a 2-CPU node get one CPU each.
  EXPECT_EQ(choose_cpus({0, 1}, 1000, {{0}}), V({1}));
  EXPECT_EQ(choose_cpus({0, 1}, 1000, {{0}, {1}}), V({0}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 2000, {{0, 1}, {1}}), V({2, 3}));
  EXPECT_EQ(choose_cpus({0, 1, 2, 3}, 3000, {{0, 1}, {1}}), V({0, 2, 3}));
  // Pins on CPUs the node no longer offers count for nothing.
  EXPECT_EQ(choose_cpus({0, 1}, 1000, {{7}, {0}}), V({1}));
}

TEST(ChooseCpus, OnlyTheNodesCpusInAnyOrder) {
  // The agent's own cpuset may be a subset with gaps (a DaemonSet limited to some CPUs).
  EXPECT_EQ(choose_cpus({6, 2, 4}, 2000, {}), V({2, 4}));
  EXPECT_EQ(choose_cpus({6, 2, 4}, 2000, {{2}}), V({4, 6}));
  EXPECT_EQ(choose_cpus({2, 2, 4}, 3000, {}), V({2, 4}));
}

TEST(ChooseCpus, SpreadsManyWorkspacesEvenly) {
  const V node = {0, 1, 2, 3};
  std::vector<V> pinned;
  for (int i = 0; i < 12; ++i) pinned.push_back(choose_cpus(node, 1000, pinned));
  std::vector<int> count(4, 0);
  for (const auto& p : pinned) {
    ASSERT_EQ(p.size(), 1u);
    ++count[p[0]];
  }
  EXPECT_EQ(count, V({3, 3, 3, 3}));
}

}  // namespace
}  // namespace cvm::agent
