#include "cvm/test/nats_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
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

bool accepts_connections(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return false;
  auto addr = loopback(port);
  return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
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
  port_ = free_port();
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
  if (!options_.server_name.empty()) args.insert(args.end(), {"-n", options_.server_name});
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
  const bool up = wait_until(
      [&] {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          exited = true;
          return true;
        }
        return accepts_connections(port_);
      },
      options_.start_timeout, std::chrono::milliseconds{10});
  if (exited) {
    pid_ = -1;
    return make_error(ErrorDomain::kTool, "nats-server exited at start; see " + log);
  }
  if (!up) {
    kill();
    return make_error(ErrorDomain::kTimeout, "nats-server did not listen on port " +
                                                 std::to_string(port_) + "; see " + log);
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
