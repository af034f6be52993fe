// The launcher's small machine decisions: how an init is stopped, which exit is a shutdown, the
// machine's /etc/hosts, and shifting kept storage onto a new ID range (root only: chown).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <map>

#include <filesystem>

#include "cvm/agent/launcher.h"
#include "fixture_tree.h"

namespace cvm::agent {
namespace {

TEST(StopSignal, SystemdHaltsOnRtmin3EverythingElseGetsTerm) {
  EXPECT_EQ(stop_signal_for_init("/rootfs/usr/lib/systemd/systemd"), "RTMIN+3");
  EXPECT_EQ(stop_signal_for_init("systemd"), "RTMIN+3");
  EXPECT_EQ(stop_signal_for_init("/rootfs/bin/busybox"), "TERM");
  EXPECT_EQ(stop_signal_for_init("/rootfs/sbin/systemd-not"), "TERM");
  EXPECT_EQ(stop_signal_for_init(""), "TERM");
}

TEST(ShutdownExit, PoweroffHaltRebootAndZeroAreShutdownsCrashesAreNot) {
  EXPECT_TRUE(is_shutdown_exit(0));
  EXPECT_TRUE(is_shutdown_exit(128 + SIGINT));  // halt, poweroff in a PID namespace
  EXPECT_TRUE(is_shutdown_exit(128 + SIGHUP));  // reboot
  EXPECT_FALSE(is_shutdown_exit(1));
  EXPECT_FALSE(is_shutdown_exit(255));
  EXPECT_FALSE(is_shutdown_exit(128 + SIGKILL));
  EXPECT_FALSE(is_shutdown_exit(128 + SIGSEGV));
}

TEST(ConsoleTail, LastLinesWithoutColoursOrCarriageReturns) {
  const std::string console =
      "one\r\n\x1b[0;32m  OK  \x1b[0m] Started x\n\n\x1b[0;1;31mFailed\x1b[0m y\nlast";
  EXPECT_EQ(console_tail(console, 2), "Failed y\nlast");
  EXPECT_EQ(console_tail(console), "one\nOK  ] Started x\nFailed y\nlast");  // lines trimmed
  EXPECT_EQ(console_tail(""), "");
  const std::string big(5000, 'x');
  const std::string tail = console_tail(big, 15, 100);
  EXPECT_EQ(tail.size(), 103u);
  EXPECT_EQ(tail.substr(0, 3), "...");
}

TEST(InitExit, ShutdownsAreStoppedEverythingElseFailsWithStatusAndConsole) {
  using S = SupervisorStatus::State;
  SupervisorStatus exited{S::kExited, 0, 130, ""};
  EXPECT_TRUE(classify_init_exit(exited, "Reached target halt").shutdown);
  exited.code = 0;
  EXPECT_TRUE(classify_init_exit(exited, "").shutdown);
  exited.code = 137;
  auto crash = classify_init_exit(exited, "boot\nFreezing execution.");
  EXPECT_FALSE(crash.shutdown);
  EXPECT_NE(crash.message.find("status 137 (signal 9)"), std::string::npos) << crash.message;
  EXPECT_NE(crash.message.find("Freezing execution."), std::string::npos) << crash.message;
  exited.code = 255;
  EXPECT_EQ(classify_init_exit(exited, "").message, "the workspace's init exited with status 255");
  auto failed = classify_init_exit(SupervisorStatus{S::kFailed, 0, 0, "runc start: boom"}, "");
  EXPECT_FALSE(failed.shutdown);
  EXPECT_NE(failed.message.find("runc start: boom"), std::string::npos);
  // No report at all (a plain container, a supervisor killed): never a shutdown.
  auto none = classify_init_exit(std::nullopt, "");
  EXPECT_FALSE(none.shutdown);
  EXPECT_NE(none.message.find("without a report"), std::string::npos);
}

TEST(StateDir, EveryDirectoryDownToTheBundlesMustBeSearchableByOthers) {
  std::map<std::string, unsigned> modes = {{"/", 040755},
                                           {"/var", 040755},
                                           {"/var/lib", 040755},
                                           {"/var/lib/cvm", 040711},
                                           {"/var/lib/cvm/workspaces", 040755},
                                           {"/root", 040700},
                                           {"/root/cvm", 040755}};
  auto mode_of = [&](const std::string& p) -> std::optional<unsigned> {
    const auto it = modes.find(p);
    return it == modes.end() ? std::nullopt : std::optional<unsigned>(it->second);
  };
  EXPECT_EQ(unsearchable_ancestor("/var/lib/cvm/workspaces", mode_of), "");
  EXPECT_EQ(unsearchable_ancestor("/var/lib/cvm/workspaces/", mode_of), "");
  EXPECT_EQ(unsearchable_ancestor("/root/cvm/workspaces", mode_of), "/root is mode 0700");
  // Not made yet: fine, the agent makes it 0755.
  EXPECT_EQ(unsearchable_ancestor("/var/lib/cvm/new/deeper", mode_of), "");
  modes["/var/lib/cvm"] = 040750;
  EXPECT_EQ(unsearchable_ancestor("/var/lib/cvm/workspaces", mode_of), "/var/lib/cvm is mode 0750");
  modes["/var"] = 041754;  // sticky, o+r but no o+x
  EXPECT_EQ(unsearchable_ancestor("/var/lib/cvm/workspaces", mode_of), "/var is mode 1754");
}

TEST(EtcHosts, LocalhostAndTheMachinesOwnName) {
  const std::string hosts = etc_hosts("ws-1");
  EXPECT_NE(hosts.find("127.0.0.1\tlocalhost\n"), std::string::npos);
  EXPECT_NE(hosts.find("127.0.1.1\tws-1\n"), std::string::npos);
  EXPECT_NE(hosts.find("::1\tlocalhost"), std::string::npos);
}

TEST(ShiftOwnership, KeepsOffsetsAndSetuidMovesStrangersToRoot) {
  if (::geteuid() != 0) GTEST_SKIP() << "chown to other IDs needs root";
  testing::FixtureTree tree;
  tree.write("d/file", "x");
  tree.write("d/sub/suid", "x");
  tree.symlink("file", "d/link");
  const auto own = [&](const std::string& rel, uid_t id) {
    ASSERT_EQ(::lchown(tree.path(rel).c_str(), id, id), 0) << rel;
  };
  own("d", 200000);
  own("d/file", 200000 + 1000);
  own("d/sub", 200000);
  own("d/sub/suid", 200000);
  own("d/link", 7);  // not of the old range
  ASSERT_EQ(::chmod(tree.path("d/sub/suid").c_str(), 04755), 0);
  ASSERT_TRUE(shift_tree_ownership(tree.path("d"), 200000, IdRange{300000, 65536}).ok());
  const auto st = [&](const std::string& rel) {
    struct stat s {};
    EXPECT_EQ(::lstat(tree.path(rel).c_str(), &s), 0);
    return s;
  };
  EXPECT_EQ(st("d").st_uid, 300000u);
  EXPECT_EQ(st("d/file").st_uid, 301000u);
  EXPECT_EQ(st("d/file").st_gid, 301000u);
  EXPECT_EQ(st("d/sub/suid").st_uid, 300000u);
  EXPECT_EQ(st("d/sub/suid").st_mode & 07777, 04755u) << "chown dropped the setuid bit";
  EXPECT_EQ(st("d/link").st_uid, 300000u);
  EXPECT_TRUE(S_ISLNK(st("d/link").st_mode));
}

}  // namespace
}  // namespace cvm::agent
