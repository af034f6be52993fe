// Item 7: a flood past a slow consumer. The GPU broker (a core queue subscriber on
// cvm.v1.gpu.reserve) is frozen while GPU builds arrive and a flood of large messages fills its
// connection past the server's max_pending: the server must cut it as a slow consumer and say so,
// the broker must report its disconnect, and no build may be silently lost: the scheduler's
// unanswered reserve requests are retried from the work queue until the broker is back.
#include <signal.h>
#include <sys/wait.h>

#include <fstream>
#include <sstream>

#include "cvm/base/clock.h"
#include "cvm/fleetsim/harness.h"
#include "cvm/test/files.h"
#include "cvm/v1/gpu.pb.h"
#include "fault_fixture.h"

namespace cvm::fault {
namespace {

bool log_has(const std::string& path, const std::string& needle) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str().find(needle) != std::string::npos;
}

TEST_F(FaultTest, FloodPastAFrozenBrokerIsReportedNothingDropped) {
  // A small max_pending makes the slow consumer cheap to reach (the default is 64 MiB).
  test::NatsServer nats({.extra_config = "max_pending: 4MB"});
  ASSERT_NO_FATAL_FAILURE(start_nats(nats));
  SystemClock clock;
  fleetsim::Harness harness(nats.url(), clock);
  fleetsim::FleetConfig fleet;
  fleet.nodes = 4;
  fleet.prefix = "f";
  fleetsim::Profile metal{.name = "metal",
                          .cpu_millicores = 64'000,
                          .memory_bytes = 256 * kGiB,
                          .bare_metal = true,
                          .gpus = 8,
                          .gpu_memory_bytes = 80 * kGiB};
  fleet.profiles = {metal};
  ASSERT_TRUE(harness.start_fleet(fleet).ok());
  auto& broker = start_broker(nats.url());
  start_scheduler(nats.url());
  ASSERT_TRUE(broker_answers(30s)) << logs();

  ASSERT_EQ(::kill(broker.pid(), SIGSTOP), 0);
  std::vector<std::string> builds;
  for (int i = 0; i < 20; ++i) {
    const std::string id = "fl-" + std::to_string(i);
    ASSERT_TRUE(submit(request(id, 1000, kGiB, 1)));
    builds.push_back(id);
  }
  // The flood: 32 MiB of reserve messages nobody reads while the broker is frozen.
  const std::string junk(512 * 1024, 'x');
  for (int i = 0; i < 64; ++i) {
    ASSERT_TRUE(client_->publish(std::string(wire::kGpuReserve), junk).ok());
  }
  ASSERT_TRUE(client_->flush(10s).ok());
  EXPECT_TRUE(test::wait_until([&] { return log_has(nats.log_path(), "Slow Consumer"); }, 20s))
      << "the server never reported the slow consumer";
  ASSERT_EQ(::kill(broker.pid(), SIGCONT), 0);
  EXPECT_TRUE(
      test::wait_until([&] { return log_has(broker.log_path(), "disconnected from NATS"); }, 20s))
      << "the broker did not report losing its connection" << logs()
      << "\nbroker wait status: " << [&] {
           const int st = broker.stop();
           return WIFSIGNALED(st) ? "killed by signal " + std::to_string(WTERMSIG(st))
                                  : "exit " + std::to_string(WEXITSTATUS(st));
         }();

  LedgerOptions lo;
  lo.acknowledged_builds = builds;
  lo.timeout = 90s;
  const auto stats = harness.on_fleet([](auto& f) { return f.stats(); });
  lo.sim_over_capacity = stats.over_capacity;
  auto report = expect_ledger(lo);
  for (const auto& id : builds) {
    EXPECT_EQ(report.terminal_phase[id], "RUNNING") << id << logs();
  }
}

}  // namespace
}  // namespace cvm::fault
