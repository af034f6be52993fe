// The host half of the Caching-on rootfs on real mounts: an overlay whose lower layer is an
// ID-mapped clone of a cached rootfs. Root only; skipped (saying why) elsewhere or where the
// kernel cannot (the probe's reason is printed).
#include "cvm/agent/idmap_mount.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "cvm/test/files.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using cvm::test::read_file;

std::string make_temp_dir(const std::string& prefix) {
  std::string templ = (fs::temp_directory_path() / (prefix + ".XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) return {};
  return templ;
}

// Mount points listed in this process's mountinfo that lie at or below `dir`.
std::vector<std::string> listed_under(const std::string& dir) {
  return mounts_under(read_file("/proc/self/mountinfo"), fs::canonical(dir).string());
}

class IdmapMountTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (mounts, user namespaces)";
    work_ = make_temp_dir("cvm-idmap-it");
    ASSERT_FALSE(work_.empty());
    const auto support = probe_idmapped_overlay(work_);
    std::cout << "probe: " << support.detail << "\n";
    if (!support.supported) GTEST_SKIP() << "no ID-mapped overlay here: " << support.detail;
    EXPECT_TRUE(listed_under(work_).empty()) << "the probe left a mount";
    // The cached rootfs: identity ownership, as the node cache keeps it.
    source_ = work_ + "/cache/rootfs";
    fs::create_directories(source_ + "/etc");
    fs::create_directories(source_ + "/home/u");
    std::ofstream(source_ + "/etc/hostname") << "cached\n";
    std::ofstream(source_ + "/home/u/notes") << "user file\n";
    ASSERT_EQ(::chown((source_ + "/home/u/notes").c_str(), 1000, 1000), 0);
  }
  void TearDown() override {
    if (work_.empty()) return;
    (void)unmount_under(work_);
    std::error_code ec;
    fs::remove_all(work_, ec);
  }
  std::string work_;
  std::string source_;
};

TEST_F(IdmapMountTest, LowerIsShiftedWritesLandInTheUpperDirAndUnmountLeavesNothing) {
  const IdRange a{3100000, 65536};
  const IdRange b{3200000, 65536};
  auto pa = plan_workspace_overlay(work_ + "/ws/a", source_);
  auto pb = plan_workspace_overlay(work_ + "/ws/b", source_);
  ASSERT_TRUE(pa.ok() && pb.ok());
  ASSERT_TRUE(mount_idmapped_overlay(*pa, a).ok());
  ASSERT_TRUE(mount_idmapped_overlay(*pb, b).ok());

  // One mount per workspace, at its bundle's rootfs: the ID-mapped lower is held by the overlay
  // only, not left at its transient mount point.
  EXPECT_EQ(listed_under(work_ + "/ws/a"), std::vector<std::string>{pa->target});
  EXPECT_EQ(listed_under(work_ + "/ws/b"), std::vector<std::string>{pb->target});
  EXPECT_NE(read_file("/proc/self/mountinfo").find(" overlay overlay "), std::string::npos);

  // Owners seen through each overlay: the cache's 0 and 1000 shifted into each range.
  struct stat st {};
  ASSERT_EQ(::stat((pa->target + "/etc/hostname").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base);
  EXPECT_EQ(st.st_gid, a.base);
  ASSERT_EQ(::stat((pa->target + "/home/u/notes").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base + 1000);
  ASSERT_EQ(::stat((pb->target + "/etc/hostname").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, b.base);
  ASSERT_EQ(::stat(pa->target.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base) << "the rootfs itself belongs to the range's root";
  ASSERT_EQ(::stat(pa->upper.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base);
  ASSERT_EQ(::stat(pa->work.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base);

  // Writes land in a's upper dir; the cache and b are untouched.
  std::ofstream(pa->target + "/etc/hostname") << "changed in a\n";
  std::ofstream(pa->target + "/new-file") << "new\n";
  EXPECT_EQ(read_file(pa->upper + "/etc/hostname"), "changed in a\n");
  EXPECT_EQ(read_file(pa->upper + "/new-file"), "new\n");
  EXPECT_EQ(read_file(source_ + "/etc/hostname"), "cached\n");
  EXPECT_EQ(read_file(pb->target + "/etc/hostname"), "cached\n");
  EXPECT_FALSE(fs::exists(pb->target + "/new-file"));
  ASSERT_EQ(::stat((pa->upper + "/etc/hostname").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, a.base) << "copy-up keeps the shifted owner";
  // The lower layer is read-only: removing a cached file only whites it out in the upper dir.
  fs::remove(pa->target + "/home/u/notes");
  EXPECT_TRUE(fs::exists(source_ + "/home/u/notes"));

  ASSERT_TRUE(unmount_under(work_ + "/ws/a").ok());
  EXPECT_TRUE(listed_under(work_ + "/ws/a").empty());
  EXPECT_EQ(listed_under(work_ + "/ws/b").size(), 1u) << "b keeps its overlay";
  ASSERT_TRUE(unmount_under(work_ + "/ws").ok());
  EXPECT_TRUE(listed_under(work_).empty());
  EXPECT_EQ(read_file(source_ + "/etc/hostname"), "cached\n");
}

TEST_F(IdmapMountTest, AFailedMountLeavesNothingMounted) {
  auto p = plan_workspace_overlay(work_ + "/ws/bad", work_ + "/no-such-cache");
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(mount_idmapped_overlay(*p, IdRange{3300000, 65536}).ok());
  EXPECT_TRUE(listed_under(work_).empty());
}

TEST_F(IdmapMountTest, UsernsFdCarriesTheRange) {
  auto fd = open_userns_fd(IdRange{3400000, 65536});
  ASSERT_TRUE(fd.ok()) << fd.error().message;
  // The namespace outlives its short-lived creator; its map is visible to a process that joins
  // it, but the fd itself is enough for mount_setattr (shown above). Here: it is a user ns.
  const std::string link = fs::read_symlink("/proc/self/fd/" + std::to_string(*fd)).string();
  EXPECT_EQ(link.rfind("user:[", 0), 0u) << link;
  ::close(*fd);
}

}  // namespace
}  // namespace cvm::agent
