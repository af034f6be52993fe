// cvm-supervisor: PID 1 of a CVM's supervising container. Launches the inner container with the
// configured OCI runtime (sysbox-runc, or runc with a user namespace), reports the outcome to the
// agent through <run-dir>/status.json, reaps orphans as an init must, and on SIGTERM stops the
// inner container (its stop signal, grace, KILL) before it exits. When the inner container's init
// exits, so does the supervisor, and the agent sees the workspace stopped.
//
// Between the runtime's `create` and `start` it hands the inner container's cgroup to the inner
// root (cgroup_delegation.h): systemd as PID 1 must own its cgroup to boot. When the inner spec
// asks for a terminal, the pseudo-terminal's master comes over a console socket and everything the
// inner init writes to /dev/console is copied to a size-capped, rotated console log.
//
// Deliberately small and free of the agent's libraries: it runs inside the supervising container,
// whose rootfs holds only this binary, the runtime and their shared libraries.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
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

#include "cgroup_delegation.h"

namespace {

using Steady = std::chrono::steady_clock;
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
  // > 0: between create and start, report "created" and wait this long for the agent to give the
  // inner network namespace its interface (it writes <run-dir>/network-ready).
  milliseconds network_wait{0};
  std::string stop_signal = "TERM";   // systemd halts on RTMIN+3 (TERM makes it re-execute)
  std::string console_log;            // empty: <run-dir>/console.log
  int64_t console_log_max = 1 << 20;  // bytes per file; one rotated file (.1) is kept
};

// What the supervisor needs of the inner container's config.json.
struct InnerSpec {
  std::string cgroups_path;
  uid_t root_uid = 0;  // the host ID inner root maps to
  gid_t root_gid = 0;
  bool terminal = false;
  std::string stop_signal;  // annotation io.cvm.stop-signal; empty: --stop-signal
};

