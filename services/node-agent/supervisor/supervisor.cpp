// cvm-supervisor: PID 1 of a CVM's supervising container. Launches the inner container with the
// configured OCI runtime (sysbox-runc, or runc with a user namespace), reports the outcome to the
// agent through <run-dir>/status.json, reaps orphans as an init must, and on SIGTERM stops the
// inner container (TERM, grace, KILL) before it exits. When the inner container's init exits, so
// does the supervisor, and the agent sees the workspace stopped.
//
// Deliberately small and free of the agent's libraries: it runs inside the supervising container,
// whose rootfs holds only this binary, the runtime and their shared libraries.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct Options {
  std::string runtime = "runc";
  std::string root = "/run/cvm-runtime";
  std::string bundle = "/cvm/inner";
  std::string id = "inner";
  std::string run_dir = "/cvm/run";
  milliseconds grace{10000};
  milliseconds tool_timeout{60000};
  milliseconds bundle_wait{0};  // 0: the bundle is complete when the supervisor starts
};

class Supervisor {
 public:
  explicit Supervisor(Options o) : o_(std::move(o)) {}

  int run() {
    sigset_t mask;
    sigemptyset(&mask);
    for (int s : {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT}) sigaddset(&mask, s);
    // Blocked and read from a signalfd: PID 1 gets no default action for signals it does not
    // handle, and a handler could not wait for children without races.
    if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return fail("sigprocmask: " + errno_text());
    sfd_ = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd_ < 0) return fail("signalfd: " + errno_text());
    log_ = o_.run_dir + "/inner.log";
    const std::string pid_file = o_.root + "/" + o_.id + ".pid";

    if (auto waited = wait_for_bundle(); !waited.empty()) {
      if (stop_requested_) {
        write_status({{"state", "stopped"}});
        return 0;
      }
      return fail(waited);
    }
    // One `run --detach` rather than `create` then `start`: one runtime process fewer on the launch
    // path (each is a Go binary's start, several ms here). A stop requested meanwhile is handled
    // right after it, as it was between the two.
    auto ran = tool({"run", "--detach", "--bundle", o_.bundle, "--pid-file", pid_file, o_.id});
    if (!ran.empty()) {
      (void)tool({"delete", "--force", o_.id});  // a failed run may leave a created container
      return fail(ran);
    }
    inner_pid_ = read_pid(pid_file);
    if (inner_pid_ <= 0) {
      (void)tool({"delete", "--force", o_.id});
      return fail("runtime run left no pid in " + pid_file);
    }
    // The inner init is this process's child once the runtime exits; it may have exited (and been
    // reaped while the runtime was awaited) before its pid was known.
    if (auto it = exited_.find(inner_pid_); it != exited_.end()) inner_exit_ = it->second;
    if (stop_requested_) return stop();
    write_status({{"state", "running"}, {"pid", inner_pid_}});
    release_bundle_watch();

