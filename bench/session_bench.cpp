// session_bench: the cost of entering a workspace over the bus, against the same work without it,
// in the same run, on the same Debian workspace (real nats-server, the three services, one node
// agent, the systemd Debian image of scripts/build-debian-image.sh).
//
//   session_bench [--starts N] [--keys N] [--mib N]      (root, runc, umoci, nats-server)
//
// What is timed, and its baselines:
//   exec start    `cvmctl exec ws -- true`, fork to exit, against the very `runc exec` chain the
//                 agent runs (the outer runc's exec of the inner runc's exec, exec_argv()) and a
//                 single `runc exec` of the supervising container
//   keystroke     one byte typed into `cvmctl exec -it ws -- sh -c 'cat >/dev/null'` on a pty
//                 until the workspace's terminal echoes it back, against the same through the
//                 runc chain's own ptys, and a raw cnats request-reply round trip
//   exec stream   N MiB out of `head -c` through `cvmctl exec` (stdout) and into `cat >/dev/null`
//                 (stdin), against the runc chain's pipes and raw NATS publish throughput (one
//                 connection to another, 128 KiB messages, an 8 MiB window as the sessions'
//                 flow control keeps)
//   port-forward  N MiB from a TCP server on the workspace's loopback through
//                 `cvmctl port-forward`, against a direct connection inside the workspace's
//                 network namespace and raw NATS publish throughput
// A load tool, not a test: it prints figures ("label  p50 X us  p99 Y us (n=N)" and
// "label  X MB/s" lines), it does not judge them.
#include <fcntl.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <poll.h>
#include <pty.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "child_process.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/session_server.h"
#include "cvm/agent/supervisor_spec.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cvm::bench::Steady;
using cvm::test::ChildProcess;
using cvm::test::run_command;

using cvm::bench::mb_per_s;
using cvm::bench::us_since;
void print_latency(const char* label, std::vector<double> us) {
  cvm::bench::print_latency(label, std::move(us), 44);
}
using cvm::bench::print_rate;

// A child running argv with stdin and stdout as pipes (stderr to /dev/null).
struct Piped {
  pid_t pid = -1;
  int in = -1;   // its stdin
  int out = -1;  // its stdout
};
Piped spawn_piped(const std::vector<std::string>& argv) {
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) return {};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  return {pid, in[1], out[0]};
}

int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Reads fd to its end; the byte count.
uint64_t drain(int fd) {
  static char buf[1 << 17];
  uint64_t total = 0;
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    total += static_cast<uint64_t>(n);
  }
  return total;
}

bool write_zeros(int fd, uint64_t bytes) {
  static const std::vector<char> zeros(1 << 17, 0);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, zeros.data(), std::min<uint64_t>(bytes, zeros.size()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes -= static_cast<uint64_t>(n);
  }
  return true;
}

// MB/s of `bytes` out of argv's stdout (stdin closed), or into its stdin (stdout drained).
double stream_out(const std::vector<std::string>& argv, uint64_t bytes) {
  const auto t0 = Steady::now();
  auto p = spawn_piped(argv);
  if (p.pid < 0) return 0;
  ::close(p.in);
  const uint64_t got = drain(p.out);
  ::close(p.out);
  const int code = wait_exit(p.pid);
  if (code != 0 || got != bytes) {
    std::cerr << "stream out: exit " << code << ", " << got << " of " << bytes << " bytes\n";
    return 0;
  }
  return mb_per_s(bytes, t0);
}
double stream_in(const std::vector<std::string>& argv, uint64_t bytes) {
  const auto t0 = Steady::now();
  auto p = spawn_piped(argv);
  if (p.pid < 0) return 0;
  std::thread reader([&] { drain(p.out); });
  const bool wrote = write_zeros(p.in, bytes);
  ::close(p.in);
  reader.join();
  ::close(p.out);
  const int code = wait_exit(p.pid);
  if (!wrote || code != 0) {
    std::cerr << "stream in: exit " << code << (wrote ? "" : ", the write broke") << "\n";
    return 0;
  }
  return mb_per_s(bytes, t0);
}

