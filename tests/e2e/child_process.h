#pragma once
// A service binary started by a test: its output goes to a log file, it dies with the test
// (PR_SET_PDEATHSIG) and is stopped (SIGTERM, then SIGKILL) when the object goes away.

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace cvm::test {

class ChildProcess {
 public:
  ChildProcess(std::vector<std::string> argv, std::string log_path);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  [[nodiscard]] bool running();
  // SIGTERM, up to `grace`, then SIGKILL. Returns the exit status as waitpid gives it.
  int stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
  void kill9();
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] const std::string& log_path() const { return log_; }
  [[nodiscard]] std::string log_tail(size_t bytes = 4000) const;

 private:
  std::vector<std::string> argv_;
  std::string log_;
  pid_t pid_ = -1;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
// Runs a command to completion (bounded by timeout) and captures its output.
CommandResult run_command(const std::vector<std::string>& argv,
                          std::chrono::milliseconds timeout = std::chrono::seconds(120));

}  // namespace cvm::test
