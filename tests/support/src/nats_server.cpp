#include "cvm/test/nats_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cvm/test/wait.h"

namespace cvm::test {
namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  [[nodiscard]] int get() const { return fd_; }

 private:
  int fd_;
};

sockaddr_in loopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  return addr;
}

// The server_name in the INFO line a nats-server sends first on a new connection; "" when
// nothing answers on `port` (or not with an INFO within `patience`).
std::string answering_server_name(uint16_t port, std::chrono::milliseconds patience) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return "";
  auto addr = loopback(port);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return "";
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(patience.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((patience.count() % 1000) * 1000);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string info;
  char buf[4096];
  while (info.find("\r\n") == std::string::npos && info.size() < 65536) {
    const ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n <= 0) return "";
    info.append(buf, static_cast<size_t>(n));
  }
  const std::string key = "\"server_name\":\"";
  const size_t at = info.find(key);
  if (at == std::string::npos) return "";
  const size_t from = at + key.size();
  const size_t to = info.find('"', from);
  return to == std::string::npos ? "" : info.substr(from, to - from);
}

// The first of the kernel's ephemeral ports.
int ephemeral_first() {
  std::ifstream in("/proc/sys/net/ipv4/ip_local_port_range");
  int first = 32768;
  in >> first;
  return first;
}

bool bindable(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return false;
  auto addr = loopback(port);
  return ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
}

// Debian installs nats-server in /usr/sbin; allow an override for other machines.
std::string server_binary() {
  if (const char* env = std::getenv("CVM_NATS_SERVER"); env != nullptr && *env != '\0') return env;
  for (const char* candidate : {"/usr/sbin/nats-server", "/usr/bin/nats-server"}) {
    if (::access(candidate, X_OK) == 0) return candidate;
  }
  return "nats-server";
}

}  // namespace

uint16_t free_port() {
  constexpr int kLowest = 10000;  // clear of well-known and registered service ports
  const int first = ephemeral_first();
  if (first - kLowest >= 1000) {
    // Seeded per process: test processes that run at once draw different sequences.
    static std::mutex mu;
    std::lock_guard lock(mu);
    static std::mt19937 rng(static_cast<unsigned>(::getpid()) ^
                            static_cast<unsigned>(std::random_device{}()));
    std::uniform_int_distribution<int> pick(kLowest, first - 1);
    for (int attempt = 0; attempt < 200; ++attempt) {
      const auto port = static_cast<uint16_t>(pick(rng));
      if (bindable(port)) return port;
    }
  }
  // No room below the ephemeral range: let the kernel choose.
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  auto addr = loopback(0);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw std::runtime_error(std::string("bind: ") + std::strerror(errno));
  }
  socklen_t len = sizeof(addr);
  if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error(std::string("getsockname: ") + std::strerror(errno));
  }
  return ntohs(addr.sin_port);
}

NatsServer::NatsServer(NatsServerOptions options) : options_(std::move(options)) {
  port_ = options_.port != 0 ? options_.port : free_port();
  if (options_.server_name.empty()) {
    static std::atomic<int> made{0};
    options_.server_name = "cvm-test-" + std::to_string(::getpid()) + "-" + std::to_string(++made) +
                           "-" + std::to_string(port_);
  }
  std::string tmpl = (std::filesystem::temp_directory_path() / "cvm-nats-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
  }
  dir_ = tmpl;
}

NatsServer::~NatsServer() {
  kill();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string NatsServer::url() const { return "nats://127.0.0.1:" + std::to_string(port_); }

Status NatsServer::start() {
  if (running()) return make_error(ErrorDomain::kInvalid, "nats-server already running");

  // Everything the child needs is built before fork: after fork only async-signal-safe calls.
  std::vector<std::string> args = {server_binary(), "-a", "127.0.0.1", "-p", std::to_string(port_)};
  if (options_.jetstream) {
    args.insert(args.end(), {"-js", "-sd", dir_ + "/store"});
  }
  args.insert(args.end(), {"-n", options_.server_name});
  if (!options_.extra_config.empty()) {
    const std::string conf = dir_ + "/server.conf";
    std::ofstream(conf) << options_.extra_config << '\n';
    args.insert(args.end(), {"-c", conf});
  }
  std::vector<char*> argv;
  for (auto& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const std::string log = log_path();
  const pid_t parent = ::getpid();

  const pid_t pid = ::fork();
  if (pid < 0)
    return make_error(ErrorDomain::kSystem, std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    // The server must not outlive a crashed or killed test run.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
    }
    ::execv(argv[0], argv.data());
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  pid_ = pid;

  bool exited = false;
  std::string answered;  // the name of whatever answered on the port last
  const bool up = wait_until(
      [&] {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          exited = true;
          return true;
        }
        answered = answering_server_name(port_, std::chrono::milliseconds{500});
        return answered == options_.server_name;
      },
      options_.start_timeout, std::chrono::milliseconds{10});
  if (exited) {
    pid_ = -1;
    return make_error(ErrorDomain::kTool, "nats-server exited at start (port " +
                                              std::to_string(port_) + " taken?); see " + log);
  }
  if (!up) {
    kill();
    const std::string who =
        answered.empty() ? "nothing answered" : "another server (" + answered + ") answered";
    return make_error(ErrorDomain::kTimeout,
                      "nats-server " + options_.server_name + " did not answer on port " +
                          std::to_string(port_) + ": " + who + "; see " + log);
  }
  return {};
}

void NatsServer::reap(std::chrono::milliseconds timeout) {
  if (!running()) return;
  const bool gone = wait_until(
      [&] {
        int status = 0;
        const pid_t r = ::waitpid(pid_, &status, WNOHANG);
        return r == pid_ || (r < 0 && errno == ECHILD);
      },
      timeout, std::chrono::milliseconds{5});
  if (!gone) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
  pid_ = -1;
}

void NatsServer::stop() {
  if (!running()) return;
  ::kill(pid_, SIGTERM);
  reap(std::chrono::seconds{5});
}

void NatsServer::kill() {
  if (!running()) return;
  ::kill(pid_, SIGKILL);
  reap(std::chrono::seconds{5});
}

}  // namespace cvm::test
