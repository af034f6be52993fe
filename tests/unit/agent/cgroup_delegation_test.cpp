// cgroup delegation (cvm-supervisor): which cgroup mounts a mountinfo has, which files of the
// container's cgroup go to the workspace's root on v1 and v2, and the applier on a fixture tree
// shaped like the unified hierarchy (the host here is v1 hybrid; v1 is exercised for real by the
// machine e2e tests).
#include "cgroup_delegation.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>

#include "fixture_tree.h"

namespace cvm::supervisor {
namespace {

using Kind = CgroupHierarchy::Kind;

// A supervising container's mountinfo on a v1 hybrid host, in its cgroup namespace.
constexpr std::string_view kHybrid =
    "600 590 0:50 / / ro,relatime - overlay overlay rw\n"
    "610 600 0:60 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755\n"
    "611 610 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime master:9 - cgroup "
    "cgroup rw,memory\n"
    "612 610 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "613 610 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
    "614 610 0:33 / /sys/fs/cgroup/unified rw,relatime shared:4 - cgroup2 cgroup2 rw\n"
    "615 600 0:5 / /proc rw - proc proc rw\n";

TEST(CgroupMounts, FindsEveryV1AndV2MountAndNothingElse) {
  const auto mounts = parse_cgroup_mounts(kHybrid);
  ASSERT_EQ(mounts.size(), 4u);
  EXPECT_EQ(mounts[0], (CgroupHierarchy{Kind::kV1, "/sys/fs/cgroup/memory", "/"}));
  EXPECT_EQ(mounts[1], (CgroupHierarchy{Kind::kV1, "/sys/fs/cgroup/cpu,cpuacct", "/"}));
  EXPECT_EQ(mounts[2], (CgroupHierarchy{Kind::kV1, "/sys/fs/cgroup/systemd", "/"}));
  EXPECT_EQ(mounts[3], (CgroupHierarchy{Kind::kV2, "/sys/fs/cgroup/unified", "/"}));
}

TEST(CgroupMounts, UnescapesOctalAndSkipsMalformedLines) {
  const auto mounts = parse_cgroup_mounts(
      "1 0 0:1 /a\\040b /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
      "garbage\n"
      "2 1 0:2 / /x rw shared:1\n"  // no separator
      "3 1 0:3 / /y rw -\n");       // no fstype
  ASSERT_EQ(mounts.size(), 1u);
  EXPECT_EQ(mounts[0].mount_point, "/mnt/with space");
  EXPECT_EQ(mounts[0].root, "/a b");
}

TEST(CgroupDelegation, V1HandsOverTheDirAndTaskFilesNeverLimits) {
  const auto paths = delegation_paths(parse_cgroup_mounts(kHybrid), "/inner");
  const auto has = [&](const std::string& p) {
    return std::find(paths.begin(), paths.end(), p) != paths.end();
  };
  for (const char* h : {"memory", "cpu,cpuacct", "systemd"}) {
    const std::string dir = std::string("/sys/fs/cgroup/") + h + "/inner";
    EXPECT_TRUE(has(dir)) << dir;
    for (const char* f : {"cgroup.procs", "tasks", "cgroup.clone_children", "notify_on_release"}) {
      EXPECT_TRUE(has(dir + "/" + f)) << dir << "/" << f;
    }
  }
  for (const auto& p : paths) {
    EXPECT_EQ(p.find("limit"), std::string::npos) << p;
    EXPECT_EQ(p.find("quota"), std::string::npos) << p;
    EXPECT_EQ(p.find(".max"), std::string::npos) << p;
  }
}

TEST(CgroupDelegation, V2HandsOverTheDirProcsThreadsAndSubtreeControl) {
  const auto paths = delegation_paths({{Kind::kV2, "/sys/fs/cgroup", "/"}}, "/inner/");
  EXPECT_EQ(paths,
            (std::vector<std::string>{"/sys/fs/cgroup/inner", "/sys/fs/cgroup/inner/cgroup.procs",
                                      "/sys/fs/cgroup/inner/cgroup.threads",
                                      "/sys/fs/cgroup/inner/cgroup.subtree_control"}));
}

TEST(CgroupDelegation, NeverTheRootNorAnEscapeNorAnUnreachablePath) {
  const auto mounts = parse_cgroup_mounts(kHybrid);
  EXPECT_TRUE(delegation_paths(mounts, "/").empty());
  EXPECT_TRUE(delegation_paths(mounts, "").empty());
  EXPECT_TRUE(delegation_paths(mounts, "/../etc").empty());
  // A mount of a subtree reaches only what lies below its root.
  const std::vector<CgroupHierarchy> sub = {{Kind::kV2, "/sys/fs/cgroup", "/cvm/ws1"}};
  EXPECT_TRUE(delegation_paths(sub, "/other/inner").empty());
  EXPECT_EQ(delegation_paths(sub, "/cvm/ws1/inner").front(), "/sys/fs/cgroup/inner");
  // A relative path is taken from the hierarchy's root, as runc does.
  EXPECT_EQ(delegation_paths({{Kind::kV2, "/sys/fs/cgroup", "/"}}, "inner").front(),
            "/sys/fs/cgroup/inner");
}

TEST(CgroupDelegation, AppliedToAUnifiedFixtureTreeOnlyTheDelegatedFilesChange) {
  cvm::agent::testing::FixtureTree tree;
  const std::string cg = tree.path("cgroup/inner");
  for (const char* f : {"cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "memory.max",
                        "pids.max", "cgroup.max.depth"}) {
    tree.write(std::string("cgroup/inner/") + f, "");
  }
  const auto paths = delegation_paths({{Kind::kV2, tree.path("cgroup"), "/"}}, "/inner");
  // As root, hand it to an unmapped ID as the agent does; otherwise to ourselves (chown to one's
  // own IDs is allowed), which still checks that every planned path is applied.
  const uid_t uid = ::geteuid() == 0 ? 165536 : ::geteuid();
  const gid_t gid = ::geteuid() == 0 ? 165536 : ::getegid();
  ASSERT_EQ(apply_delegation(paths, uid, gid), "");
  const auto owner = [&](const std::string& rel) {
    struct stat st {};
    EXPECT_EQ(::lstat((cg + rel).c_str(), &st), 0) << rel;
    return st.st_uid;
  };
  EXPECT_EQ(owner(""), uid);
  for (const char* f : {"/cgroup.procs", "/cgroup.threads", "/cgroup.subtree_control"}) {
    EXPECT_EQ(owner(f), uid) << f;
  }
  if (::geteuid() == 0) {
    for (const char* f : {"/memory.max", "/pids.max", "/cgroup.max.depth"}) {
      EXPECT_EQ(owner(f), 0u) << f << " is a limit: it stays the node's";
    }
  }
  // A file this kernel lacks is no error; any other failure names its path.
  EXPECT_EQ(apply_delegation({cg + "/cgroup.absent"}, uid, gid), "");
  if (::geteuid() != 0) {
    const std::string err = apply_delegation({cg}, 0, 0);
    EXPECT_NE(err.find(cg), std::string::npos) << err;
  }
}

}  // namespace
}  // namespace cvm::supervisor