std::optional<InnerSpec> read_inner_spec(const std::string& path, std::string& error) {
  std::ifstream in(path);
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    error = path + " is not a JSON object";
    return std::nullopt;
  }
  InnerSpec s;
  const auto& linux_section = j.value("linux", nlohmann::json::object());
  s.cgroups_path = linux_section.value("cgroupsPath", "");
  const auto root_of = [&](const char* key) -> int64_t {
    for (const auto& m : linux_section.value(key, nlohmann::json::array())) {
      if (m.value("containerID", int64_t{-1}) == 0) return m.value("hostID", int64_t{0});
    }
    return 0;
  };
  s.root_uid = static_cast<uid_t>(root_of("uidMappings"));
  s.root_gid = static_cast<gid_t>(root_of("gidMappings"));
  s.terminal = j.value("process", nlohmann::json::object()).value("terminal", false);
  s.stop_signal = j.value("annotations", nlohmann::json::object()).value("io.cvm.stop-signal", "");
  return s;
}

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
    std::string spec_error;
    const auto spec = read_inner_spec(o_.bundle + "/config.json", spec_error);
    if (!spec) return fail(spec_error);
    if (!spec->stop_signal.empty()) o_.stop_signal = spec->stop_signal;
    // runc kill knows signals by their names, but not the real-time ones: those go by number
    // (glibc's SIGRTMIN, which systemd's SIGRTMIN+3 means, is above the kernel's).
    if (o_.stop_signal.rfind("RTMIN+", 0) == 0) {
      try {
        o_.stop_signal = std::to_string(SIGRTMIN + std::stoi(o_.stop_signal.substr(6)));
      } catch (const std::exception&) {
        return fail("bad stop signal " + o_.stop_signal);
      }
    }
    std::vector<std::string> create = {"create", "--bundle", o_.bundle, "--pid-file", pid_file};
    const std::string console_socket = o_.root + "/console.sock";
    if (spec->terminal) {
      if (auto st = listen_console(console_socket); !st.empty()) return fail(st);
      create.insert(create.end(), {"--console-socket", console_socket});
    }
    create.push_back(o_.id);
    // create, delegate, start: the inner root must own its cgroup before its init runs.
    if (auto created = tool(create); !created.empty()) {
      (void)tool({"delete", "--force", o_.id});  // a failed create may leave a container
      return fail(created);
    }
    if (spec->terminal) {
      if (auto st = accept_console(); !st.empty()) {
        (void)tool({"delete", "--force", o_.id});
        return fail(st);
      }
    }
    if (auto st = delegate_cgroup(*spec); !st.empty()) {
      (void)tool({"delete", "--force", o_.id});
      return fail(st);
    }
    if (o_.network_wait.count() > 0) {
      write_status({{"state", "created"}, {"pid", read_pid(pid_file)}});
      if (auto waited = wait_for(o_.run_dir, o_.run_dir + "/network-ready", o_.network_wait,
                                 "the workspace's network");
          !waited.empty()) {
        (void)tool({"delete", "--force", o_.id});
        if (stop_requested_) {
          write_status({{"state", "stopped"}});
          return 0;
        }
        return fail(waited);
      }
    }
    if (auto started = tool({"start", o_.id}); !started.empty()) {
      (void)tool({"delete", "--force", o_.id});
      return fail(started);
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
    // The inner init exited on its own: shut down by the user, or died.
    drain_console();
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
    if (o_.bundle_wait.count() <= 0) return {};
    return wait_for(o_.bundle, o_.bundle + "/config.json", o_.bundle_wait, "the inner bundle");
  }

  // Waits for `path` to appear in `dir` (inotify, no polling), up to `timeout`, or for a stop
  // request. Returns "" once it is there.
  std::string wait_for(const std::string& dir, const std::string& path, milliseconds timeout,
                       const std::string& what) {
    if (::access(path.c_str(), F_OK) == 0) return {};
    if (bundle_watch_ < 0) bundle_watch_ = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    const int watch = bundle_watch_;
    if (watch < 0) return "inotify_init1: " + errno_text();
    if (::inotify_add_watch(watch, dir.c_str(), IN_MOVED_TO | IN_CREATE) < 0) {
      return "inotify_add_watch " + dir + ": " + errno_text();
    }
    const auto deadline = Steady::now() + timeout;
    std::string why;
    while (::access(path.c_str(), F_OK) != 0) {
      if (stop_requested_) {
        why = "stopped before " + what + " was ready";
        break;
      }
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - Steady::now()).count();
      if (left <= 0) {
        why = what + " was not ready within " + std::to_string(timeout.count()) + " ms";
        break;
      }
      pollfd fds[2] = {{watch, POLLIN, 0}, {sfd_, POLLIN, 0}};
      if (::poll(fds, 2, static_cast<int>(left)) > 0 && (fds[1].revents & POLLIN)) {
        wait_signal(Steady::now());  // handles SIGTERM (stop_requested_) and reaps
      }
      char buf[4096];
      while (::read(watch, buf, sizeof buf) > 0) {
      }
    }
    return why;
  }

  int stop() {
    write_status({{"state", "stopping"}, {"pid", inner_pid_}});
    (void)tool({"kill", o_.id, o_.stop_signal});
    const auto deadline = Steady::now() + o_.grace;
    while (!inner_exit_ && Steady::now() < deadline) wait_signal(deadline);
    if (!inner_exit_) {
      (void)tool({"kill", o_.id, "KILL"});
      const auto kill_deadline = Steady::now() + std::chrono::seconds(5);
      while (!inner_exit_ && Steady::now() < kill_deadline) wait_signal(kill_deadline);
    }
    drain_console();
    (void)tool({"delete", "--force", o_.id});
    write_status({{"state", "stopped"}});
    return 0;
  }

  // The console socket runc sends the terminal's master to (`create --console-socket`). Listening
  // before runc starts lets runc's connect and send complete before the accept.
  std::string listen_console(const std::string& path) {
    sockaddr_un addr{};
    if (path.size() >= sizeof addr.sun_path) return "console socket path too long: " + path;
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    // The runtime's root (where the socket lives) is made by its first command: not run yet.
    if (::mkdir(o_.root.c_str(), 0700) != 0 && errno != EEXIST) {
      return "mkdir " + o_.root + ": " + errno_text();
    }
    ::unlink(path.c_str());
    console_listen_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (console_listen_ < 0) return "console socket: " + errno_text();
    if (::bind(console_listen_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(console_listen_, 1) != 0) {
      return "console socket " + path + ": " + errno_text();
    }
    return {};
  }

  std::string accept_console() {
    const int conn = ::accept4(console_listen_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    ::close(console_listen_);
    console_listen_ = -1;
    if (conn < 0) return "the runtime sent no console: " + errno_text();
    char data[256];
    iovec iov{data, sizeof data};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    ::close(conn);
    const cmsghdr* c = n >= 0 ? CMSG_FIRSTHDR(&msg) : nullptr;
    if (c == nullptr || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
      return "the runtime's console message carried no terminal";
    }
    std::memcpy(&console_, CMSG_DATA(c), sizeof(int));
    const int flags = ::fcntl(console_, F_GETFL);
    (void)::fcntl(console_, F_SETFL, flags | O_NONBLOCK);
    // Hold a slave end ourselves: while none is open (systemd closes /dev/console between
    // messages) the master reads EIO, and a master closed on that would leave every later open of
    // /dev/console failing with EIO inside.
    console_peer_ = ::ioctl(console_, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (console_peer_ < 0) return "console peer: " + errno_text();
    return {};
  }

  std::string delegate_cgroup(const InnerSpec& spec) {
    if (spec.cgroups_path.empty() || spec.root_uid == 0) return {};
    std::ifstream in("/proc/self/mountinfo");
    const std::string mountinfo((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
    const auto paths = cvm::supervisor::delegation_paths(
        cvm::supervisor::parse_cgroup_mounts(mountinfo), spec.cgroups_path);
    return cvm::supervisor::apply_delegation(paths, spec.root_uid, spec.root_gid);
  }

  // Copies what the inner init wrote to its console into the console log, rotating it at
  // console_log_max (the previous file becomes .1; older output is dropped).
  void pump_console() {
    if (console_ < 0) return;
    char buf[16384];
    for (;;) {
      const ssize_t n = ::read(console_, buf, sizeof buf);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        // Not with our own slave end open; on some other error nothing more will come.
        ::close(console_);
        console_ = -1;
        return;
      }
      if (n < 0) return;
      write_console(buf, static_cast<size_t>(n));
    }
  }

  void write_console(const char* data, size_t size) {
    const std::string& path = console_log_path();
    if (console_out_ < 0) {
      console_out_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
      struct stat st {};
      console_written_ = console_out_ >= 0 && ::fstat(console_out_, &st) == 0 ? st.st_size : 0;
    }
    if (console_out_ < 0) return;
    if (console_written_ > 0 &&
        console_written_ + static_cast<int64_t>(size) > o_.console_log_max) {
      ::close(console_out_);
      std::rename(path.c_str(), (path + ".1").c_str());
      console_out_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
      console_written_ = 0;
      if (console_out_ < 0) return;
    }
    while (size > 0) {
      const ssize_t w = ::write(console_out_, data, size);
      if (w <= 0) return;
      data += w;
      size -= static_cast<size_t>(w);
      console_written_ += w;
    }
  }

  const std::string& console_log_path() {
    if (o_.console_log.empty()) o_.console_log = o_.run_dir + "/console.log";
    return o_.console_log;
  }

  void drain_console() {
    pump_console();
    if (console_peer_ >= 0) ::close(console_peer_);
    console_peer_ = -1;
    if (console_ >= 0) ::close(console_);
    console_ = -1;
    if (console_out_ >= 0) ::close(console_out_);
    console_out_ = -1;
  }

  // Waits for one batch of signals (or the deadline) and handles it: reaps every exited child,
  // notes the inner init's exit and stop requests.
  void wait_signal(std::optional<Steady::time_point> deadline) {
    int timeout = -1;
    if (deadline) {
      const auto left = std::chrono::duration_cast<milliseconds>(*deadline - Steady::now()).count();
      timeout = static_cast<int>(std::max<int64_t>(0, left));
    }
    pollfd fds[2] = {{sfd_, POLLIN, 0}, {console_, POLLIN, 0}};
    const int ready = ::poll(fds, console_ >= 0 ? 2 : 1, timeout);
    if (ready <= 0) return;
    if (console_ >= 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) pump_console();
    if (!(fds[0].revents & POLLIN)) return;
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
    const auto deadline = Steady::now() + o_.tool_timeout;
    while (!exited_.contains(pid)) {
      if (Steady::now() >= deadline) {
        ::kill(pid, SIGKILL);
        while (!exited_.contains(pid)) wait_signal(Steady::now() + milliseconds(100));
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
  int console_listen_ = -1;
  int console_ = -1;       // the inner terminal's master, non-blocking
  int console_peer_ = -1;  // a slave end of it, held open (see accept_console)
  int console_out_ = -1;   // the console log
  int64_t console_written_ = 0;
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
                 "--run-dir DIR [--grace-ms N] [--bundle-wait-ms N] [--network-wait-ms N] "
                 "[--stop-signal SIG] "
                 "[--console-log PATH] [--console-log-max BYTES]\n";
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
    } else if (flag == "--network-wait-ms") {
      try {
        o.network_wait = milliseconds(std::stoll(value));
      } catch (const std::exception&) {
        return usage();
      }
    } else if (flag == "--stop-signal") {
      o.stop_signal = value;
    } else if (flag == "--console-log") {
      o.console_log = value;
    } else if (flag == "--console-log-max") {
      try {
        o.console_log_max = std::stoll(value);
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