    for (;;) {
      if (inner_exit_) break;
      if (stop_requested_) return stop();
      wait_signal(std::nullopt);
    }
    // The inner init exited on its own: the workspace stopped (the user shut it down).
    (void)tool({"delete", "--force", o_.id});
    const int code = *inner_exit_;
    write_status({{"state", "exited"}, {"code", code}});
    return code;
  }

 private:
  static std::string errno_text() { return std::strerror(errno); }

  int fail(const std::string& message) {
    write_status({{"state", "failed"}, {"message", message}});
    std::cerr << "cvm-supervisor: " << message << "\n";
    return 1;
  }

  // Closing an inotify instance that had a watch waits for the kernel's fsnotify SRCU grace
  // period (8-20 ms measured on this project's hosts): done once the report is written, not
  // between the bundle's arrival and the inner runtime.
  void release_bundle_watch() {
    if (bundle_watch_ >= 0) ::close(bundle_watch_);
    bundle_watch_ = -1;
  }

  // The agent starts the supervising container while it still unpacks the image (Caching off) and
  // renames the inner config.json into place last: wait for it (inotify, no polling), or for a
  // stop request. Returns "" once it is there.
  std::string wait_for_bundle() {
    const std::string config = o_.bundle + "/config.json";
    if (o_.bundle_wait.count() <= 0 || ::access(config.c_str(), F_OK) == 0) return {};
    const int watch = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    if (watch < 0) return "inotify_init1: " + errno_text();
    bundle_watch_ = watch;
    if (::inotify_add_watch(watch, o_.bundle.c_str(), IN_MOVED_TO | IN_CREATE) < 0) {
      return "inotify_add_watch " + o_.bundle + ": " + errno_text();
    }
    const auto deadline = Clock::now() + o_.bundle_wait;
    std::string why;
    while (::access(config.c_str(), F_OK) != 0) {
      if (stop_requested_) {
        why = "stopped before the inner bundle was ready";
        break;
      }
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) {
        why = "the inner bundle was not ready within " + std::to_string(o_.bundle_wait.count()) +
              " ms";
        break;
      }
      pollfd fds[2] = {{watch, POLLIN, 0}, {sfd_, POLLIN, 0}};
      if (::poll(fds, 2, static_cast<int>(left)) > 0 && (fds[1].revents & POLLIN)) {
        wait_signal(Clock::now());  // handles SIGTERM (stop_requested_) and reaps
      }
      char buf[4096];
      while (::read(watch, buf, sizeof buf) > 0) {
      }
    }
    return why;
  }

  int stop() {
    write_status({{"state", "stopping"}, {"pid", inner_pid_}});
    (void)tool({"kill", o_.id, "TERM"});
    const auto deadline = Clock::now() + o_.grace;
    while (!inner_exit_ && Clock::now() < deadline) wait_signal(deadline);
    if (!inner_exit_) {
      (void)tool({"kill", o_.id, "KILL"});
      const auto kill_deadline = Clock::now() + std::chrono::seconds(5);
      while (!inner_exit_ && Clock::now() < kill_deadline) wait_signal(kill_deadline);
    }
    (void)tool({"delete", "--force", o_.id});
    write_status({{"state", "stopped"}});
    return 0;
  }

  // Waits for one batch of signals (or the deadline) and handles it: reaps every exited child,
  // notes the inner init's exit and stop requests.
  void wait_signal(std::optional<Clock::time_point> deadline) {
    int timeout = -1;
    if (deadline) {
      const auto left = std::chrono::duration_cast<milliseconds>(*deadline - Clock::now()).count();
      timeout = static_cast<int>(std::max<int64_t>(0, left));
    }
    pollfd fd{sfd_, POLLIN, 0};
    const int ready = ::poll(&fd, 1, timeout);
    if (ready <= 0) return;
    signalfd_siginfo info{};
    while (::read(sfd_, &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
      if (info.ssi_signo == SIGCHLD) {
        reap();
      } else {
        stop_requested_ = true;
      }
      pollfd again{sfd_, POLLIN, 0};
      if (::poll(&again, 1, 0) <= 0) break;
    }
    reap();  // SIGCHLDs coalesce: always collect everything that exited
  }

  void reap() {
    for (;;) {
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid <= 0) return;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      exited_[pid] = code;
      if (pid == inner_pid_) inner_exit_ = code;
    }
  }

  // Runs the runtime with `args`; its output goes to the inner log (runc create leaves the inner
  // init holding its stdio). Returns "" on success, else the runtime's own error message.
  std::string tool(std::vector<std::string> args) {
    std::vector<std::string> argv = {o_.runtime, "--root", o_.root};
    argv.insert(argv.end(), args.begin(), args.end());
    const auto offset = file_size(log_);
    const pid_t pid = ::fork();
    if (pid < 0) return "fork: " + errno_text();
    if (pid == 0) {
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      const int in = ::open("/dev/null", O_RDONLY);
      const int out = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (in < 0 || out < 0) _exit(126);
      ::dup2(in, 0);
      ::dup2(out, 1);
      ::dup2(out, 2);
      std::vector<char*> cargv;
      for (auto& a : argv) cargv.push_back(a.data());
      cargv.push_back(nullptr);
      ::execv(cargv[0], cargv.data());
      _exit(127);
    }
    const auto deadline = Clock::now() + o_.tool_timeout;
    while (!exited_.contains(pid)) {
      if (Clock::now() >= deadline) {
        ::kill(pid, SIGKILL);
        while (!exited_.contains(pid)) wait_signal(Clock::now() + milliseconds(100));
        exited_.erase(pid);
        return argv[0] + " " + args[0] + ": timed out";
      }
      wait_signal(deadline);
    }
    const int code = exited_[pid];
    exited_.erase(pid);
    if (code == 0) return {};
    std::string why = error_text(read_from(log_, offset));
    if (code == 127 && why.empty()) why = "cannot execute " + argv[0];
    return argv[0] + " " + args[0] + ": exit " + std::to_string(code) +
           (why.empty() ? "" : ": " + why);
  }

  // logrus lines (level=error msg="...") reduce to their msg; else the trimmed text.
  static std::string error_text(const std::string& text) {
    std::string last;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      const auto at = line.find("msg=\"");
      if (at == std::string::npos) continue;
      std::string msg;
      for (size_t i = at + 5; i < line.size() && line[i] != '"'; ++i) {
        if (line[i] == '\\' && i + 1 < line.size()) ++i;
        msg += line[i];
      }
      last = msg;
    }
    if (!last.empty()) return last;
    size_t b = text.find_first_not_of(" \t\r\n");
    size_t e = text.find_last_not_of(" \t\r\n");
    return b == std::string::npos ? std::string() : text.substr(b, e - b + 1);
  }

  static std::streamoff file_size(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    return in ? static_cast<std::streamoff>(in.tellg()) : 0;
  }
  static std::string read_from(const std::string& path, std::streamoff offset) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    in.seekg(offset);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  static int read_pid(const std::string& path) {
    std::ifstream in(path);
    int pid = 0;
    in >> pid;
    return pid;
  }

  // Write-then-rename: the agent never reads half a status.
  void write_status(const nlohmann::json& status) {
    const std::string path = o_.run_dir + "/status.json";
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << status.dump() << "\n";
    }
    std::rename(tmp.c_str(), path.c_str());
  }

  Options o_;
  int sfd_ = -1;
  int bundle_watch_ = -1;  // wait_for_bundle's inotify instance, until release_bundle_watch()
  std::string log_;
  pid_t inner_pid_ = -1;
  std::optional<int> inner_exit_;
  bool stop_requested_ = false;
  std::map<pid_t, int> exited_;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const auto usage = [] {
    std::cerr << "usage: cvm-supervisor --runtime PATH --root DIR --bundle DIR --id ID "
                 "--run-dir DIR [--grace-ms N] [--bundle-wait-ms N]\n";
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return usage();
    const std::string value = argv[++i];
    if (flag == "--runtime") {
      o.runtime = value;
    } else if (flag == "--root") {
      o.root = value;
    } else if (flag == "--bundle") {
      o.bundle = value;
    } else if (flag == "--id") {
      o.id = value;
    } else if (flag == "--run-dir") {
      o.run_dir = value;
    } else if (flag == "--bundle-wait-ms") {
      try {
        o.bundle_wait = milliseconds(std::stoll(value));
      } catch (const std::exception&) {
        return usage();
      }
    } else if (flag == "--grace-ms") {
      try {
        o.grace = milliseconds(std::stoll(value));
      } catch (const std::exception&) {
        return usage();
      }
    } else {
      return usage();
    }
  }
  return Supervisor(std::move(o)).run();
}
