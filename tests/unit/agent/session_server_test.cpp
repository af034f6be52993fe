#include "cvm/agent/session_server.h"

#include <unistd.h>
#include <algorithm>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;

constexpr const char* kPasswd =
    "root:x:0:0:root:/root:/bin/bash\n"
    "# a comment\n"
    "broken line\n"
    "dev:x:1000:1000:Dev,,,:/home/dev:/bin/zsh\n"
    "svc:x:998:998::/:/usr/sbin/nologin\n";
constexpr const char* kGroup =
    "root:x:0:\n"
    "sudo:x:27:dev\n"
    "docker:x:999:dev,other\n"
    "dev:x:1000:\n"
    "staff:x:50:\n";

TEST(SessionUser, TheDefaultIsTheInitsUserWithItsHomeAndShell) {
  auto u = resolve_session_user("", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->uid, 0u);
  EXPECT_EQ(u->name, "root");
  EXPECT_EQ(u->home, "/root");
  EXPECT_EQ(u->shell, "/bin/bash");
  EXPECT_TRUE(u->groups.empty());
  auto d = resolve_session_user("", kPasswd, kGroup, 1000, 1000);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->name, "dev");
}

TEST(SessionUser, ANameGetsItsIdsAndSupplementaryGroups) {
  auto u = resolve_session_user("dev", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->uid, 1000u);
  EXPECT_EQ(u->gid, 1000u);
  EXPECT_EQ(u->home, "/home/dev");
  EXPECT_EQ(u->shell, "/bin/zsh");
  EXPECT_EQ(u->groups, (std::vector<uint32_t>{27, 999})) << "sudo and docker, as a login gives";
}

