#include "cvm/agent/process.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "fixture_tree.h"

namespace cvm::agent {
namespace {

TEST(Process, CapturesStdoutStderrAndExitCode) {
  const auto r = run_process({"/bin/sh", "-c", "echo out; echo err >&2; exit 3"});
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->exit_code, 3);
  EXPECT_EQ(r->term_signal, 0);
  EXPECT_EQ(r->out, "out\n");
  EXPECT_EQ(r->err, "err\n");
  EXPECT_FALSE(r->success());
}

TEST(Process, NoShellInterpretation) {
  const auto r = run_process({"echo", "$HOME", "a;b"});  // looked up on PATH, passed verbatim
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "$HOME a;b\n");
}

TEST(Process, StdinIsDevNull) {
  const auto r = run_process({"cat"});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->success());
  EXPECT_EQ(r->out, "");
}

TEST(Process, LargeOutputDoesNotDeadlock) {
  const auto r =
      run_process({"/bin/sh", "-c", "head -c 1000000 /dev/zero; head -c 300000 /dev/zero >&2"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out.size(), 1000000u);
  EXPECT_EQ(r->err.size(), 300000u);
}

TEST(Process, MissingProgramIsNotFound) {
  const auto r = run_process({"/nonexistent/tool", "--version"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.error().is_not_found());
  EXPECT_FALSE(run_process({}).ok());
}

TEST(Process, TimeoutKillsTheChild) {
  ProcessOptions options;
  options.timeout = std::chrono::milliseconds(200);
  const auto start = std::chrono::steady_clock::now();
  const auto r = run_process({"/bin/sh", "-c", "echo partial >&2; exec sleep 30"}, options);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.error().is_timeout());
  EXPECT_NE(r.error().message.find("partial"), std::string::npos) << r.error().message;
}

TEST(Process, BackgroundGrandchildHoldingPipesDoesNotBlock) {
  ProcessOptions options;
  options.timeout = std::chrono::seconds(10);
  const auto start = std::chrono::steady_clock::now();
  const auto r = run_process({"/bin/sh", "-c", "sleep 5 & echo done"}, options);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "done\n");
}

TEST(Process, OutputToFileIsAppended) {
  testing::FixtureTree tree;
  const std::string log = tree.path("out.log");
  ProcessOptions options;
  options.stdout_file = log;
  options.stderr_file = log;
  ASSERT_TRUE(run_process({"/bin/sh", "-c", "echo one; echo two >&2"}, options).ok());
  ASSERT_TRUE(run_process({"/bin/sh", "-c", "echo three"}, options).ok());
  std::ifstream in(log);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), "one\ntwo\nthree\n");
}

TEST(Process, StdinFromFileAndEnvironmentOverrides) {
  testing::FixtureTree tree;
  const std::string in = tree.path("in.json");
  {
    std::ofstream f(in);
    f << "{\"cniVersion\":\"1.0.0\"}";
  }
  ::setenv("CVM_PROCESS_TEST_KEEP", "kept", 1);
  ::setenv("CVM_PROCESS_TEST_REPLACE", "old", 1);
  ProcessOptions options;
  options.stdin_file = in;
  options.env = {"CVM_PROCESS_TEST_REPLACE=new", "CVM_PROCESS_TEST_ADDED=added"};
  const auto r = run_process(
      {"/bin/sh", "-c",
       "cat; echo; echo $CVM_PROCESS_TEST_KEEP $CVM_PROCESS_TEST_REPLACE $CVM_PROCESS_TEST_ADDED; "
       "env | grep -c '^CVM_PROCESS_TEST_REPLACE='"},
      options);
  ::unsetenv("CVM_PROCESS_TEST_KEEP");
  ::unsetenv("CVM_PROCESS_TEST_REPLACE");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "{\"cniVersion\":\"1.0.0\"}\nkept new added\n1\n");
}

TEST(RunTool, NonZeroExitCarriesToolMessage) {
  const auto r = run_tool({"/bin/sh", "-c", "echo 'it broke: reason' >&2; exit 2"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().domain, ErrorDomain::kTool);
  EXPECT_EQ(r.error().code, 2);
  EXPECT_NE(r.error().message.find("it broke: reason"), std::string::npos) << r.error().message;
}

TEST(ToolErrorText, ReducesLogrusAndUmociLines) {
  EXPECT_EQ(tool_error_text("time=\"2024-01-01T00:00:00Z\" level=error msg=\"container does not "
                            "exist\"\n"),
            "container does not exist");
  EXPECT_EQ(tool_error_text("time=\"x\" level=fatal msg=\"a \\\"quoted\\\" word\"\n"),
            "a \"quoted\" word");
  EXPECT_EQ(tool_error_text("   \u2A2F tag is not found: nope   \n"), "tag is not found: nope");
  EXPECT_EQ(tool_error_text("line one\n\nline two\n"), "line one; line two");
  EXPECT_EQ(tool_error_text(""), "");
}

}  // namespace
}  // namespace cvm::agent
