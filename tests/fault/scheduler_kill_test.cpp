// Item 1: kill -9 the scheduler during a burst of 1,000 builds, then restart it. What it held but
// had not acked comes back to the restarted process (ack wait) and finishes on the node it had
// recorded; nothing is lost, nothing is placed twice.
#include "cvm/base/clock.h"
#include "cvm/fleetsim/harness.h"
#include "fault_fixture.h"

namespace cvm::fault {
namespace {

TEST_F(FaultTest, KillNineSchedulerDuringBurstThenRestart) {
  test::NatsServer nats;
  ASSERT_NO_FATAL_FAILURE(start_nats(nats));

  // 36 VMs and 4 bare-metal nodes with 8 GPUs each: room for every build, so each must end RUNNING.
  SystemClock clock;
  fleetsim::Harness harness(nats.url(), clock);
  fleetsim::FleetConfig fleet;
  fleet.nodes = 40;
  fleet.prefix = "k";
  fleet.launch_delay = 5ms;
  fleet.heartbeat_interval = 1s;
  fleetsim::Profile vm{
      .name = "vm", .weight = 9, .cpu_millicores = 16'000, .memory_bytes = 32 * kGiB};
  // Bare metal big enough that binpack cannot fill its CPU before the GPU builds come.
  fleetsim::Profile metal = vm;
  metal.name = "metal";
  metal.weight = 1;
  metal.cpu_millicores = 256'000;
  metal.memory_bytes = 512 * kGiB;
  metal.bare_metal = true;
  metal.gpus = 8;
  metal.gpu_memory_bytes = 80 * kGiB;
  fleet.profiles = {vm, metal};
  ASSERT_TRUE(harness.start_fleet(fleet).ok());
  start_broker(nats.url());
  auto* sched = &start_scheduler(nats.url());

  wait_services_ready();
  auto b = burst("k1", 1000, /*gpu_every=*/50);
  // Kill it once it is busy: some requests decided, some in its hands, the rest still to come.
  auto builds = [&] {
    auto s = client_->stream_state(std::string(wire::kStreamEvents));
    return s.ok() ? s->messages : 0;
  };
  ASSERT_TRUE(test::wait_until([&] { return builds() >= 200; }, 60s)) << logs();
  const int at_kill = b->submitted.load();
  sched->kill9();
  std::printf("scheduler killed after %d submits, %lu events\n", at_kill,
              static_cast<unsigned long>(builds()));
  sched = &start_scheduler(nats.url());
  b->thread.join();
  EXPECT_EQ(b->acknowledged.size(), 1000u);

  LedgerOptions lo;
  lo.acknowledged_builds = b->acknowledged;
  lo.timeout = 120s;  // the killed process's unacked requests return after the 30 s ack wait
  auto report = expect_ledger(lo);
  const auto stats = harness.on_fleet([](auto& f) { return f.stats(); });
  EXPECT_EQ(stats.over_capacity, 0u);
  EXPECT_EQ(stats.launched_twice, 0u);
  // A START seen twice on the same node is not a failure: a redelivered request republishes its
  // recorded assignment, which JetStream deduplicates but a core subscriber still sees.
  std::printf("assignments seen again by the same node: %lu\n",
              static_cast<unsigned long>(stats.duplicate_launches));
  EXPECT_EQ(stats.launched, 1000u) << "every build runs exactly once";
  for (const auto& id : b->acknowledged) {
    auto it = report.terminal_phase.find(id);
    if (it != report.terminal_phase.end() && it->second != "RUNNING") {
      ADD_FAILURE() << id << " ended " << it->second << " though the fleet has room" << logs();
      break;
    }
  }
}

}  // namespace
}  // namespace cvm::fault
