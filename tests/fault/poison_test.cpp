// Item 6: a poison message, one the scheduler cannot finish on any delivery (it needs a GPU and
// no broker answers). It must stop after MaxDeliver (no hot loop: bounded deliveries and CPU), end
// in a terminal event (the requester must hear), and leave a dead-letter record that can be
// queried: a stream (CVM_DEAD_LETTERS) that stores the server's advisory for CVM_BUILDS. The
// scheduler terms the request on its last delivery, so the server's word is MSG_TERMINATED (it
// sends MAX_DELIVERIES only when it would deliver a message past MaxDeliver, i.e. when the last
// delivery was naked or timed out); the stream keeps both kinds.
#include <fstream>
#include <sstream>

#include "cvm/base/clock.h"
#include "cvm/fleetsim/harness.h"
#include "cvm/test/build_events.h"
#include "fault_fixture.h"

namespace cvm::fault {
namespace {

// utime + stime of a process, in seconds.
double cpu_seconds(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; rest >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::stod(field);
    if (i == 15) break;
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

size_t count_lines(const std::string& path, const std::string& needle) {
  std::ifstream f(path);
  size_t n = 0;
  for (std::string line; std::getline(f, line);) n += line.find(needle) != std::string::npos;
  return n;
}

TEST_F(FaultTest, PoisonMessageStopsAtMaxDeliverAndIsDeadLettered) {
  test::NatsServer nats;
  ASSERT_NO_FATAL_FAILURE(start_nats(nats));
  SystemClock clock;
  fleetsim::Harness harness(nats.url(), clock);
  fleetsim::FleetConfig fleet;
  fleet.nodes = 2;
  fleet.prefix = "p";
  fleetsim::Profile metal{
      .name = "metal", .bare_metal = true, .gpus = 4, .gpu_memory_bytes = 40 * kGiB};
  fleet.profiles = {metal};
  ASSERT_TRUE(harness.start_fleet(fleet).ok());

  // The server's own word on it: the advisory published when a message reaches MaxDeliver, or is
  // terminated.
  std::atomic<int> advisories{0};
  auto sub = client_->subscribe("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.CVM_BUILDS.>", "",
                                [&](bus::Message) { ++advisories; });
  ASSERT_TRUE(sub.ok());
  auto sub_term = client_->subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.CVM_BUILDS.>", "",
                                     [&](bus::Message) { ++advisories; });
  ASSERT_TRUE(sub_term.ok());
  constexpr int kMaxDeliver = 3;
  auto& sched = start_scheduler(nats.url(), {"--max-deliver", std::to_string(kMaxDeliver)});
  ASSERT_TRUE(test::wait_until(
      [&] { return count_lines(sched.log_path(), "scheduler consuming") > 0; }, 30s))
      << logs();
  const double cpu0 = cpu_seconds(sched.pid());

  ASSERT_TRUE(submit(request("poison-gpu", 1000, kGiB, 1)));
  // A healthy build after it: the poison must not hold up the queue.
  ASSERT_TRUE(submit(request("healthy-1", 1000, kGiB, 0)));

  EXPECT_TRUE(test::wait_until([&] { return advisories.load() > 0; }, 60s))
      << "no MAX_DELIVERIES or MSG_TERMINATED advisory: still being redelivered?" << logs();
  // Some time past the last delivery: nothing more may come.
  std::this_thread::sleep_for(5s);
  const size_t tries = count_lines(sched.log_path(), "will retry stream seq");
  EXPECT_LE(tries, static_cast<size_t>(kMaxDeliver)) << "delivered past MaxDeliver";
  EXPECT_GE(tries, 1u);
  const double cpu = cpu_seconds(sched.pid()) - cpu0;
  EXPECT_LT(cpu, 3.0) << "the scheduler spun on the poison message";
  EXPECT_EQ(count_lines(sched.log_path(), "giving up on stream seq"), 1u) << logs();
  std::printf("poison: %zu retries, %d dead-letter advisories, scheduler CPU %.2f s\n", tries,
              advisories.load(), cpu);

  // The dead letter: some stream must store the advisory, so an operator can list what was given
  // up on and fetch the original request by its stream sequence.
  const std::string advisory_subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.CVM_BUILDS." +
                                       std::string(wire::kSchedulerDurable);
  auto names =
      client_->request("$JS.API.STREAM.NAMES", R"({"subject":")" + advisory_subject + R"("})", 5s);
  ASSERT_TRUE(names.ok()) << names.error().message;
  EXPECT_NE(names->data.find("\"streams\":[\"CVM_DEAD_LETTERS\"]"), std::string::npos)
      << "no stream records dead letters (MAX_DELIVERIES advisories of CVM_BUILDS): "
      << names->data;
  // What it recorded: exactly the poison request (the healthy one was acked), terminated by the
  // scheduler's durable consumer, with the request's stream sequence in CVM_BUILDS.
  std::vector<std::string> letters;
  auto reader = client_->read_stream("CVM_DEAD_LETTERS", ">");
  ASSERT_TRUE(reader.ok()) << reader.error().message;
  for (;;) {
    auto m = (*reader)->next(2s);
    ASSERT_TRUE(m.ok()) << m.error().message;
    if (!m->has_value()) break;
    letters.push_back((*m)->message.data);
  }
  ASSERT_EQ(letters.size(), 1u);
  std::printf("dead letter: %s\n", letters[0].c_str());
  EXPECT_NE(letters[0].find("io.nats.jetstream.advisory.v1.terminated"), std::string::npos);
  EXPECT_NE(letters[0].find("\"stream\":\"CVM_BUILDS\""), std::string::npos);
  EXPECT_NE(letters[0].find("\"consumer\":\"" + std::string(wire::kSchedulerDurable) + "\""),
            std::string::npos);
  EXPECT_NE(letters[0].find("\"stream_seq\":1,"), std::string::npos)
      << "the poison request was the first in CVM_BUILDS";
  EXPECT_NE(letters[0].find("\"deliveries\":" + std::to_string(kMaxDeliver)), std::string::npos);

  LedgerOptions lo;
  lo.acknowledged_builds = {"poison-gpu", "healthy-1"};
  lo.timeout = 20s;
  auto report = expect_ledger(lo);
  EXPECT_EQ(report.terminal_phase["healthy-1"], "RUNNING");
  EXPECT_EQ(report.terminal_phase["poison-gpu"], "FAILED")
      << "a build given up on must end FAILED, not stay SCHEDULING forever";
  auto last = test::last_build_event(*client_, "poison-gpu");
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->reason(), cvm::v1::RUNTIME_ERROR);
  EXPECT_NE(last->message().find("gave up after 3 deliveries"), std::string::npos)
      << last->message();
}

}  // namespace
}  // namespace cvm::fault