// Fork to exit of argv, each of `n` times (after two warm-up runs), in microseconds.
std::vector<double> start_latency(const std::vector<std::string>& argv, int n) {
  std::vector<double> out;
  for (int i = 0; i < n + 2; ++i) {
    const auto t0 = Steady::now();
    auto p = spawn_piped(argv);
    if (p.pid < 0) return {};
    ::close(p.in);
    drain(p.out);
    ::close(p.out);
    const int code = wait_exit(p.pid);
    const double us = us_since(t0);
    if (code != 0) {
      std::cerr << "start: " << argv.front() << " exited " << code << "\n";
      return {};
    }
    if (i >= 2) out.push_back(us);
  }
  return out;
}

// Keystroke round trips through argv run on a pty of ours: one byte written to the pty until the
// far terminal's echo of it comes back. The near side is raw, so every echo is the far one's.
std::vector<double> keystrokes(const std::vector<std::string>& argv, int n) {
  int master = -1;
  const pid_t pid = ::forkpty(&master, nullptr, nullptr, nullptr);
  if (pid < 0) return {};
  if (pid == 0) {
    termios t{};
    ::tcgetattr(0, &t);
    ::cfmakeraw(&t);
    ::tcsetattr(0, TCSANOW, &t);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  // Until the far side echoes: its terminal exists, the session is open.
  std::string seen;
  const auto wait_for = [&](char want, int timeout_ms) {
    const auto deadline = Steady::now() + std::chrono::milliseconds(timeout_ms);
    char buf[256];
    while (Steady::now() < deadline) {
      pollfd p{master, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t got = ::read(master, buf, sizeof buf);
      if (got <= 0) return false;
      seen.append(buf, static_cast<size_t>(got));
      if (std::memchr(buf, want, static_cast<size_t>(got)) != nullptr) return true;
    }
    return false;
  };
  std::vector<double> out;
  bool ready = false;
  for (int i = 0; i < 100 && !ready; ++i) {
    (void)!::write(master, "r", 1);
    ready = wait_for('r', 200);
  }
  if (ready) {
    // Drain any late echoes of the readiness probes.
    while (wait_for('r', 300)) {
    }
    for (int i = 0; i < n; ++i) {
      // A fresh line now and then: a canonical-mode line holds 4095 bytes at most.
      if (i % 64 == 63) {
        (void)!::write(master, "\r", 1);
        if (!wait_for('\n', 2000)) break;
      }
      const auto t0 = Steady::now();
      (void)!::write(master, "k", 1);
      if (!wait_for('k', 2000)) {
        std::cerr << "keystroke: no echo after " << i << " keys; the terminal showed: ";
        for (char c : seen.substr(seen.size() > 200 ? seen.size() - 200 : 0)) {
          if (c >= 32 && c < 127) {
            std::cerr << c;
          } else {
            std::cerr << "\\x" << std::hex << (static_cast<unsigned>(c) & 0xff) << std::dec;
          }
        }
        std::cerr << "\n";
        break;
      }
      out.push_back(us_since(t0));
    }
  } else {
    std::cerr << "keystroke: " << argv.front() << " never echoed\n";
  }
  (void)!::write(master, "\x04", 1);  // ^D at the start of a line: cat's end of input
  ::kill(pid, SIGHUP);
  ::close(master);
  const auto deadline = Steady::now() + 5s;
  while (::waitpid(pid, nullptr, WNOHANG) != pid) {
    if (Steady::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(20ms);
  }
  return out;
}

// ---- raw NATS, the floor of both ----

std::atomic<uint64_t> g_received{0};
void count_bytes(natsConnection*, natsSubscription*, natsMsg* msg, void*) {
  g_received += static_cast<uint64_t>(natsMsg_GetDataLength(msg));
  natsMsg_Destroy(msg);
}
// MB/s of `bytes` published in 128 KiB messages from one connection to a subscriber on another,
// never more than 8 MiB ahead of what it received.
double nats_throughput(const std::string& url, uint64_t bytes) {
  natsConnection* pub = cvm::bench::raw_connect(url);
  natsConnection* sub_conn = cvm::bench::raw_connect(url);
  natsSubscription* sub = nullptr;
  if (pub == nullptr || sub_conn == nullptr ||
      natsConnection_Subscribe(&sub, sub_conn, "bench.stream", count_bytes, nullptr) != NATS_OK ||
      natsConnection_Flush(sub_conn) != NATS_OK) {
    return 0;
  }
  natsSubscription_SetPendingLimits(sub, -1, -1);
  const std::string chunk(128 << 10, 'x');
  const uint64_t window = 8 << 20;
  g_received = 0;
  const auto t0 = Steady::now();
  uint64_t sent = 0;
  while (sent < bytes) {
    while (sent - g_received.load() >= window) std::this_thread::yield();
    if (natsConnection_Publish(pub, "bench.stream", chunk.data(), static_cast<int>(chunk.size())) !=
        NATS_OK) {
      return 0;
    }
    sent += chunk.size();
  }
  while (g_received.load() < sent) std::this_thread::yield();
  const double rate = mb_per_s(sent, t0);
  natsSubscription_Destroy(sub);
  natsConnection_Destroy(pub);
  natsConnection_Destroy(sub_conn);
  return rate;
}

// ---- a TCP server on the workspace's loopback ----

// A child process in the network namespace `netns` serving, on 127.0.0.1:port, `bytes` zeros to
// each connection that asks with a 'd'. The pid; -1 when it did not start.
pid_t serve_in_netns(const std::string& netns, uint16_t port, uint64_t bytes) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    const int ns = ::open(netns.c_str(), O_RDONLY);
    if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) ::_exit(1);
    const int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
    const int one = 1;
    ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(lfd, 8) != 0) {
      ::_exit(1);
    }
    (void)!::write(ready[1], "1", 1);
    ::close(ready[1]);
    for (int served = 0; served < 64; ++served) {  // bounded: the bench ends it before this
      const int c = ::accept(lfd, nullptr, nullptr);
      if (c < 0) continue;
      char what = 0;  // 'd': download; anything else is a probe, answered with nothing
      if (::read(c, &what, 1) == 1 && what == 'd') write_zeros(c, bytes);
      ::close(c);
    }
    ::_exit(0);
  }
  ::close(ready[1]);
  char ok = 0;
  const bool up = ::read(ready[0], &ok, 1) == 1;
  ::close(ready[0]);
  if (!up) {
    ::waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

// A connection to 127.0.0.1:port, from a thread that first enters `netns` when it is not empty.
int connect_to(uint16_t port, const std::string& netns = "") {
  int fd = -1;
  std::thread([&] {
    if (!netns.empty()) {
      const int ns = ::open(netns.c_str(), O_RDONLY | O_CLOEXEC);
      if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) return;
      ::close(ns);
    }
    const int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      fd = s;
    } else {
      ::close(s);
    }
  }).join();
  return fd;
}