TEST(SessionUser, NumbersAndGroupsAfterAColon) {
  auto byuid = resolve_session_user("1000", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(byuid.ok());
  EXPECT_EQ(byuid->name, "dev");
  auto unknown = resolve_session_user("4242", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(unknown.ok()) << "a uid not in /etc/passwd still runs, as runc's --user does";
  EXPECT_EQ(unknown->uid, 4242u);
  EXPECT_EQ(unknown->gid, 4242u);
  EXPECT_EQ(unknown->home, "/");
  EXPECT_EQ(unknown->shell, "/bin/sh");
  auto named = resolve_session_user("dev:staff", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->gid, 50u);
  EXPECT_EQ(named->groups, (std::vector<uint32_t>{27, 999}));
  auto numeric = resolve_session_user("dev:7", kPasswd, kGroup, 0, 0);
  ASSERT_TRUE(numeric.ok());
  EXPECT_EQ(numeric->gid, 7u);
}

TEST(SessionUser, UnknownNamesAreRefusedWithTheFileTheyAreMissingFrom) {
  auto u = resolve_session_user("nobody-here", kPasswd, kGroup, 0, 0);
  ASSERT_FALSE(u.ok());
  EXPECT_TRUE(u.error().is_not_found());
  EXPECT_NE(u.error().message.find("/etc/passwd"), std::string::npos);
  auto g = resolve_session_user("dev:wheel", kPasswd, kGroup, 0, 0);
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.error().message.find("/etc/group"), std::string::npos);
  auto empty = resolve_session_user("", "", "", 0, 0);
  ASSERT_TRUE(empty.ok()) << "an image without /etc/passwd still has root";
  EXPECT_EQ(empty->home, "/");
}

ExecPlan plan() {
  ExecPlan p;
  p.runc = "/usr/sbin/runc";
  p.runc_root = "/run/cvm-agent/runc";
  p.container_id = "cvm-ws1";
  p.inner_runtime = "/usr/sbin/runc";
  p.inner_root = "/run/cvm-runtime";
  p.inner_id = "inner";
  p.user.uid = 1000;
  p.user.gid = 1000;
  p.user.groups = {27};
  p.user.name = "dev";
  p.user.home = "/home/dev";
  p.user.shell = "/bin/bash";
  p.env = {"A=1"};
  p.argv = {"ls", "-l"};
  return p;
}

TEST(ExecArgv, TheOuterRuncExecsTheInnerRuntimesExecOfTheInnerContainer) {
  const std::vector<std::string> want = {"/usr/sbin/runc",
                                         "--root",
                                         "/run/cvm-agent/runc",
                                         "exec",
                                         "cvm-ws1",
                                         "/usr/sbin/runc",
                                         "--root",
                                         "/run/cvm-runtime",
                                         "exec",
                                         "--user",
                                         "1000:1000",
                                         "--additional-gids",
                                         "27",
                                         "--cwd",
                                         "/home/dev",
                                         "--env",
                                         "HOME=/home/dev",
                                         "--env",
                                         "USER=dev",
                                         "--env",
                                         "LOGNAME=dev",
                                         "--env",
                                         "SHELL=/bin/bash",
                                         "--env",
                                         "A=1",
                                         "inner",
                                         "ls",
                                         "-l"};
  EXPECT_EQ(exec_argv(plan()), want);
}

TEST(ExecArgv, ATerminalAtBothLevelsAndTheCallersDirectory) {
  auto p = plan();
  p.tty = true;
  p.cwd = "/srv";
  p.user.name.clear();
  const auto argv = exec_argv(p);
  EXPECT_EQ(argv[4], "-t");
  EXPECT_EQ(argv[5], "cvm-ws1");
  EXPECT_EQ(argv[10], "-t");
  const auto cwd = std::find(argv.begin(), argv.end(), "--cwd");
  ASSERT_NE(cwd, argv.end());
  EXPECT_EQ(*(cwd + 1), "/srv");
  EXPECT_EQ(std::find(argv.begin(), argv.end(), "USER=dev"), argv.end())
      << "no USER for a uid without a name";
  EXPECT_EQ(login_shell_argv(p.user), (std::vector<std::string>{"/bin/bash", "-l"}));
}

TEST(LeftoverSessions, OnlyOuterExecsOfThisAgentsRuncRoot) {
  const fs::path proc = fs::temp_directory_path() / ("cvm-proc-" + std::to_string(getpid()));
  fs::remove_all(proc);
  auto write = [&](const std::string& pid, const std::string& cmdline) {
    fs::create_directories(proc / pid);
    std::ofstream(proc / pid / "cmdline", std::ios::binary) << cmdline;
  };
  using namespace std::string_literals;
  write("100", "/usr/sbin/runc\0--root\0/run/a\0exec\0cvm-w\0sh\0"s);
  write("101", "runc\0--root\0/run/b\0exec\0cvm-w\0sh\0"s);      // another agent's root
  write("102", "runc\0--root\0/run/a\0run\0cvm-w\0"s);           // not an exec
  write("103", "/usr/bin/python3\0--root\0/run/a\0exec\0x\0"s);  // not runc
  write("self", "runc\0--root\0/run/a\0exec\0cvm-w\0"s);         // not a pid
  write("104", "runc\0--root\0/run/a\0exec\0cvm-v\0sleep\0"s);
  EXPECT_EQ(leftover_session_processes(proc.string(), "/run/a"), (std::vector<int>{100, 104}));
  fs::remove_all(proc);
}

TEST(SessionTree, EveryDescendantParentsFirstAndNothingElse) {
  const fs::path proc = fs::temp_directory_path() / ("cvm-tree-" + std::to_string(getpid()));
  fs::remove_all(proc);
  auto write = [&](int pid, const std::string& comm, int ppid) {
    fs::create_directories(proc / std::to_string(pid));
    std::ofstream(proc / std::to_string(pid) / "stat")
        << pid << " (" << comm << ") S " << ppid << " " << pid << " 0 0\n";
  };
  write(10, "runc", 1);               // the outer runc exec
  write(11, "runc", 10);              // the inner one
  write(12, "sh", 11);                // the session's process
  write(13, "sleep) S 1 (evil", 12);  // a comm with ") S 1 (" in it is still a child of 12
  write(14, "make", 11);              // an orphan the subreaper took
  write(20, "sshd", 1);               // not below the chain
  write(21, "bash", 20);
  fs::create_directories(proc / "self");  // not a pid
  auto below = process_descendants(proc.string(), 10);
  const auto at = [&](int pid) {
    return std::find(below.begin(), below.end(), pid) - below.begin();
  };
  ASSERT_EQ(below.size(), 4u);
  EXPECT_EQ(below.front(), 11);  // siblings come in /proc's order, parents always first
  EXPECT_LT(at(12), at(13));
  EXPECT_LT(at(11), at(14));
  EXPECT_NE(std::find(below.begin(), below.end(), 14), below.end());
  EXPECT_TRUE(process_descendants(proc.string(), 13).empty());
  EXPECT_TRUE(process_descendants(proc.string(), 99).empty());
  EXPECT_EQ(process_descendants(proc.string(), 20), (std::vector<int>{21}));
  fs::remove_all(proc);
}

TEST(SessionTree, AWalkEndsOnACycleAndNeverNamesTheRoot) {
  // Not a real /proc (a pid cannot be its own ancestor), but the walk must still end.
  const ProcessTree tree = {{1, 2}, {2, 3}, {3, 1}, {3, 4}, {4, 4}};
  EXPECT_EQ(descendants(tree, 1), (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(descendants(tree, 4), (std::vector<int>{}));
  EXPECT_TRUE(descendants({}, 1).empty());
}

}  // namespace
}  // namespace cvm::agent
