// Node sysctl minimums: only limits below the minimum are raised, none lowered, unreadable ones
// left alone; and raise_node_sysctls on a fixture /proc.
#include "cvm/agent/node_tuning.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>

#include "fixture_tree.h"

namespace cvm::agent {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(NodeTuning, RaisesOnlyWhatIsBelowTheMinimum) {
  const std::vector<SysctlMinimum> mins = {{"a", 100}, {"b", 50}, {"c", 10}};
  std::map<std::string, uint64_t> now = {{"a", 128}, {"b", 49}};  // c unreadable
  auto read = [&](const std::string& n) -> std::optional<uint64_t> {
    const auto it = now.find(n);
    return it == now.end() ? std::nullopt : std::optional<uint64_t>(it->second);
  };
  EXPECT_EQ(sysctls_to_raise(mins, read), (std::vector<SysctlChange>{{"b", 49, 50}}));
  now["b"] = 50;
  EXPECT_TRUE(sysctls_to_raise(mins, read).empty());
}

TEST(NodeTuning, TheMinimumsCoverInotify) {
  bool instances = false;
  for (const auto& m : node_sysctl_minimums()) {
    if (m.name == "fs.inotify.max_user_instances") instances = m.minimum >= 1024;
  }
  EXPECT_TRUE(instances) << "Debian's 128 stops the 20th systemd workspace";
}

TEST(NodeTuning, WritesTheFixtureProcAndReportsIt) {
  testing::FixtureTree tree;
  tree.write("proc/sys/fs/inotify/max_user_instances", "128\n");
  tree.write("proc/sys/fs/inotify/max_user_watches", "2000000\n");  // above: kept
  // max_queued_events missing: left alone
  const auto lines = raise_node_sysctls(tree.path("proc"));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], "raised fs.inotify.max_user_instances 128 -> 8192");
  EXPECT_EQ(slurp(tree.path("proc/sys/fs/inotify/max_user_instances")), "8192\n");
  EXPECT_EQ(slurp(tree.path("proc/sys/fs/inotify/max_user_watches")), "2000000\n");
}

}  // namespace
}  // namespace cvm::agent
