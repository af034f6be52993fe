// cgroup v2 delegation against the kernel, on this host's real unified hierarchy
// (/sys/fs/cgroup/unified on a v1 hybrid host, /sys/fs/cgroup on a v2 one): after
// apply_delegation(delegation_paths(...)), a process running as the workspace's mapped root may
// make sub-cgroups of its cgroup and move itself between them, as systemd inside does, but may not
// move itself out of it nor write an interface file that was not handed over. Before delegation
// the same process may do none of it, so the test sees the difference the chown makes.
// Root only; skips without a cgroup2 mount.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <grp.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "cgroup_delegation.h"

namespace cvm::supervisor {
namespace {

namespace fs = std::filesystem;
constexpr uid_t kMappedRoot = 4190000;  // an ID no one on the node uses

bool write_text(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  return ok;
}

// What a process of the mapped root could do in `dir` (bits of its exit status).
enum : int { kMadeChild = 1, kMovedIntoChild = 2, kMovedOut = 4, kWroteLimit = 8, kBadSetup = 64 };

// Forks a child that root moves into `dir`, then becomes kMappedRoot (no capabilities left) and
// tries each thing. Returns its bits.
int try_as_mapped_root(const std::string& dir) {
  int go[2];
  if (::pipe(go) != 0) return kBadSetup;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(go[1]);
    char c = 0;
    if (::read(go[0], &c, 1) != 1) ::_exit(kBadSetup);
    if (::setgroups(0, nullptr) != 0 || ::setgid(kMappedRoot) != 0 || ::setuid(kMappedRoot) != 0) {
      ::_exit(kBadSetup);
    }
    int bits = 0;
    const std::string child = dir + "/sub";
    if (::mkdir(child.c_str(), 0755) == 0) bits |= kMadeChild;
    if (write_text(child + "/cgroup.procs", "0")) bits |= kMovedIntoChild;
    const std::string parent = fs::path(dir).parent_path().string();
    if (write_text(parent + "/cgroup.procs", "0")) bits |= kMovedOut;
    if (write_text(dir + "/cgroup.max.depth", "5")) bits |= kWroteLimit;
    ::_exit(bits);
  }
  ::close(go[0]);
  if (pid < 0) return kBadSetup;
  const bool moved = write_text(dir + "/cgroup.procs", std::to_string(pid));
  (void)::write(go[1], "x", 1);
  ::close(go[1]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!moved) return kBadSetup;
  return WIFEXITED(status) ? WEXITSTATUS(status) : kBadSetup;
}

class CgroupV2Delegation : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (cgroup directories, setuid)";
    std::ifstream in("/proc/self/mountinfo");
    std::stringstream text;
    text << in.rdbuf();
    for (const auto& h : parse_cgroup_mounts(text.str())) {
      if (h.kind == CgroupHierarchy::Kind::kV2 && h.root == "/") hierarchy_ = h;
    }
    if (hierarchy_.mount_point.empty()) GTEST_SKIP() << "no cgroup2 mount on this host";
    cgroup_path_ = "/cvm-v2-delegation-" + std::to_string(::getpid());
    dir_ = hierarchy_.mount_point + cgroup_path_;
    ASSERT_EQ(::mkdir(dir_.c_str(), 0755), 0) << dir_ << ": " << std::strerror(errno);
  }
  void TearDown() override {
    if (dir_.empty()) return;
    // The children have exited: the cgroups are empty and can go, deepest first.
    ::rmdir((dir_ + "/sub").c_str());
    ::rmdir(dir_.c_str());
  }
  CgroupHierarchy hierarchy_;
  std::string cgroup_path_;
  std::string dir_;
};

TEST_F(CgroupV2Delegation, TheMappedRootManagesItsSubtreeAndNothingMore) {
  // Not delegated: nothing.
  const int before = try_as_mapped_root(dir_);
  ASSERT_NE(before & kBadSetup, kBadSetup);
  EXPECT_EQ(before & kMadeChild, 0) << "made a sub-cgroup without delegation";
  EXPECT_EQ(before & kMovedOut, 0);

  const auto paths = delegation_paths({hierarchy_}, cgroup_path_);
  ASSERT_FALSE(paths.empty());
  ASSERT_EQ(apply_delegation(paths, kMappedRoot, kMappedRoot), "");
  const int after = try_as_mapped_root(dir_);
  ASSERT_NE(after & kBadSetup, kBadSetup);
  EXPECT_EQ(after & kMadeChild, kMadeChild) << "cannot make a sub-cgroup of its own cgroup";
  EXPECT_EQ(after & kMovedIntoChild, kMovedIntoChild) << "cannot move itself into it";
  EXPECT_EQ(after & kMovedOut, 0) << "moved itself out of the delegated cgroup";
  EXPECT_EQ(after & kWroteLimit, 0) << "wrote cgroup.max.depth, which stays the node's";
}

}  // namespace
}  // namespace cvm::supervisor
