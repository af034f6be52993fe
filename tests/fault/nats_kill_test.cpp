// Item 2: kill -9 nats-server (file storage) during a burst and restart it on the same port and
// store directory. The client retries every unacknowledged submit with the same msg-id: nothing
// acknowledged is lost, nothing is stored or run twice.
#include "fault_fixture.h"

namespace cvm::fault {
namespace {

TEST_F(FaultTest, KillNineNatsServerDuringBurstRestartSameStore) {
  test::NatsServer nats;
  ASSERT_NO_FATAL_FAILURE(start_nats(nats));
  DurableNodes nodes({.nats_url = nats.url(), .prefix = "d", .nodes = 4});
  ASSERT_TRUE(nodes.start().ok());
  start_broker(nats.url());
  start_scheduler(nats.url());

  wait_services_ready();
  auto b = burst("n2", 400, 0, 100, 128 * kMiB);
  ASSERT_TRUE(test::wait_until([&] { return b->submitted.load() >= 150; }, 60s)) << logs();
  nats.kill();
  const int at_kill = b->submitted.load();
  std::this_thread::sleep_for(1s);  // clients notice, buffer and retry
  ASSERT_TRUE(nats.start().ok()) << "restart on the same port and store";
  std::printf("nats-server killed after %d submits; submit retries so far %d\n", at_kill,
              submit_retries_.load());
  expect_burst_ran_once(*b, nodes);
}

}  // namespace
}  // namespace cvm::fault
