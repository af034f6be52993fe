#include "cvm/agent/seccomp.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "cvm/agent/launcher.h"
#include "cvm/agent/oci_spec.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

// The action (and errno) a filter gives `name`: the one rule without arguments that names it, else
// the default.
std::string verdict(const json& filter, const std::string& name) {
  for (const auto& rule : filter["syscalls"]) {
    if (rule.contains("args")) continue;
    for (const auto& n : rule["names"]) {
      if (n == name) {
        std::string out = rule["action"].get<std::string>();
        if (rule.contains("errnoRet")) out += " " + std::to_string(rule["errnoRet"].get<int>());
        return out;
      }
    }
  }
  return "default " + filter["defaultAction"].get<std::string>() + " " +
         std::to_string(filter.value("defaultErrnoRet", 0));
}

bool has_comment(const json& j) {
  if (j.is_object()) {
    if (j.contains("comment")) return true;
    for (const auto& [k, v] : j.items()) {
      (void)k;
      if (has_comment(v)) return true;
    }
  }
  if (j.is_array()) {
    for (const auto& v : j) {
      if (has_comment(v)) return true;
    }
  }
  return false;
}

TEST(SeccompProfile, TheBuiltInOneDeniesWhatAWorkspaceNeverNeedsAndKeepsAMachineWorking) {
  auto filter = parse_seccomp_profile(default_seccomp_profile());
  ASSERT_TRUE(filter.ok()) << filter.error().message;
  EXPECT_FALSE(has_comment(*filter)) << "comments are for people, not for the runtime";
  EXPECT_EQ((*filter)["defaultAction"], "SCMP_ACT_ERRNO");
  EXPECT_EQ((*filter)["defaultErrnoRet"], 1);
  for (const char* denied :
       {"bpf", "perf_event_open", "kexec_load", "kexec_file_load", "open_by_handle_at",
        "userfaultfd", "init_module", "finit_module", "delete_module", "io_uring_setup",
        "io_uring_enter", "iopl", "swapon", "settimeofday", "clock_settime", "syslog", "acct"}) {
    EXPECT_EQ(verdict(*filter, denied), "SCMP_ACT_ERRNO 1") << denied;
  }
  // Keyrings: ENOSYS, which runc (the workspace's own Docker) and systemd take as "no keyrings".
  for (const char* keyring : {"keyctl", "add_key", "request_key"}) {
    EXPECT_EQ(verdict(*filter, keyring), "SCMP_ACT_ERRNO 38") << keyring;
  }
  // systemd, dockerd and nested containers, FUSE, debuggers, poweroff, 32-bit programs.
  for (const char* allowed : {"mount",       "umount2",
                              "pivot_root",  "fsopen",
                              "move_mount",  "open_tree",
                              "unshare",     "setns",
                              "clone",       "clone3",
                              "sethostname", "reboot",
                              "ptrace",      "name_to_handle_at",
                              "seccomp",     "read",
                              "execve",      "socket",
                              "io_submit",   "socketcall",
                              "mmap2",       "chroot",
                              "setuid"}) {
    EXPECT_EQ(verdict(*filter, allowed), "SCMP_ACT_ALLOW") << allowed;
  }
  EXPECT_EQ(verdict(*filter, "not_a_syscall"), "default SCMP_ACT_ERRNO 1");
}

TEST(SeccompProfile, TheDataFileIsTheCompiledInOne) {
  std::ifstream in(CVM_SECCOMP_PROFILE_FILE);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(text.empty()) << CVM_SECCOMP_PROFILE_FILE;
  EXPECT_EQ(text, default_seccomp_profile());
}

