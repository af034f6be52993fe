// The pure half of the Caching-on rootfs: the overlay's paths and options, the ID map, which path a
// launch takes, and which mounts a workspace directory holds (mountinfo parsing).
#include "cvm/agent/idmap_mount.h"

#include <gtest/gtest.h>

namespace cvm::agent {
namespace {

TEST(PlanWorkspaceOverlay, PathsAndOptions) {
  auto p = plan_workspace_overlay("/var/lib/cvm-agent/workspaces/ws1",
                                  "/var/lib/cvm-agent/image-cache/rootfs/abc/rootfs");
  ASSERT_TRUE(p.ok()) << p.error().message;
  EXPECT_EQ(p->lower, "/var/lib/cvm-agent/workspaces/ws1/overlay/lower");
  EXPECT_EQ(p->upper, "/var/lib/cvm-agent/workspaces/ws1/overlay/upper");
  EXPECT_EQ(p->work, "/var/lib/cvm-agent/workspaces/ws1/overlay/work");
  EXPECT_EQ(p->target, "/var/lib/cvm-agent/workspaces/ws1/bundle/rootfs");
  EXPECT_EQ(p->source, "/var/lib/cvm-agent/image-cache/rootfs/abc/rootfs");
  EXPECT_EQ(p->options,
            "lowerdir=/var/lib/cvm-agent/workspaces/ws1/overlay/lower,"
            "upperdir=/var/lib/cvm-agent/workspaces/ws1/overlay/upper,"
            "workdir=/var/lib/cvm-agent/workspaces/ws1/overlay/work");
}

TEST(PlanWorkspaceOverlay, RefusesPathsTheOptionsCannotCarry) {
  EXPECT_FALSE(plan_workspace_overlay("/state/a,b/ws", "/cache/r").ok());
  EXPECT_FALSE(plan_workspace_overlay("/state/a:b/ws", "/cache/r").ok());
  EXPECT_FALSE(plan_workspace_overlay("/state/a\\b/ws", "/cache/r").ok());
}

TEST(IdMapLine, ZeroToTheRangeBase) {
  EXPECT_EQ(id_map_line(IdRange{231072, 65536}), "0 231072 65536\n");
}

TEST(ChooseRootfsPath, OverlayOnlyWithCachingOnAndSupport) {
  const IdmapSupport yes{true, "works"};
  const IdmapSupport no{false, "kernel 5.4"};
  auto c = choose_rootfs_path(true, yes);
  EXPECT_EQ(c.path, RootfsPath::kIdmappedOverlay);
  EXPECT_NE(c.note.find("ID-mapped overlay"), std::string::npos) << c.note;
  c = choose_rootfs_path(false, yes);
  EXPECT_EQ(c.path, RootfsPath::kUnpack);
  EXPECT_NE(c.note.find("Caching off"), std::string::npos) << c.note;
  c = choose_rootfs_path(true, no);
  EXPECT_EQ(c.path, RootfsPath::kUnpack);
  EXPECT_NE(c.note.find("kernel 5.4"), std::string::npos) << "the note says why: " << c.note;
}

TEST(MountsUnder, DeepestFirstAndOnlyBelowTheDirectory) {
  const std::string info =
      "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
      "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
      "90 27 0:50 / /s/ws1/bundle/rootfs rw,relatime - overlay overlay rw,lowerdir=/x\n"
      "91 90 0:51 / /s/ws1/bundle/rootfs/proc rw - proc proc rw\n"
      "92 27 0:52 / /s/ws10/bundle/rootfs rw - overlay overlay rw\n"
      "93 27 0:53 / /s/ws1/with\\040space rw - tmpfs tmpfs rw\n"
      "94 90 0:54 / /s/ws1/bundle/rootfs rw - overlay overlay rw\n"
      "95 27 0:55 / /s/ws1 rw - tmpfs tmpfs rw\n";
  const auto m = mounts_under(info, "/s/ws1/");
  ASSERT_EQ(m.size(), 5u);
  EXPECT_EQ(m[0], "/s/ws1/bundle/rootfs/proc");
  EXPECT_EQ(m[1], "/s/ws1/bundle/rootfs") << "the stacked (later) mount first";
  EXPECT_EQ(m[2], "/s/ws1/bundle/rootfs");
  EXPECT_EQ(m[3], "/s/ws1/with space");
  EXPECT_EQ(m[4], "/s/ws1");
  EXPECT_TRUE(mounts_under(info, "/s/ws2").empty());
  EXPECT_TRUE(mounts_under("garbage\n\n1 2\n", "/s").empty());
}

}  // namespace
}  // namespace cvm::agent