double tcp_download(uint16_t port, uint64_t bytes, const std::string& netns = "") {
  const auto t0 = Steady::now();
  const int fd = connect_to(port, netns);
  if (fd < 0 || ::write(fd, "d", 1) != 1) return 0;
  const uint64_t got = drain(fd);
  ::close(fd);
  if (got != bytes) {
    std::cerr << "download: " << got << " of " << bytes << " bytes\n";
    return 0;
  }
  return mb_per_s(bytes, t0);
}

}  // namespace

int main(int argc, char** argv) {
  int starts = 30;
  int keys = 500;
  uint64_t mib = 512;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--starts") starts = std::max(1, std::atoi(argv[++i]));
    if (a == "--keys") keys = std::max(1, std::atoi(argv[++i]));
    if (a == "--mib") mib = static_cast<uint64_t>(std::max(1, std::atoi(argv[++i])));
  }
  if (::geteuid() != 0) {
    std::cerr << "session_bench: needs root\n";
    return 77;
  }
  const uint64_t bytes = mib << 20;
  const char* cache_env = std::getenv("CVM_TEST_IMAGE_CACHE");
  const std::string cache =
      cache_env != nullptr && *cache_env != '\0' ? cache_env : "/var/cache/cvm-control/images";
  if (auto image = run_command({"/bin/sh", CVM_BUILD_DEBIAN_IMAGE_SCRIPT, cache, "debian"}, 900s);
      image.exit_code != 0) {
    std::cerr << "the Debian image: " << image.output << "\n";
    return 1;
  }
  const std::string work =
      fs::temp_directory_path() / ("session-bench-" + std::to_string(::getpid()));
  fs::create_directories(work);
  fs::permissions(work, fs::perms(0755));
  const std::string runc_root = work + "/runc";
  cvm::test::NatsServer nats;
  if (auto st = nats.start(); !st.ok()) {
    std::cerr << "nats-server: " << st.error().message << "\n";
    return 1;
  }
  const std::string url = nats.url();
  auto scheduler = std::make_unique<ChildProcess>(
      std::vector<std::string>{CVM_SCHEDULER_BIN, "--nats-url", url, "--metrics-listen", "off"},
      work + "/scheduler.log");
  auto broker = std::make_unique<ChildProcess>(
      std::vector<std::string>{CVM_BROKER_BIN, "--nats-url", url, "--metrics-listen", "off"},
      work + "/broker.log");
  auto agent = std::make_unique<ChildProcess>(
      std::vector<std::string>{CVM_AGENT_BIN, "--nats-url", url, "--node-id", "bench-node",
                               "--state-dir", work + "/agent", "--runc-root", runc_root,
                               "--metrics-listen", "off", "--heartbeat-interval", "1",
                               "--stop-grace", "5"},
      work + "/agent.log");
  const std::vector<std::string> cvmctl = {"/usr/bin/env", "USER=bench", CVMCTL_BIN, "--nats-url",
                                           url};
  const auto ctl = [&](std::vector<std::string> args) {
    std::vector<std::string> a = cvmctl;
    a.insert(a.end(), args.begin(), args.end());
    return a;
  };
  const std::string ws = "bench";
  int rc = 0;
  if (!cvm::test::wait_until(
          [&] {
            auto nodes = run_command(ctl({"nodes"}), 10s);
            return nodes.exit_code == 0 && nodes.output.find("bench-node") != std::string::npos;
          },
          60s)) {
    std::cerr << "the agent never registered\n" << agent->log_tail() << "\n";
    return 1;
  }
  {
    auto start = run_command(
        ctl({"build", "start", "--workspace", ws, "--image", "oci:" + cache + ":debian", "--cvm",
             "--memory", "2Gi", "--owner", "bench", "--watch", "--timeout", "300"}),
        330s);
    if (start.exit_code != 0) {
      std::cerr << "the workspace did not start: " << start.output << "\n"
                << agent->log_tail() << "\n";
      return 1;
    }
  }
  // The raw chain: exactly what the agent runs for a session of root, without the bus.
  cvm::agent::ExecPlan plan;
  plan.runc = "runc";
  plan.runc_root = runc_root;
  plan.container_id = "cvm-" + ws;
  plan.inner_runtime = run_command({"/bin/sh", "-c", "command -v runc"}).output;
  while (!plan.inner_runtime.empty() && plan.inner_runtime.back() == '\n') {
    plan.inner_runtime.pop_back();
  }
  plan.inner_root = std::string(cvm::agent::kSupervisorRuntimeRoot);
  plan.inner_id = std::string(cvm::agent::kInnerContainerId);
  plan.user.home = "/root";
  const auto raw = [&](std::vector<std::string> cmd, bool tty = false) {
    auto p = plan;
    p.argv = std::move(cmd);
    p.tty = tty;
    return cvm::agent::exec_argv(p);
  };
  const auto supervisor_exec = [&](std::vector<std::string> cmd) {
    std::vector<std::string> a = {"runc", "--root", runc_root, "exec", plan.container_id};
    a.insert(a.end(), cmd.begin(), cmd.end());
    return a;
  };
  // The inner init's network namespace, for the port-forward server and its direct baseline.
  std::string netns;
  {
    auto state = run_command({"runc", "--root", runc_root, "state", plan.container_id});
    const auto at = state.output.find("\"pid\":");
    const int sup = at == std::string::npos ? 0 : std::stoi(state.output.substr(at + 6));
    const int inner = sup > 0 ? cvm::agent::find_inner_host_pid("/proc", sup) : 0;
    if (inner > 0) netns = "/proc/" + std::to_string(inner) + "/ns/net";
  }
  // Until sessions are served (the agent registers its session subjects after the launch).
  if (!cvm::test::wait_until(
          [&] {
            return run_command(ctl({"exec", ws, "--", "true"}), 20s).exit_code == 0;
          },
          60s)) {
    std::cerr << "cvmctl exec never worked\n" << agent->log_tail() << "\n";
    return 1;
  }

  print_latency("exec start: cvmctl exec -- true",
                start_latency(ctl({"exec", ws, "--", "true"}), starts));
  print_latency("exec start: raw runc exec chain", start_latency(raw({"true"}), starts));
  print_latency("exec start: one runc exec (supervisor)",
                start_latency(supervisor_exec({plan.inner_runtime, "--version"}), starts));
  print_latency("keystroke echo: cvmctl exec -it",
                keystrokes(ctl({"exec", "-it", ws, "--", "sh", "-c", "cat >/dev/null"}), keys));
  print_latency("keystroke echo: raw runc exec -t chain",
                keystrokes(raw({"sh", "-c", "cat >/dev/null"}, true), keys));
  print_latency("raw NATS request-reply (1 byte)", cvm::bench::raw_round_trips(url, keys, "k"));

  const std::string head = "head -c " + std::to_string(bytes) + " /dev/zero";
  print_rate("exec stdout: cvmctl exec -- head -c",
             stream_out(ctl({"exec", ws, "--", "sh", "-c", head}), bytes));
  print_rate("exec stdout: raw runc exec chain", stream_out(raw({"sh", "-c", head}), bytes));
  print_rate("exec stdin: cvmctl exec -i -- cat >/dev/null",
             stream_in(ctl({"exec", "-i", ws, "--", "sh", "-c", "cat >/dev/null"}), bytes));
  print_rate("exec stdin: raw runc exec chain",
             stream_in(raw({"sh", "-c", "cat >/dev/null"}), bytes));
  print_rate("raw NATS publish, 128 KiB, 8 MiB window", nats_throughput(url, bytes));

  const uint16_t remote = 47011;
  const pid_t server = netns.empty() ? -1 : serve_in_netns(netns, remote, bytes);
  if (server < 0) {
    std::cerr << "no server in the workspace's network namespace\n";
    rc = 1;
  } else {
    print_rate("port: direct TCP in the workspace", tcp_download(remote, bytes, netns));
    const uint16_t local = cvm::test::free_port();
    ChildProcess forward(
        ctl({"port-forward", ws, std::to_string(local) + ":" + std::to_string(remote)}),
        work + "/forward.log");
    int probe = -1;
    for (int i = 0; i < 100 && probe < 0; ++i) {
      probe = connect_to(local);
      if (probe < 0) std::this_thread::sleep_for(50ms);
    }
    if (probe >= 0) {
      (void)!::write(probe, "p", 1);  // a session of its own, which the server ends at once
      drain(probe);
      ::close(probe);
      print_rate("port: cvmctl port-forward", tcp_download(local, bytes));
    } else {
      std::cerr << "port-forward never listened: " << forward.log_tail() << "\n";
      rc = 1;
    }
    ::kill(server, SIGKILL);
    ::waitpid(server, nullptr, 0);
  }

  (void)run_command(ctl({"build", "delete", "--workspace", ws, "--watch", "--timeout", "60"}), 90s);
  // How the streams were cut into frames (the agent's closing line of each session), for stderr.
  {
    std::ifstream log(work + "/agent.log");
    for (std::string line; std::getline(log, line);) {
      if (line.find(" closed (exit ") != std::string::npos) std::cerr << line << "\n";
    }
  }
  agent->stop();
  scheduler->stop();
  broker->stop();
  auto list = run_command({"runc", "--root", runc_root, "list", "-q"});
  std::istringstream ids(list.output);
  for (std::string id; std::getline(ids, id);) {
    if (!id.empty()) run_command({"runc", "--root", runc_root, "delete", "-f", id});
  }
  std::error_code ec;
  fs::remove_all(work, ec);
  return rc;
}