TEST(SeccompProfile, EachMistakeIsNamed) {
  const auto error = [](const std::string& text) {
    auto r = parse_seccomp_profile(text);
    return r.ok() ? std::string("accepted") : r.error().message;
  };
  const std::string rule = R"("names": ["read"], "action": "SCMP_ACT_ALLOW")";
  const auto with_rule = [](const std::string& body) {
    return R"({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{)" + body + "}]}";
  };
  EXPECT_EQ(error(with_rule(rule)), "accepted");
  EXPECT_NE(error("{").find("not JSON"), std::string::npos);
  EXPECT_NE(error("[]").find("not a JSON object"), std::string::npos);
  EXPECT_NE(error(R"({"syscalls": []})").find("no \"defaultAction\""), std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "defaultAktion": 1})")
                .find("unknown key \"defaultAktion\""),
            std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_NOTIFY"})").find("listener"), std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_MAYBE"})").find("unknown action"),
            std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 0})").find("1..4095"),
            std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_Z80"]})")
                .find("unknown architecture \"SCMP_ARCH_Z80\""),
            std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "flags": ["FAST"]})").find("unknown flag"),
            std::string::npos);
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {}})").find("a list"),
            std::string::npos);
  EXPECT_NE(error(with_rule(R"("names": [], "action": "SCMP_ACT_ALLOW")")).find("non-empty"),
            std::string::npos);
  EXPECT_NE(error(with_rule(R"("names": ["Read"], "action": "SCMP_ACT_ALLOW")"))
                .find("\"Read\" is not a system call name"),
            std::string::npos);
  EXPECT_NE(error(with_rule(R"("names": ["read"])")).find("syscalls[0]: no \"action\""),
            std::string::npos);
  EXPECT_NE(error(with_rule(rule + R"(, "errnoRet": 5000)")).find("1..4095"), std::string::npos);
  EXPECT_NE(error(with_rule(rule + R"(, "why": "x")")).find("unknown key \"why\""),
            std::string::npos);
  EXPECT_NE(error(with_rule(rule + R"(, "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}])"))
                .find("0..5"),
            std::string::npos);
  EXPECT_NE(error(with_rule(rule + R"(, "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}])"))
                .find("unsigned"),
            std::string::npos);
  EXPECT_NE(error(with_rule(rule + R"(, "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_IS"}])"))
                .find("unknown argument operator"),
            std::string::npos);
  // One call with two actions: libseccomp would refuse the second; say which rules.
  EXPECT_NE(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
      {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
      {"names": ["write"], "action": "SCMP_ACT_ERRNO"}]})")
                .find("write is in syscalls[0] and syscalls[1]"),
            std::string::npos);
  // ... unless one of them only matches some arguments.
  EXPECT_EQ(error(R"({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
      {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
       "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
      {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
       "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}]})"),
            "accepted");
}

TEST(SeccompProfile, TheSettingPicksBuiltInUnconfinedOrAFile) {
  auto built_in = workspace_seccomp("");
  ASSERT_TRUE(built_in.ok()) << built_in.error().message;
  ASSERT_TRUE(built_in->has_value());
  EXPECT_EQ((**built_in)["defaultAction"], "SCMP_ACT_ERRNO");
  auto none = workspace_seccomp(std::string(kUnconfined));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  const auto dir =
      std::filesystem::temp_directory_path() / ("cvm-seccomp-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string good = (dir / "good.json").string();
  const std::string bad = (dir / "bad.json").string();
  std::ofstream(good) << R"({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
      {"comment": "no keyrings", "names": ["keyctl"], "action": "SCMP_ACT_ERRNO"}]})";
  std::ofstream(bad)
      << R"({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["keyctl"]}]})";
  auto from_file = workspace_seccomp(good);
  ASSERT_TRUE(from_file.ok()) << from_file.error().message;
  EXPECT_EQ((**from_file)["syscalls"][0],
            json({{"names", {"keyctl"}}, {"action", "SCMP_ACT_ERRNO"}}));
  auto broken = workspace_seccomp(bad);
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.error().message.find(bad + ": seccomp profile: syscalls[0]: no \"action\""),
            std::string::npos)
      << broken.error().message;
  auto missing = workspace_seccomp((dir / "nope.json").string());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("nope.json: cannot read it"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(SeccompProfile, TheSpecCarriesTheFilterOnlyWhenThereIsOne) {
  SpecInput in;
  in.ids = IdRange{165536, 65536};
  EXPECT_FALSE(build_runtime_spec(in)["linux"].contains("seccomp"));
  in.seccomp = json{{"defaultAction", "SCMP_ACT_ALLOW"}, {"syscalls", json::array()}};
  EXPECT_EQ(build_runtime_spec(in)["linux"]["seccomp"], *in.seccomp);
}

}  // namespace
}  // namespace cvm::agent
