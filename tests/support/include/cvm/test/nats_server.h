#pragma once
// A real nats-server for tests: its own free port, its own store directory, killed with the test.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "cvm/base/result.h"

namespace cvm::test {

// A TCP port on 127.0.0.1 that nothing listens on right now, taken at random from below the
// kernel's ephemeral range (ip_local_port_range): bind(0) and outgoing connections never hand out
// such a port, so a server a test kills and starts again finds its port still free, instead of
// taken by another test's server or some client's socket in the meantime.
uint16_t free_port();

struct NatsServerOptions {
  bool jetstream = true;
  // Extra configuration text (nats-server config syntax): users, permissions, cluster blocks.
  // Written to a config file in the server's directory and passed with -c; the listen address,
  // port and store directory stay on the command line so they win.
  std::string extra_config;
  // Empty: a name unique to this NatsServer (kept across its restarts). start() checks that the
  // server answering on the port has this name, so it never mistakes another one for its own.
  std::string server_name;
  uint16_t port = 0;  // 0: free_port()
  std::chrono::milliseconds start_timeout{10000};
};

class NatsServer {
 public:
  // Picks a free port and makes a private temp directory; does not start the server.
  explicit NatsServer(NatsServerOptions options = {});
  ~NatsServer();  // kills the server and removes the directory
  NatsServer(const NatsServer&) = delete;
  NatsServer& operator=(const NatsServer&) = delete;

  // Starts (or restarts, on the same port and store directory) and waits until it answers on its
  // port with its own name. Fails if it exits, or nothing (or another server) answers there
  // within start_timeout.
  Status start();
  void stop();  // SIGTERM, bounded wait, then SIGKILL
  void kill();  // SIGKILL: a crash, for fault tests
  [[nodiscard]] bool running() const { return pid_ > 0; }

  [[nodiscard]] uint16_t port() const { return port_; }
  [[nodiscard]] std::string url() const;
  [[nodiscard]] const std::string& dir() const { return dir_; }
  [[nodiscard]] std::string log_path() const { return dir_ + "/server.log"; }
  [[nodiscard]] const std::string& server_name() const { return options_.server_name; }

 private:
  void reap(std::chrono::milliseconds timeout);

  NatsServerOptions options_;
  uint16_t port_ = 0;
  std::string dir_;
  pid_t pid_ = -1;
};

}  // namespace cvm::test
