#include "cvm/agent/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "file_util.h"

extern char** environ;

namespace cvm::agent {
namespace {

using Steady = std::chrono::steady_clock;

using detail::Fd;

class SpawnActions {
 public:
  SpawnActions() { ::posix_spawn_file_actions_init(&actions_); }
  ~SpawnActions() { ::posix_spawn_file_actions_destroy(&actions_); }
  SpawnActions(const SpawnActions&) = delete;
  SpawnActions& operator=(const SpawnActions&) = delete;
  posix_spawn_file_actions_t* get() { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_{};
};

class SpawnAttr {
 public:
  SpawnAttr() { ::posix_spawnattr_init(&attr_); }
  ~SpawnAttr() { ::posix_spawnattr_destroy(&attr_); }
  SpawnAttr(const SpawnAttr&) = delete;
  SpawnAttr& operator=(const SpawnAttr&) = delete;
  posix_spawnattr_t* get() { return &attr_; }

 private:
  posix_spawnattr_t attr_{};
};

Error sys_error(const std::string& what, int err) {
  return make_error(ErrorDomain::kSystem, what + ": " + std::strerror(err), err);
}

std::string describe(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out.push_back(' ');
    out += a;
  }
  return out;
}

// Reads what is available without blocking; returns false at EOF or on error.
bool drain(int fd, std::string& into) {
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      into.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    return false;
  }
}

int pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

}  // namespace

Result<ProcessResult> run_process(const std::vector<std::string>& argv,
                                  const ProcessOptions& options) {
  if (argv.empty() || argv.front().empty()) {
    return make_error(ErrorDomain::kInvalid, "run_process: empty argv");
  }

  // Pipes are O_CLOEXEC in this process; dup2 onto 1/2 in the child clears the flag there only.
  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  Fd out_read, out_write, err_read, err_write;
  if (options.stdout_file.empty()) {
    if (::pipe2(out_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return sys_error("pipe", errno);
    out_read = Fd(out_pipe[0]);
    out_write = Fd(out_pipe[1]);
  }
  if (options.stderr_file.empty()) {
    if (::pipe2(err_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return sys_error("pipe", errno);
    err_read = Fd(err_pipe[0]);
    err_write = Fd(err_pipe[1]);
  }
  // The write ends must block in the child: O_NONBLOCK lives on the open file description, so
  // clear it there and keep it only on the read ends.
  for (const Fd* fd : {&out_write, &err_write}) {
    if (fd->get() >= 0) ::fcntl(fd->get(), F_SETFL, 0);
  }

  SpawnActions actions;
  ::posix_spawn_file_actions_addopen(
      actions.get(), 0, options.stdin_file.empty() ? "/dev/null" : options.stdin_file.c_str(),
      O_RDONLY, 0);
  constexpr int kFileFlags = O_WRONLY | O_CREAT | O_APPEND;
  if (out_write.get() >= 0) {
    ::posix_spawn_file_actions_adddup2(actions.get(), out_write.get(), 1);
  } else {
    ::posix_spawn_file_actions_addopen(actions.get(), 1, options.stdout_file.c_str(), kFileFlags,
                                       0640);
  }
  if (err_write.get() >= 0) {
    ::posix_spawn_file_actions_adddup2(actions.get(), err_write.get(), 2);
  } else if (options.stderr_file == options.stdout_file) {
    ::posix_spawn_file_actions_adddup2(actions.get(), 1, 2);
  } else {
    ::posix_spawn_file_actions_addopen(actions.get(), 2, options.stderr_file.c_str(), kFileFlags,
                                       0640);
  }
  // Descriptors other threads opened without O_CLOEXEC must not leak into tools (and from there
  // into containers runc leaves behind).
  ::posix_spawn_file_actions_addclosefrom_np(actions.get(), 3);

  SpawnAttr attr;
  sigset_t empty_mask;
  sigset_t default_signals;
  sigemptyset(&empty_mask);
  sigfillset(&default_signals);
  // The agent may block signals in its threads (Asio signal_set); tools start with a clean slate.
  ::posix_spawnattr_setsigmask(attr.get(), &empty_mask);
  ::posix_spawnattr_setsigdefault(attr.get(), &default_signals);
  ::posix_spawnattr_setflags(attr.get(), POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<char*> cargv;
  cargv.reserve(argv.size() + 1);
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);

  std::vector<std::string> env_storage;
  std::vector<char*> cenv;
  char** envp = environ;
  if (!options.env.empty()) {
    const auto name_of = [](std::string_view kv) { return kv.substr(0, kv.find('=')); };
    for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
      const std::string_view kv(*e);
      const bool replaced =
          std::any_of(options.env.begin(), options.env.end(),
                      [&](const std::string& o) { return name_of(o) == name_of(kv); });
      if (!replaced) env_storage.emplace_back(kv);
    }
    env_storage.insert(env_storage.end(), options.env.begin(), options.env.end());
    for (auto& kv : env_storage) cenv.push_back(kv.data());
    cenv.push_back(nullptr);
    envp = cenv.data();
  }

  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, cargv[0], actions.get(), attr.get(), cargv.data(), envp);
  if (rc != 0) {
    if (rc == ENOENT) {
      return make_error(ErrorDomain::kNotFound, argv.front() + ": not found", rc);
    }
    return sys_error("spawn " + argv.front(), rc);
  }
  out_write.reset();
  err_write.reset();

  ProcessResult result;
  Fd pidfd(pidfd_open(pid));
  const auto deadline = Steady::now() + options.timeout;
  bool exited = false;
  bool timed_out = false;
  // With a pidfd the loop wakes on exit; without one (pre-5.3 kernels) it rechecks every 50 ms.
  while (!exited) {
    pollfd fds[3];
    nfds_t n = 0;
    if (out_read.get() >= 0) fds[n++] = {out_read.get(), POLLIN, 0};
    if (err_read.get() >= 0) fds[n++] = {err_read.get(), POLLIN, 0};
    if (pidfd.get() >= 0) fds[n++] = {pidfd.get(), POLLIN, 0};
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    const int wait_ms =
        pidfd.get() >= 0 ? static_cast<int>(left) : static_cast<int>(std::min<int64_t>(left, 50));
    const int ready = ::poll(fds, n, wait_ms);
    if (ready < 0 && errno != EINTR) return sys_error("poll", errno);
    if (out_read.get() >= 0 && !drain(out_read.get(), result.out)) out_read.reset();
    if (err_read.get() >= 0 && !drain(err_read.get(), result.err)) err_read.reset();
    int status = 0;
    const pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) {
      exited = true;
      if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) result.term_signal = WTERMSIG(status);
    } else if (w < 0 && errno != EINTR) {
      return sys_error("waitpid", errno);
    }
  }

  if (timed_out) {
    ::kill(pid, SIGKILL);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    std::string partial = detail::trim(result.err).empty() ? result.out : result.err;
    return make_error(ErrorDomain::kTimeout,
                      describe(argv) + ": timed out after " +
                          std::to_string(options.timeout.count()) + " ms" +
                          (partial.empty() ? "" : ": " + tool_error_text(partial)));
  }
  // Output the child wrote before exiting is in the pipes now. A grandchild may still hold them
  // open; what it writes later is not ours to wait for.
  if (out_read.get() >= 0) drain(out_read.get(), result.out);
  if (err_read.get() >= 0) drain(err_read.get(), result.err);
  return result;
}

