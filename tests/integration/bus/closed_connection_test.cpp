// Closed connection (docs/reliability.md): cnats reconnects forever, but it still closes a
// connection it gives up on (the server died during the first handshake; authorization refused
// twice on a reconnect). A service must not go on retrying start() on that dead connection:
// run_service exits with kExitConnectionClosed so that its supervisor restarts it.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <memory>

#include <gtest/gtest.h>

#include "cvm/service/service.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"

namespace cvm::service {
namespace {

using namespace std::chrono_literals;

struct CountingService {
  std::atomic<int>* starts;
  Status start() {
    ++*starts;
    return {};
  }
  void stop() {}
};

TEST(ServiceConnection, ExitsNonZeroWhenCnatsClosesTheConnectionForGood) {
  // The server reads its users from a file of its store directory, rewritten between restarts.
  test::NatsServer nats({.extra_config = "include \"auth.conf\""});
  auto users = [&](const std::string& password) {
    std::ofstream(nats.dir() + "/auth.conf")
        << "authorization { user: svc, password: " << password << " }\n";
  };
  users("right");
  ASSERT_TRUE(nats.start().ok());

  CommonOptions common;
  common.nats_url = nats.url();
  common.nats_user = "svc";
  common.nats_password = "right";
  common.metrics_listen = "off";
  std::atomic<int> starts{0};
  auto exit_code = std::async(std::launch::async, [&] {
    return run_service("closed-test", common, [&](const ServiceContext&) {
      return std::make_unique<CountingService>(CountingService{&starts});
    });
  });
  ASSERT_TRUE(test::wait_until([&] { return starts.load() > 0; }, 10s));

  // The same server comes back refusing the service's credentials: cnats' reconnect is refused
  // twice in a row and it closes the connection.
  nats.stop();
  users("changed");
  ASSERT_TRUE(nats.start().ok());

  const bool exited = exit_code.wait_for(30s) == std::future_status::ready;
  if (!exited) ::kill(::getpid(), SIGTERM);  // run_until_signal stops on it; the test fails
  EXPECT_TRUE(exited) << "the service kept running on a closed connection";
  EXPECT_EQ(exit_code.get(), kExitConnectionClosed);
}

}  // namespace
}  // namespace cvm::service
