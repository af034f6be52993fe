// ensure_stream against a stream an operator already made: its replica count is kept and a
// matching stream is not updated, so a client without update rights (a node agent) still starts.

#include <thread>

#include <gtest/gtest.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/bus/bus.h"
#include "cvm/test/nats_server.h"

namespace cvm::bus {
namespace {

TEST(BusStreamOwnership, AMatchingStreamIsNotUpdatedSoClientsWithoutUpdateRightsStart) {
  test::NatsServerOptions server_options;
  server_options.extra_config = R"(
accounts {
  CVM {
    jetstream: enabled
    users: [
      { user: admin, password: admin }
      { user: agent, password: agent,
        permissions: { publish: { deny: ["$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.DELETE.>"] } } }
    ]
  }
}
)";
  test::NatsServer server(server_options);
  ASSERT_TRUE(server.start().ok());
  boost::asio::io_context io;
  auto guard = boost::asio::make_work_guard(io);
  std::thread io_thread([&] { io.run(); });

  auto connect = [&](const std::string& user) {
    ConnectOptions o;
    o.url = server.url();
    o.user = user;
    o.password = user;
    o.retry_on_failed_connect = false;
    return Connection::connect(o, io.get_executor());
  };
  auto admin = connect("admin");
  auto agent = connect("agent");
  ASSERT_TRUE(admin.ok()) << admin.error().message;
  ASSERT_TRUE(agent.ok()) << agent.error().message;

  StreamConfig config;
  config.name = "WORK";
  config.subjects = {"work.>", "more.>"};
  config.max_age = std::chrono::hours(1);
  ASSERT_TRUE((*admin)->ensure_stream(config).ok());

  // The same settings with the subjects in another order and another replica count (which the
  // operator owns): nothing to update, so the agent's missing update right does not matter.
  StreamConfig same = config;
  same.subjects = {"more.>", "work.>"};
  same.replicas = 3;
  auto st = (*agent)->ensure_stream(same);
  EXPECT_TRUE(st.ok()) << st.error().message;

  // A real difference still needs an update, and the agent is refused one.
  StreamConfig different = config;
  different.max_age = std::chrono::hours(2);
  EXPECT_FALSE((*agent)->ensure_stream(different).ok());
  EXPECT_TRUE((*admin)->ensure_stream(different).ok());

  agent->reset();
  admin->reset();
  guard.reset();
  io_thread.join();
}

}  // namespace
}  // namespace cvm::bus