Result<ProcessResult> run_tool(const std::vector<std::string>& argv,
                               const ProcessOptions& options) {
  auto result = run_process(argv, options);
  if (!result || result->success()) return result;
  const std::string& text = detail::trim(result->err).empty() ? result->out : result->err;
  std::string message = describe(argv) + ": ";
  if (result->term_signal != 0) {
    message += "killed by signal " + std::to_string(result->term_signal);
  } else {
    message += "exit " + std::to_string(result->exit_code);
  }
  const std::string why = tool_error_text(text);
  if (!why.empty()) message += ": " + why;
  return make_error(ErrorDomain::kTool, std::move(message), result->exit_code);
}

std::string tool_error_text(std::string_view output) {
  std::string out;
  for (std::string_view line : detail::trimmed_lines(output)) {
    // umoci marks its errors with a cross: "   ⨯ tag is not found: x".
    constexpr std::string_view kCross = "\u2A2F";
    if (line.substr(0, kCross.size()) == kCross) line = detail::trim(line.substr(kCross.size()));
    if (line.empty()) continue;
    // logrus text format: time="..." level=error msg="the message"
    const size_t msg = line.find(" msg=\"");
    if (line.rfind("time=\"", 0) == 0 && msg != std::string_view::npos) {
      std::string_view rest = line.substr(msg + 6);
      std::string text;
      for (size_t i = 0; i < rest.size(); ++i) {
        if (rest[i] == '\\' && i + 1 < rest.size()) {
          text.push_back(rest[++i]);
        } else if (rest[i] == '"') {
          break;
        } else {
          text.push_back(rest[i]);
        }
      }
      line = {};
      if (!out.empty()) out += "; ";
      out += text;
      continue;
    }
    if (!out.empty()) out += "; ";
    out += line;
  }
  return out;
}

}  // namespace cvm::agent
