// The test nats-server helper itself: fault tests kill a server and start it again on the same
// port while other tests run beside them, so "started" must mean "our server answers there".

#include <fstream>

#include <gtest/gtest.h>

#include "cvm/test/nats_server.h"

namespace {

TEST(TestNatsServer, FreePortsAreBelowTheEphemeralRange) {
  int first = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> first;
  if (first < 11000) GTEST_SKIP() << "ephemeral range starts at " << first;
  for (int i = 0; i < 50; ++i) {
    const auto port = cvm::test::free_port();
    EXPECT_GE(port, 10000);
    EXPECT_LT(port, first);
  }
}

TEST(TestNatsServer, StartAnswersWithItsOwnName) {
  cvm::test::NatsServer server;
  ASSERT_TRUE(server.start().ok());
  EXPECT_FALSE(server.server_name().empty());
  server.kill();
  ASSERT_TRUE(server.start().ok()) << "a restart on the same port";
}

TEST(TestNatsServer, StartFailsWhenAnotherServerHoldsThePort) {
  cvm::test::NatsServer first;
  ASSERT_TRUE(first.start().ok());
  cvm::test::NatsServerOptions o;
  o.port = first.port();
  o.start_timeout = std::chrono::milliseconds{3000};
  cvm::test::NatsServer second(o);
  const auto st = second.start();
  ASSERT_FALSE(st.ok()) << "the first server's answer was taken for the second's";
  EXPECT_NE(st.error().message.find(std::to_string(first.port())), std::string::npos)
      << st.error().message;
}

}  // namespace
