#include "cvm/agent/runtime.h"

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cvm/agent/process.h"
#include "file_util.h"

namespace cvm::agent {
namespace {

using nlohmann::json;

std::string signal_name(int signal) {
  switch (signal) {
    case SIGTERM:
      return "TERM";
    case SIGKILL:
      return "KILL";
    case SIGINT:
      return "INT";
    case SIGHUP:
      return "HUP";
    case SIGQUIT:
      return "QUIT";
    case SIGUSR1:
      return "USR1";
    case SIGUSR2:
      return "USR2";
    default:
      return std::to_string(signal);
  }
}

// runc reports an unknown container as "container does not exist" (state, kill, delete) or
// "container <id> does not exist"; both become kNotFound so callers need not parse text.
Error classify(Error error) {
  if (error.domain == ErrorDomain::kTool &&
      error.message.find("does not exist") != std::string::npos) {
    error.domain = ErrorDomain::kNotFound;
  }
  return error;
}

ContainerState state_from_json(const json& j) {
  ContainerState s;
  s.id = j.value("id", "");
  s.status = parse_container_status(j.value("status", ""));
  s.pid = j.value("pid", 0);
  s.bundle = j.value("bundle", "");
  return s;
}

uint64_t file_size(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  return in ? static_cast<uint64_t>(in.tellg()) : 0;
}

std::string read_from(const std::string& path, uint64_t offset) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  in.seekg(static_cast<std::streamoff>(offset));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

ContainerStatus parse_container_status(std::string_view text) {
  if (text == "creating") return ContainerStatus::kCreating;
  if (text == "created") return ContainerStatus::kCreated;
  if (text == "running") return ContainerStatus::kRunning;
  if (text == "paused") return ContainerStatus::kPaused;
  if (text == "stopped") return ContainerStatus::kStopped;
  return ContainerStatus::kUnknown;
}

std::string_view to_string(ContainerStatus status) {
  switch (status) {
    case ContainerStatus::kCreating:
      return "creating";
    case ContainerStatus::kCreated:
      return "created";
    case ContainerStatus::kRunning:
      return "running";
    case ContainerStatus::kPaused:
      return "paused";
    case ContainerStatus::kStopped:
      return "stopped";
    case ContainerStatus::kUnknown:
      break;
  }
  return "unknown";
}

std::vector<std::string> RuncRuntime::command(std::initializer_list<std::string> args) const {
  std::vector<std::string> argv = {options_.binary};
  if (!options_.root.empty()) {
    argv.emplace_back("--root");
    argv.push_back(options_.root);
  }
  argv.insert(argv.end(), args);
  return argv;
}

Status RuncRuntime::run_logged(std::initializer_list<std::string> args, const std::string& what,
                               const std::string& id, const std::string& log,
                               bool delete_on_failure) {
  // The container's init inherits runc's stdout/stderr and outlives runc: they must be a file,
  // never our capture pipes. runc's own error lands there too, so it is read back from the file.
  const uint64_t offset = file_size(log);
  ProcessOptions options;
  options.timeout = options_.timeout;
  options.stdout_file = log;
  options.stderr_file = log;
  auto result = run_process(command(args), options);
  if (!result) return result.error();
  if (result->success()) return {};
  // runc run destroys what it made on failure; a forced delete covers a half-made leftover.
  if (delete_on_failure) (void)remove(id, true);
  const std::string why = tool_error_text(read_from(log, offset));
  return make_error(ErrorDomain::kTool,
                    "runc " + what + " " + id + ": exit " + std::to_string(result->exit_code) +
                        (why.empty() ? "" : ": " + why),
                    result->exit_code);
}

std::string RuncRuntime::log_path(const std::string& bundle, const std::string& log_file) {
  return log_file.empty() ? detail::join_path(bundle, "container.log") : log_file;
}

Status RuncRuntime::create(const std::string& id, const std::string& bundle,
                           const std::string& log_file) {
  return run_logged({"create", "--bundle", bundle, id}, "create", id, log_path(bundle, log_file),
                    false);
}

Status RuncRuntime::start(const std::string& id) {
  ProcessOptions options;
  options.timeout = options_.timeout;
  auto result = run_tool(command({"start", id}), options);
  if (!result) return classify(result.error());
  return {};
}

Result<int> OciRuntime::run_detached_pid(const std::string& id, const std::string& bundle,
                                         const std::string& log_file) {
  if (auto st = run_detached(id, bundle, log_file); !st) return st.error();
  auto s = state(id);
  if (!s) return s.error();
  return s->pid;
}

bool RuncRuntime::maybe_exists(const std::string& id) {
  // runc keeps one directory per container under its root (/run/runc by default).
  const std::string root = options_.root.empty() ? "/run/runc" : options_.root;
  struct stat st {};
  return ::stat(detail::join_path(root, id).c_str(), &st) == 0 || errno != ENOENT;
}

Result<int> RuncRuntime::run_detached_pid(const std::string& id, const std::string& bundle,
                                          const std::string& log_file) {
  const std::string log = log_path(bundle, log_file);
  const std::string pid_file = log + ".pid";
  if (auto st = run_logged({"run", "--detach", "--pid-file", pid_file, "--bundle", bundle, id},
                           "run", id, log, true);
      !st) {
    return st.error();
  }
  int pid = 0;
  std::ifstream(pid_file) >> pid;
  ::unlink(pid_file.c_str());
  if (pid <= 0)
    return make_error(ErrorDomain::kTool, "runc run " + id + " left no pid in " + pid_file);
  return pid;
}

Status RuncRuntime::run_detached(const std::string& id, const std::string& bundle,
                                 const std::string& log_file) {
  // One `runc run --detach` instead of create + start: one runtime process fewer on the launch
  // path.
  return run_logged({"run", "--detach", "--bundle", bundle, id}, "run", id,
                    log_path(bundle, log_file), true);
}

Result<ContainerState> RuncRuntime::state(const std::string& id) {
  ProcessOptions options;
  options.timeout = options_.timeout;
  auto result = run_tool(command({"state", id}), options);
  if (!result) return classify(result.error());
  try {
    return state_from_json(json::parse(result->out));
  } catch (const json::exception& e) {
    return make_error(ErrorDomain::kTool, "runc state " + id + ": unparseable output: " + e.what());
  }
}

Status RuncRuntime::kill(const std::string& id, int signal) {
  ProcessOptions options;
  options.timeout = options_.timeout;
  auto result = run_tool(command({"kill", id, signal_name(signal)}), options);
  if (!result) return classify(result.error());
  return {};
}

Status RuncRuntime::remove(const std::string& id, bool force) {
  ProcessOptions options;
  options.timeout = options_.timeout;
  auto result = force ? run_tool(command({"delete", "--force", id}), options)
                      : run_tool(command({"delete", id}), options);
  if (!result) return classify(result.error());
  return {};
}

Result<std::vector<ContainerState>> RuncRuntime::list() {
  ProcessOptions options;
  options.timeout = options_.timeout;
  auto result = run_tool(command({"list", "--format", "json"}), options);
  if (!result) return result.error();
  std::vector<ContainerState> out;
  try {
    // An empty state directory lists as JSON `null`, not `[]`.
    const json j = json::parse(result->out);
    if (j.is_null()) return out;
    if (!j.is_array()) return make_error(ErrorDomain::kTool, "runc list: not a JSON array");
    for (const auto& entry : j) out.push_back(state_from_json(entry));
  } catch (const json::exception& e) {
    return make_error(ErrorDomain::kTool,
                      std::string("runc list: unparseable output: ") + e.what());
  }
  return out;
}

bool wait_for_process_exit(int pid, std::chrono::milliseconds timeout) {
  if (pid <= 0) return true;
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd >= 0) {
    // Readable once the process has exited (zombies included): no polling loop.
    pollfd fd{pidfd, POLLIN, 0};
    int ready = -1;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    do {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now())
                            .count();
      ready = ::poll(&fd, 1, static_cast<int>(std::max<int64_t>(0, left)));
    } while (ready < 0 && errno == EINTR);
    ::close(pidfd);
    return ready > 0;
  }
  if (errno == ESRCH) return true;
  // Kernels before 5.3 have no pidfd_open.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (::kill(pid, 0) == 0 || errno != ESRCH) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

Status stop_container(OciRuntime& runtime, const std::string& id, std::chrono::milliseconds grace,
                      std::chrono::milliseconds kill_wait) {
  auto state = runtime.state(id);
  if (!state) return state.error();
  if (state->status == ContainerStatus::kStopped) return {};
  const int pid = state->pid;

  // The container may stop on its own between state and kill; that is success, not an error.
  const auto still_there = [&](const Status& st) {
    if (st) return true;
    auto now = runtime.state(id);
    return !(now && now->status == ContainerStatus::kStopped);
  };

  if (auto st = runtime.kill(id, SIGTERM); !st && still_there(st)) return st;
  if (wait_for_process_exit(pid, grace)) return {};
  if (auto st = runtime.kill(id, SIGKILL); !st && still_there(st)) return st;
  if (wait_for_process_exit(pid, kill_wait)) return {};
  return make_error(ErrorDomain::kTimeout, "container " + id + " (pid " + std::to_string(pid) +
                                               ") still running after SIGKILL");
}

}  // namespace cvm::agent
