#pragma once
// Runs a host tool: argv, no shell, bounded by a timeout, output captured. The one place the agent
// spawns processes, so signal masks, inherited descriptors and stuck children are handled once.

#include <chrono>
#include <string>
#include <vector>

#include "cvm/base/result.h"

namespace cvm::agent {

struct ProcessOptions {
  std::chrono::milliseconds timeout{30000};
  // When set, stdout/stderr go to (are appended to) this file instead of being captured. Needed
  // when the tool leaves a process behind that inherits them (runc create): a captured pipe would
  // stay open as long as the container lives.
  std::string stdout_file;
  std::string stderr_file;
  // The tool's stdin is this file (empty: /dev/null). CNI plugins read their config there.
  std::string stdin_file;
  // NAME=VALUE entries added to (or replacing those of) the agent's environment.
  std::vector<std::string> env;
};

struct ProcessResult {
  int exit_code = -1;   // -1 when killed by a signal
  int term_signal = 0;  // the signal that ended it, 0 if it exited
  std::string out;
  std::string err;
  [[nodiscard]] bool success() const { return exit_code == 0; }
};

// Errors: kNotFound when the program does not exist, kSystem when it cannot be spawned, kTimeout
// when it ran past the timeout (it is then killed). A non-zero exit is a result, not an error.
[[nodiscard]] Result<ProcessResult> run_process(const std::vector<std::string>& argv,
                                                const ProcessOptions& options = {});

// Like run_process, but a non-zero exit becomes a kTool error whose message is the tool's own
// stderr (or stdout when stderr is empty), prefixed with the command.
[[nodiscard]] Result<ProcessResult> run_tool(const std::vector<std::string>& argv,
                                             const ProcessOptions& options = {});

// The human part of a tool's error output: logrus lines (time="..." level=error msg="...") are
// reduced to their msg, whitespace is trimmed.
[[nodiscard]] std::string tool_error_text(std::string_view output);

}  // namespace cvm::agent
