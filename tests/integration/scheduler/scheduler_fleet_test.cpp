// Scheduler replicas, the GPU broker and simulated node agents (tools/fleet-sim) over a real
// nats-server: capacity safety with three replicas, exactly one terminal event per request,
// redelivery after a crash, NODE_LOST, and settings read from KV cvm_settings.
#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <nlohmann/json.hpp>
#include "cvm/base/clock.h"
#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"

#include "cvm/bus/bus.h"
#include "cvm/fleetsim/harness.h"
#include "cvm/fleetsim/load.h"
#include "cvm/service/streams.h"
#include "cvm/test/build_events.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t kGiB = 1ULL << 30;

fleetsim::Profile vm(uint64_t cpu = 4000, uint64_t mem = 8 * kGiB) {
  return {.name = "vm", .weight = 1, .cpu_millicores = cpu, .memory_bytes = mem};
}

class SchedulerFleet : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.start().ok());
    auto conn =
        bus::Connection::connect({.url = nats_.url(), .name = "test"}, client_io_.get_executor());
    ASSERT_TRUE(conn.ok()) << conn.error().message;
    client_ = *conn;
    ASSERT_TRUE(service::ensure_streams(*client_).ok());
    client_thread_ = std::thread([this] {
      auto guard = boost::asio::make_work_guard(client_io_);
      client_io_.run();
    });
    harness_ = std::make_unique<fleetsim::Harness>(nats_.url(), clock_);
    sched_config_.retry_delay = 100ms;
  }

  void TearDown() override {
    harness_.reset();
    client_io_.stop();
    if (client_thread_.joinable()) client_thread_.join();
  }

  void start(const fleetsim::FleetConfig& fleet, int replicas, bool broker = true) {
    ASSERT_TRUE(harness_->start_fleet(fleet).ok());
    if (broker) {
      ASSERT_TRUE(harness_->start_broker().ok());
    }
    auto st = harness_->start_schedulers(replicas, sched_config_);
    ASSERT_TRUE(st.ok()) << st.error().message;
    wait_for_nodes(static_cast<size_t>(fleet.nodes));
  }

  // Two 4-CPU nodes `<prefix>-0/1` heartbeating every 200 ms, one replica with a 1.5 s node TTL
  // swept every 100 ms: node loss in a couple of seconds.
  void start_fast_liveness(const std::string& prefix) {
    sched_config_.node_ttl = 1500ms;
    sched_config_.sweep_interval = 100ms;
    fleetsim::FleetConfig fleet;
    fleet.nodes = 2;
    fleet.prefix = prefix;
    fleet.heartbeat_interval = 200ms;
    fleet.profiles = {vm()};
    start(fleet, 1);
  }

  void wait_for_nodes(size_t n) {
    for (size_t i = 0; i < harness_->schedulers(); ++i) {
      ASSERT_TRUE(test::wait_until(
          [&] { return harness_->on_scheduler(i, [](auto& s) { return s.nodes(); }) >= n; }, 20s))
          << "replica " << i << " never saw every node";
    }
  }

  cvm::v1::BuildRequest request(const std::string& build, uint64_t cpu = 1000,
                                uint64_t mem = kGiB) {
    cvm::v1::BuildRequest r;
    r.set_build_id(build);
    r.set_workspace_id("ws-" + build);
    r.set_image("oci:/images/busybox:latest");
    r.set_transition(cvm::v1::START);
    r.mutable_resources()->set_cpu_millicores(cpu);
    r.mutable_resources()->set_memory_bytes(mem);
    return r;
  }

  void submit(const cvm::v1::BuildRequest& r) {
    ASSERT_TRUE(
        client_->js_publish(std::string(wire::kBuildsSubmit), r.SerializeAsString(), r.build_id())
            .ok());
  }

  std::optional<cvm::v1::BuildEvent> last_event(const std::string& build) {
    return test::last_build_event(*client_, build);
  }

  std::optional<cvm::v1::BuildEvent> wait_phase(const std::string& build,
                                                std::initializer_list<cvm::v1::Phase> phases,
                                                std::chrono::milliseconds timeout = 20s) {
    return test::wait_build_phase(*client_, build, phases, timeout);
  }

  // A replica that crashed: it takes the first delivery of `req` from the durable "scheduler"
  // consumer, does `work` (what it got done before the crash), then naks it with `redeliver_after`
  // (the server hands it to the next replica; the delay keeps this consumer, about to stop, from
  // fetching it again).
  void crash_on_first_delivery(const cvm::v1::BuildRequest& req, const std::function<void()>& work,
                               std::chrono::milliseconds redeliver_after) {
    submit(req);
    std::atomic<bool> got{false};
    bus::ConsumerConfig cc;
    cc.stream = std::string(wire::kStreamBuilds);
    cc.durable = std::string(wire::kSchedulerDurable);
    cc.filter_subject = std::string(wire::kBuildsSubmit);
    cc.ack_wait = 30s;
    cc.max_deliver = sched_config_.max_deliver;
    auto consumer = client_->pull_consume(cc, [&](bus::JsMessagePtr m) {
      if (got.exchange(true)) return;
      work();
      (void)m->nak(redeliver_after);
    });
    ASSERT_TRUE(consumer.ok());
    ASSERT_TRUE(test::wait_until([&] { return got.load(); }, 10s));
  }

  // The placement record the crashed replica wrote: `req` on `node`.
  void record_placement(const cvm::v1::BuildRequest& req, const std::string& node) {
    auto placements = client_->ensure_kv(service::placements_bucket());
    ASSERT_TRUE(placements.ok());
    cvm::v1::PlacementRecord rec;
    auto* a = rec.mutable_assignment();
    *a->mutable_request() = req;
    a->set_node_id(node);
    a->set_cvm(true);
    ASSERT_TRUE(placements->create(node + "." + req.build_id(), rec.SerializeAsString()).ok());
  }

  // The SCHEDULED event the crashed replica stored: `req` on `node`.
  void store_scheduled(const cvm::v1::BuildRequest& req, const std::string& node) {
    cvm::v1::BuildEvent e;
    e.set_build_id(req.build_id());
    e.set_workspace_id(req.workspace_id());
    e.set_phase(cvm::v1::SCHEDULED);
    e.set_node_id(node);
    ASSERT_TRUE(client_
                    ->js_publish(wire::build_events_subject(req.build_id()), e.SerializeAsString(),
                                 req.build_id() + ".SCHEDULED")
                    .ok());
  }

  // After the crash: two nodes `<prefix>-0` and `<prefix>-1`, the broker and one new replica.
  void start_after_crash(const std::string& prefix) {
    fleetsim::FleetConfig fleet;
    fleet.nodes = 2;
    fleet.profiles = {vm()};  // 4,000 mCPU, 8 GiB each
    fleet.prefix = prefix;
    ASSERT_TRUE(harness_->start_fleet(fleet).ok());
    ASSERT_TRUE(harness_->start_broker().ok());
    ASSERT_TRUE(harness_->start_schedulers(1, sched_config_).ok());
    wait_for_nodes(2);
  }

  // The build runs on `node` (its event says so, and the simulated node ran it).
  void expect_running_on(const std::string& build, const std::string& node) {
    auto e = wait_phase(build, {cvm::v1::RUNNING, cvm::v1::FAILED});
    ASSERT_TRUE(e.has_value()) << build << " never ran nor failed";
    EXPECT_EQ(e->phase(), cvm::v1::RUNNING) << e->message();
    EXPECT_EQ(e->node_id(), node);
    EXPECT_EQ(harness_->on_fleet([&](auto& f) { return f.node_of_build(build); }),
              std::optional<std::string>(node));
  }

  uint64_t finished_from_record() {
    return harness_->on_scheduler(0, [](auto& s) { return s.counts().finished_from_record; });
  }

  void put_settings(const cvm::v1::InfrastructureSettings& s) {
    auto kv = client_->ensure_kv(service::settings_bucket());
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(kv->put(std::string(wire::kSettingsKey), s.SerializeAsString()).ok());
  }

  test::NatsServer nats_;
  boost::asio::io_context client_io_;
  std::thread client_thread_;
  bus::ConnectionPtr client_;
  SystemClock clock_;
  scheduler::SchedulerConfig sched_config_;
  std::unique_ptr<fleetsim::Harness> harness_;
};

// With 3 scheduler replicas and 1,000 requests, no node is ever over capacity and every
// request has exactly one terminal event. The fleet is small on purpose, so the replicas race for
// the same room and the fleet fills up (the rest must FAIL, once each).
TEST_F(SchedulerFleet, ThreeReplicasThousandRequestsNoNodeOverCapacityOneTerminalEventEach) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 40;
  fleet.launch_delay = 5ms;
  fleet.heartbeat_interval = 1s;
  start(fleet, 3);

  fleetsim::LoadConfig load;
  load.nats_url = nats_.url();
  load.requests = 1000;
  load.window = 96;
  load.prefix = "r3";
  load.cpu_millicores = 2000;
  load.memory_bytes = 4 * kGiB;
  load.gpu_every = 25;  // some go through the broker too
  auto report = fleetsim::run_load(load);
  ASSERT_TRUE(report.ok()) << report.error().message;
  EXPECT_EQ(report->submitted, 1000);
  EXPECT_EQ(report->undecided, 0);
  EXPECT_EQ(report->scheduled + report->failed, 1000);
  EXPECT_GT(report->scheduled, 100) << "the fleet has room for hundreds";
  EXPECT_GT(report->failed, 0) << "the fleet cannot hold 1,000 of these: some must be refused";

  std::vector<std::string> ids;
  for (int i = 0; i < 1000; ++i) ids.push_back("r3-b" + std::to_string(i));
  auto audit = fleetsim::audit_events(nats_.url(), ids, 1500ms, 60s);
  ASSERT_TRUE(audit.ok()) << audit.error().message;
  EXPECT_TRUE(audit->problems.empty())
      << audit->problems.size()
      << " builds, first: " << (audit->problems.empty() ? "" : audit->problems[0]);
  const auto stats = harness_->on_fleet([](auto& f) { return f.stats(); });
  EXPECT_EQ(stats.over_capacity, 0u);
  EXPECT_EQ(stats.launched_twice, 0u);
  EXPECT_EQ(stats.launched, static_cast<uint64_t>(report->scheduled));
  uint64_t conflicts = 0;
  for (size_t i = 0; i < 3; ++i) {
    conflicts += harness_->on_scheduler(i, [](auto& s) { return s.counts().cas_conflicts; });
  }
  std::printf("scheduled %d, failed %d, CAS conflicts between replicas %lu\n", report->scheduled,
              report->failed, static_cast<unsigned long>(conflicts));
}

// A replica took the request, recorded the placement on node A and published the assignment, then
// crashed before SCHEDULED. The redelivery must finish on A, even though the scheduler would now
// choose B: the assignment's msg-id would drop a second assignment, and SCHEDULED must name the
// node that really got the work.
TEST_F(SchedulerFleet, RedeliveryAfterACrashFinishesOnTheRecordedNode) {
  // The crashed replica recorded n-1 (binpack on two empty equal nodes would pick n-0) and sent
  // the assignment there.
  auto req = request("crash1");
  ASSERT_NO_FATAL_FAILURE(crash_on_first_delivery(
      req,
      [&] {
        ASSERT_NO_FATAL_FAILURE(record_placement(req, "n-1"));
        cvm::v1::NodeAssignment a;
        *a.mutable_request() = req;
        a.set_node_id("n-1");
        a.set_cvm(true);
        ASSERT_TRUE(
            client_->js_publish(wire::node_work_subject("n-1"), a.SerializeAsString(), "crash1")
                .ok());
      },
      500ms));
  // The simulated agents subscribe now, so what they run comes from the redelivery (the real
  // agent's durable consumer would have the first, stored assignment; the sim sees the republish).
  ASSERT_NO_FATAL_FAILURE(start_after_crash("n"));
  expect_running_on("crash1", "n-1");
  EXPECT_EQ(finished_from_record(), 1u);
  // A control: a fresh request on the same fleet goes to the node binpack prefers.
  submit(request("fresh1"));
  auto f = wait_phase("fresh1", {cvm::v1::RUNNING, cvm::v1::FAILED});
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->node_id(), "n-1") << "binpack fills the node that already runs crash1";
}

// A build left SCHEDULED with no assignment sent (as in the next test), reached on a *first*
// delivery (docs/reliability.md, "Forgotten delivery counts"): a nats-server killed with -9 forgets
// the consumer's delivery counts, so the request that got as far as SCHEDULED comes back as
// delivery 1 (seen in CI, FaultTest.KillNineNatsServerDuringBurstRestartSameStore: one build stayed
// SCHEDULED). It must be finished from the record, not dropped as a duplicate; and finishing it
// must count the request out of the pipeline once (a first fix counted it out twice, the unsigned
// in-flight count wrapped and the scheduler took no more requests).
TEST_F(SchedulerFleet, FirstDeliveryOfAScheduledButUnsentBuildIsFinishedFromTheRecord) {
  sched_config_.max_in_flight = 2;
  ASSERT_NO_FATAL_FAILURE(start_after_crash("f"));
  std::vector<cvm::v1::BuildRequest> forgotten;
  for (int i = 0; i < 4; ++i) {
    auto req = request("forgot" + std::to_string(i));
    ASSERT_NO_FATAL_FAILURE(record_placement(req, "f-1"));
    ASSERT_NO_FATAL_FAILURE(store_scheduled(req, "f-1"));
    forgotten.push_back(req);
  }
  for (const auto& req : forgotten) submit(req);
  for (const auto& req : forgotten) {
    ASSERT_NO_FATAL_FAILURE(expect_running_on(req.build_id(), "f-1"));
  }
  EXPECT_EQ(finished_from_record(), forgotten.size());
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().scheduled; }), 0u)
      << "finishing from the record is not a new placement";
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().duplicates; }), 0u);
  // The pipeline still takes requests, more of them than its in-flight limit.
  for (int i = 0; i < 4; ++i) submit(request("after" + std::to_string(i), 500));
  for (int i = 0; i < 4; ++i) {
    auto e = wait_phase("after" + std::to_string(i), {cvm::v1::RUNNING, cvm::v1::FAILED});
    ASSERT_TRUE(e.has_value()) << "after" << i << " was never placed: the scheduler stalled";
    EXPECT_EQ(e->phase(), cvm::v1::RUNNING) << e->message();
  }
  EXPECT_TRUE(test::wait_until(
      [&] { return harness_->on_scheduler(0, [](auto& s) { return s.in_flight(); }) == 0; }, 10s))
      << "in flight: " << harness_->on_scheduler(0, [](auto& s) { return s.in_flight(); });
}

// The pipelined scheduler sends the assignment and SCHEDULED together, after the record. A replica
// that crashed after SCHEDULED was stored but before the assignment was must not leave the build
// stranded: the redelivery finds the record before it looks at events and sends the assignment
// (and no second SCHEDULED).
TEST_F(SchedulerFleet, RedeliveryAfterScheduledWithoutAssignmentSendsTheAssignment) {
  // The crashed replica recorded s-1 (binpack would pick s-0) and stored SCHEDULED, then crashed
  // before the assignment was stored.
  auto req = request("crash2");
  ASSERT_NO_FATAL_FAILURE(crash_on_first_delivery(
      req,
      [&] {
        ASSERT_NO_FATAL_FAILURE(record_placement(req, "s-1"));
        ASSERT_NO_FATAL_FAILURE(store_scheduled(req, "s-1"));
      },
      500ms));
  ASSERT_NO_FATAL_FAILURE(start_after_crash("s"));
  expect_running_on("crash2", "s-1");
  EXPECT_EQ(finished_from_record(), 1u);
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().scheduled; }), 0u)
      << "finishing from the record is not a new placement";
}

// Record read behind the write (docs/reliability.md): in a cluster, a redelivery read no placement
// record though the build was SCHEDULED (the record's stream had a new leader that had not applied
// it yet) and dropped the request as a duplicate: the build stayed SCHEDULED forever. Here the
// record shows up only after the first redelivery: the scheduler must wait for it, then finish on
// its node.
TEST_F(SchedulerFleet, ScheduledWithoutARecordYetIsRetriedNotDropped) {
  auto req = request("crash5");
  ASSERT_NO_FATAL_FAILURE(crash_on_first_delivery(
      req, [&] { ASSERT_NO_FATAL_FAILURE(store_scheduled(req, "r-1")); }, 500ms));
  sched_config_.retry_delay = 200ms;
  ASSERT_NO_FATAL_FAILURE(start_after_crash("r"));
  ASSERT_TRUE(test::wait_until(
      [&] { return harness_->on_scheduler(0, [](auto& s) { return s.counts().retried; }) > 0; },
      20s))
      << "the redelivery was not retried (dropped as a duplicate?)";
  // The record becomes readable: the next delivery finishes the placement there.
  ASSERT_NO_FATAL_FAILURE(record_placement(req, "r-1"));
  expect_running_on("crash5", "r-1");
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().duplicates; }), 0u);
  EXPECT_EQ(finished_from_record(), 1u);
}

// Expired hold at redelivery (docs/reliability.md): a replica recorded the placement on node A and
// crashed before sending the assignment. Its capacity hold lasts as long as the ack wait, so by the
// redelivery it has expired and the room may have gone to other builds. The redelivery must hold
// the room again (compare-and-set) before it sends the assignment: here A is full, so the build is
// placed afresh on B (never over capacity on A) with one terminal event; `room_left` is the control
// where A still has room and the build finishes there, holding it again.
class ExpiredHoldRedelivery : public SchedulerFleet {
 protected:
  // The crashed replica's work: the record on `node`, the hold it wrote already expired, and
  // (when `filler_cpu` > 0) a hold of another build that took the room meanwhile.
  void crash_after_record(const cvm::v1::BuildRequest& req, const std::string& node,
                          uint64_t filler_cpu) {
    auto capacity = client_->ensure_kv(service::capacity_bucket());
    ASSERT_TRUE(capacity.ok());
    const int64_t now = clock_.now_unix_ms();
    cvm::v1::CapacityLedger ledger;
    ledger.set_node_id(node);
    auto* own = ledger.add_holds();
    own->set_build_id(req.build_id());
    own->set_cpu_millicores(req.resources().cpu_millicores());
    own->set_memory_bytes(req.resources().memory_bytes());
    own->set_expires_unix_ms(now - 1000);
    if (filler_cpu > 0) {
      auto* other = ledger.add_holds();
      other->set_build_id("filler");
      other->set_cpu_millicores(filler_cpu);
      other->set_memory_bytes(kGiB);
      other->set_expires_unix_ms(now + 600'000);
    }
    ASSERT_TRUE(capacity->put(node, ledger.SerializeAsString()).ok());
    // The crash comes before the assignment was stored. The delay lets the new scheduler load
    // the nodes and ledgers before the redelivery comes.
    ASSERT_NO_FATAL_FAILURE(crash_on_first_delivery(
        req, [&] { record_placement(req, node); }, 3s));
  }
};

TEST_F(ExpiredHoldRedelivery, FullRecordedNodeGetsNoAssignmentBuildIsPlacedAfresh) {
  auto req = request("crash3", 3000, kGiB);
  ASSERT_NO_FATAL_FAILURE(crash_after_record(req, "h-1", 3000));  // h-1: 1,000 mCPU left
  ASSERT_NO_FATAL_FAILURE(start_after_crash("h"));
  expect_running_on("crash3", "h-0");
  EXPECT_EQ(harness_->on_fleet([](auto& f) { return f.stats().over_capacity; }), 0u);
  EXPECT_EQ(harness_->on_fleet([](auto& f) { return f.stats().launched_twice; }), 0u);
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().moved_no_room; }), 1u);
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().failed; }), 0u);
  // Nothing was sent to h-1: its work subject holds no assignment.
  auto on_h1 =
      client_->last_message(std::string(wire::kStreamNodeWork), wire::node_work_subject("h-1"));
  ASSERT_TRUE(on_h1.ok());
  EXPECT_FALSE(on_h1->has_value()) << "an assignment went to the full node";
  // The old record names the new node, so a late look at it sees where the build went.
  auto placements = client_->ensure_kv(service::placements_bucket());
  ASSERT_TRUE(placements.ok());
  auto old = placements->get("h-1.crash3");
  ASSERT_TRUE(old.ok() && old->has_value());
  cvm::v1::PlacementRecord rec;
  ASSERT_TRUE(rec.ParseFromString((*old)->value));
  EXPECT_EQ(rec.assignment().node_id(), "h-0");
  EXPECT_EQ(rec.replaced_node_id(), "h-1");
  // One terminal event, and the SCHEDULED on h-0 says why it moved.
  std::vector<cvm::v1::BuildEvent> events;
  auto reader =
      client_->read_stream(std::string(wire::kStreamEvents), wire::build_events_subject("crash3"));
  ASSERT_TRUE(reader.ok());
  for (;;) {
    auto m = (*reader)->next(1s);
    ASSERT_TRUE(m.ok());
    if (!m->has_value()) break;
    ASSERT_TRUE(events.emplace_back().ParseFromString((*m)->message.data));
  }
  int terminal = 0;
  bool said_why = false;
  for (const auto& ev : events) {
    terminal += is_terminal_phase(ev.phase());
    said_why |= ev.phase() == cvm::v1::SCHEDULED && ev.node_id() == "h-0" &&
                ev.reason() == cvm::v1::INSUFFICIENT_CAPACITY;
  }
  EXPECT_EQ(terminal, 1);
  EXPECT_TRUE(said_why);
}

TEST_F(ExpiredHoldRedelivery, RoomLeftOnRecordedNodeFinishesThereHoldingItAgain) {
  auto req = request("crash4", 3000, kGiB);
  ASSERT_NO_FATAL_FAILURE(crash_after_record(req, "g-1", 0));
  ASSERT_NO_FATAL_FAILURE(start_after_crash("g"));
  expect_running_on("crash4", "g-1");
  EXPECT_EQ(finished_from_record(), 1u);
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().moved_no_room; }), 0u);
  // The hold is in force again on g-1 (written before the assignment went out).
  auto capacity = client_->ensure_kv(service::capacity_bucket());
  ASSERT_TRUE(capacity.ok());
  auto entry = capacity->get("g-1");
  ASSERT_TRUE(entry.ok() && entry->has_value());
  cvm::v1::CapacityLedger ledger;
  ASSERT_TRUE(ledger.ParseFromString((*entry)->value));
  bool held = false;
  for (const auto& h : ledger.holds()) {
    held |= h.build_id() == "crash4" && h.expires_unix_ms() > clock_.now_unix_ms();
  }
  EXPECT_TRUE(held);
}

// The decision of the last delivery (docs/reliability.md, "Giving up"): FAILED unless that could be
// a second terminal event; the message is termed (dead-lettered) in every case.
TEST(GiveUpAction, FailsOnlyWhenThatCannotBeASecondTerminalEvent) {
  using scheduler::give_up_action;
  using scheduler::GiveUp;
  EXPECT_EQ(give_up_action(true, std::nullopt, false, false), GiveUp::kFailAndTerm);
  EXPECT_EQ(give_up_action(true, cvm::v1::PENDING, false, false), GiveUp::kFailAndTerm);
  EXPECT_EQ(give_up_action(false, std::nullopt, false, false), GiveUp::kTermOnly);  // a notice
  EXPECT_EQ(give_up_action(true, cvm::v1::RUNNING, false, false), GiveUp::kTermOnly);
  EXPECT_EQ(give_up_action(true, cvm::v1::FAILED, false, true), GiveUp::kTermOnly);
  // Recorded: the assignment may be out, the node may end the build itself.
  EXPECT_EQ(give_up_action(true, cvm::v1::SCHEDULED, true, false), GiveUp::kTermOnly);
  // Placed again after a lost node: that node runs nothing, so FAILED is the one terminal event.
  EXPECT_EQ(give_up_action(true, cvm::v1::SCHEDULED, true, true), GiveUp::kFailAndTerm);
}

// A redelivered START (docs/reliability.md, "Record read behind the write"): finish a recorded
// placement; without a record, drop it only when the build has ended, place it when it has no event
// (or the lookup failed), and retry while an event that cannot come before the record (SCHEDULED)
// shows that the record read is behind.
TEST(RedeliveredStartAction, NeverDropsABuildThatHasNotEnded) {
  using scheduler::redelivered_start_action;
  using scheduler::RedeliveredStart;
  EXPECT_EQ(redelivered_start_action(true, std::nullopt), RedeliveredStart::kFinishRecorded);
  EXPECT_EQ(redelivered_start_action(true, cvm::v1::SCHEDULED), RedeliveredStart::kFinishRecorded);
  EXPECT_EQ(redelivered_start_action(false, std::nullopt), RedeliveredStart::kPlace);
  EXPECT_EQ(redelivered_start_action(false, cvm::v1::SCHEDULED), RedeliveredStart::kRetryLater);
  EXPECT_EQ(redelivered_start_action(false, cvm::v1::PREPARING), RedeliveredStart::kRetryLater);
  for (auto ended : {cvm::v1::RUNNING, cvm::v1::STOPPED, cvm::v1::FAILED}) {
    EXPECT_EQ(redelivered_start_action(false, ended), RedeliveredStart::kDropDuplicate);
  }
}

// A build submitted again after it was decided (another msg-id, so the stream keeps both) is
// dropped: no second placement, no second SCHEDULED, and the first placement's capacity hold stays
// (the duplicate's decision ran alongside the lookup and found the build's own hold).
TEST_F(SchedulerFleet, ResubmittedBuildIsDroppedNotPlacedAgain) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 2;
  fleet.profiles = {vm()};
  fleet.prefix = "d";
  fleet.launch_delay = 5ms;
  start(fleet, 1);

  auto req = request("dup1");
  submit(req);
  auto first = wait_phase("dup1", {cvm::v1::RUNNING, cvm::v1::FAILED});
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->phase(), cvm::v1::RUNNING) << first->message();

  ASSERT_TRUE(client_
                  ->js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(),
                               "dup1-resubmitted")
                  .ok());
  ASSERT_TRUE(test::wait_until(
      [&] { return harness_->on_scheduler(0, [](auto& s) { return s.counts().duplicates; }) >= 1; },
      10s))
      << "the resubmission was never handled";
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().scheduled; }), 1u);
  const auto stats = harness_->on_fleet([](auto& f) { return f.stats(); });
  EXPECT_EQ(stats.assignments, 1u);
  EXPECT_EQ(stats.launched, 1u);
  EXPECT_EQ(stats.duplicate_launches, 0u);
  auto last = last_event("dup1");
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->phase(), cvm::v1::RUNNING) << "nothing was published after RUNNING";

  // The hold written for the first delivery is still in the node's ledger.
  auto capacity = client_->ensure_kv(service::capacity_bucket());
  ASSERT_TRUE(capacity.ok());
  auto ledger = capacity->get(first->node_id());
  ASSERT_TRUE(ledger.ok() && ledger->has_value());
  cvm::v1::CapacityLedger l;
  ASSERT_TRUE(l.ParseFromString((*ledger)->value));
  ASSERT_EQ(l.holds_size(), 1);
  EXPECT_EQ(l.holds(0).build_id(), "dup1");
}

// Many requests in flight on one replica, all fitting on one node only with bin-packing: the
// holds queued for that node are written together (group commit) and never exceed its room.
TEST_F(SchedulerFleet, PipelinedHoldsOnOneNodeNeverExceedItsRoom) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 3;
  fleet.profiles = {vm(8000, 16 * kGiB)};  // 8 builds of 1 CPU each per node
  fleet.prefix = "g";
  // No node reports what it runs during the test (no launch, no periodic heartbeat), so the
  // room is exactly what the holds leave.
  fleet.launch_delay = 60s;
  fleet.heartbeat_interval = 60s;
  start(fleet, 1);

  fleetsim::LoadConfig load;
  load.nats_url = nats_.url();
  load.requests = 40;  // room for 24
  load.prefix = "g";
  load.cpu_millicores = 1000;
  load.memory_bytes = kGiB;
  auto report = fleetsim::run_load(load);  // no rate, no window: all at once
  ASSERT_TRUE(report.ok()) << report.error().message;
  EXPECT_EQ(report->undecided, 0);
  EXPECT_EQ(report->scheduled, 24) << "every slot is used, none twice";
  EXPECT_EQ(report->failed, 16);
  const auto stats = harness_->on_fleet([](auto& f) { return f.stats(); });
  EXPECT_EQ(stats.over_capacity, 0u);
  EXPECT_EQ(stats.launched_twice, 0u);
}

// Silent node watch (docs/reliability.md): a replica whose cvm_nodes watch goes silent (in a
// cluster, a stream leader election kept cnats recreating the watch's ordered consumer for 25 s)
// must not take its own blindness for dead nodes: no lost notice while KV shows the nodes
// heartbeating, and a build that only failed on "node not live" is retried, not FAILED. The watch
// is silenced here by deleting its consumer on the server, again and again, for longer than the
// node TTL, while the nodes keep heartbeating.
TEST_F(SchedulerFleet, ASilentNodeWatchIsNotTakenForDeadNodes) {
  sched_config_.retry_delay = 300ms;
  start_fast_liveness("w");

  const auto silence_watch = [&] {
    auto names =
        client_->request("$JS.API.CONSUMER.NAMES.KV_" + std::string(wire::kBucketNodes), "{}", 2s);
    if (!names) return;
    const auto j = nlohmann::json::parse(names->data, nullptr, false);
    if (!j.is_object() || !j.contains("consumers") || !j["consumers"].is_array()) return;
    for (const auto& c : j["consumers"]) {
      if (!c.is_string()) continue;
      (void)client_->request("$JS.API.CONSUMER.DELETE.KV_" + std::string(wire::kBucketNodes) + "." +
                                 c.get<std::string>(),
                             "", 2s);
    }
  };
  const auto until = std::chrono::steady_clock::now() + 4s;  // > 2 x the TTL
  bool submitted = false;
  while (std::chrono::steady_clock::now() < until) {
    silence_watch();
    if (!submitted && std::chrono::steady_clock::now() > until - 1500ms) {
      submit(request("during"));  // every node looks dead to the scheduler by now
      submitted = true;
    }
    std::this_thread::sleep_for(100ms);
  }
  auto e = wait_phase("during", {cvm::v1::RUNNING, cvm::v1::FAILED}, 30s);
  ASSERT_TRUE(e.has_value()) << "never ran nor failed";
  EXPECT_EQ(e->phase(), cvm::v1::RUNNING) << e->message();
  EXPECT_EQ(harness_->on_scheduler(0, [](auto& s) { return s.counts().nodes_lost; }), 0u)
      << "a node was declared lost while it heartbeated";
}

// The other side of that fix: when every node dies the watch goes silent too, and the loss
// is declared once KV confirms the heartbeats are as old as the watch said.
TEST_F(SchedulerFleet, EveryNodeDeadIsStillDeclaredLost) {
  start_fast_liveness("d");
  submit(request("ran"));
  auto running = wait_phase("ran", {cvm::v1::RUNNING, cvm::v1::FAILED});
  ASSERT_TRUE(running.has_value());
  ASSERT_EQ(running->phase(), cvm::v1::RUNNING) << running->message();
  harness_->on_fleet([](auto& f) {
    f.kill("d-0");
    f.kill("d-1");
    return 0;
  });
  auto lost = wait_phase("ran", {cvm::v1::LOST}, 20s);
  ASSERT_TRUE(lost.has_value()) << "the running workspace never heard of its node's loss";
  EXPECT_EQ(lost->reason(), cvm::v1::NODE_LOST);
  EXPECT_TRUE(test::wait_until(
      [&] { return harness_->on_scheduler(0, [](auto& s) { return s.counts().nodes_lost; }) == 2; },
      10s))
      << "both nodes are lost";
}

// A hold counts on top of what the node reports allocated only until the node's NodeStatus lists
// the build (allocated_builds): then the room is counted once, not for the 30 s of the hold.
TEST_F(SchedulerFleet, AHoldStopsCountingOnceTheNodeReportsItsBuild) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 1;
  fleet.profiles = {vm(4000, 16 * kGiB)};
  fleet.prefix = "once";
  fleet.launch_delay = 10ms;  // a NodeStatus right after the launch (heartbeat_on_change)
  start(fleet, 1);
  ASSERT_EQ(sched_config_.reservation_hold, 30s) << "the hold outlives the whole test";

  submit(request("a", 3000));
  expect_running_on("a", "once-0");
  ASSERT_TRUE(test::wait_until(
      [&] {
        return harness_->on_scheduler(0, [](auto& s) {
          const auto* n = s.node("once-0");
          return n != nullptr && n->allocated_builds.size() == 1 &&
                 n->allocated_builds[0].build_id == "a";
        });
      },
      10s))
      << "the scheduler never saw the node report build a";
  // 4000 - 3000 allocated = 1000 free; counting a's hold again would leave none.
  submit(request("b", 1000));
  expect_running_on("b", "once-0");
  // Counted once, not zero times: nothing is left.
  submit(request("c", 1000));
  auto c = wait_phase("c", {cvm::v1::FAILED, cvm::v1::SCHEDULED});
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->phase(), cvm::v1::FAILED) << c->message();
  EXPECT_EQ(harness_->on_fleet([](auto& f) { return f.stats().over_capacity; }), 0u);
}

// A build that FAILED on its node gives its room back at once: the node's agent recorded FAILED,
// and the scheduler drops the build's hold instead of counting it until the hold expires (30 s),
// which made a node with a few failed builds look full.
TEST_F(SchedulerFleet, AFailedBuildReleasesItsHoldAtOnce) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 1;
  fleet.profiles = {vm(4000, 16 * kGiB)};
  fleet.prefix = "fail";
  fleet.launch_delay = 10ms;
  fleet.fail_image = "oci:/images/broken:1";
  start(fleet, 1);
  ASSERT_EQ(sched_config_.reservation_hold, 30s) << "the hold outlives the whole test";

  auto broken = request("f1", 3000);
  broken.set_image(fleet.fail_image);
  submit(broken);
  auto f1 = wait_phase("f1", {cvm::v1::FAILED, cvm::v1::RUNNING});
  ASSERT_TRUE(f1.has_value());
  ASSERT_EQ(f1->phase(), cvm::v1::FAILED) << f1->message();
  ASSERT_TRUE(test::wait_until(
      [&] {
        return harness_->on_scheduler(0, [](auto& s) {
          const auto* n = s.node("fail-0");
          return n != nullptr && n->reserved_cpu_millicores == 0;
        });
      },
      10s))
      << "the failed build's hold still counts on the node";
  // 4000 free again: a 3000 build fits, where the stale hold would have left 1000.
  submit(request("ok", 3000));
  expect_running_on("ok", "fail-0");
  EXPECT_EQ(harness_->on_fleet([](auto& f) { return f.stats().over_capacity; }), 0u);
}

// A node that stops heartbeating for the TTL is lost: the build assigned there but not running is
// placed again on another node, the running workspace gets LOST / NODE_LOST, its GPU lease is
// released, and the schedulers' holds on the node are dropped.
TEST_F(SchedulerFleet, LostNodeBuildsArePlacedAgainRunningOnesMarkedLost) {
  sched_config_.node_ttl = 1500ms;
  sched_config_.sweep_interval = 100ms;
  fleetsim::FleetConfig fleet;
  fleet.nodes = 2;
  fleet.prefix = "m";
  fleet.heartbeat_interval = 200ms;
  fleetsim::Profile metal = vm(16'000, 64 * kGiB);
  metal.bare_metal = true;
  metal.gpus = 4;
  metal.gpu_memory_bytes = 40 * kGiB;
  fleet.profiles = {metal};
  start(fleet, 2);

  auto gpu_req = request("run1");
  gpu_req.mutable_resources()->mutable_gpu()->set_count(1);
  submit(gpu_req);
  auto running = wait_phase("run1", {cvm::v1::RUNNING, cvm::v1::FAILED});
  ASSERT_TRUE(running.has_value());
  ASSERT_EQ(running->phase(), cvm::v1::RUNNING) << running->message();
  const std::string lost = running->node_id();
  const std::string other = lost == "m-0" ? "m-1" : "m-0";
  ASSERT_EQ(running->gpu_uuids_size(), 1);
  auto leases = client_->ensure_kv(service::gpu_leases_bucket());
  ASSERT_TRUE(leases.ok());
  ASSERT_TRUE(test::wait_until(
      [&] {
        auto k = leases->keys();
        return k.ok() && k->size() == 1;
      },
      5s));

  // The host hangs: no more heartbeats, assignments go unanswered. Binpack still prefers it until
  // the TTL runs out, so the next build lands there and never runs.
  harness_->on_fleet([&](auto& f) {
    f.kill(lost);
    return 0;
  });
  submit(request("stuck1"));
  auto first = wait_phase("stuck1", {cvm::v1::SCHEDULED, cvm::v1::FAILED});
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->phase(), cvm::v1::SCHEDULED);
  ASSERT_EQ(first->node_id(), lost) << "the test needs the build to land on the dying node";

  auto again = wait_phase("stuck1", {cvm::v1::RUNNING, cvm::v1::FAILED}, 20s);
  ASSERT_TRUE(again.has_value()) << "never placed again";
  EXPECT_EQ(again->phase(), cvm::v1::RUNNING) << again->message();
  EXPECT_EQ(again->node_id(), other);

  auto lost_event = wait_phase("run1", {cvm::v1::LOST}, 20s);
  ASSERT_TRUE(lost_event.has_value()) << "the running workspace never heard of its node's loss";
  EXPECT_EQ(lost_event->reason(), cvm::v1::NODE_LOST);
  EXPECT_EQ(lost_event->node_id(), lost);

  EXPECT_TRUE(test::wait_until(
      [&] {
        auto k = leases->keys();
        return k.ok() && k->empty();
      },
      10s))
      << "the lost node's GPU lease was not released";
  auto ws = client_->ensure_kv(service::workspaces_bucket());
  ASSERT_TRUE(ws.ok());
  auto rec = ws->get("ws-run1");
  ASSERT_TRUE(rec.ok() && rec->has_value());
  cvm::v1::WorkspaceRecord r;
  ASSERT_TRUE(r.ParseFromString((*rec)->value));
  EXPECT_EQ(r.phase(), cvm::v1::LOST);
  EXPECT_EQ(r.reason(), cvm::v1::NODE_LOST);

  auto audit = fleetsim::audit_events(nats_.url(), {"run1", "stuck1"}, 500ms, 20s);
  ASSERT_TRUE(audit.ok());
  EXPECT_TRUE(audit->problems.empty()) << audit->problems.front();
  uint64_t handled = 0;
  for (size_t i = 0; i < 2; ++i) {
    handled += harness_->on_scheduler(i, [](auto& s) { return s.counts().nodes_lost; });
  }
  EXPECT_EQ(handled, 1u) << "two replicas saw the loss; exactly one handles it";
}

// A lost node's sweep reads and writes one record at a time: on a node with thousands of
// workspaces that is seconds, and placements must go on meanwhile. A build submitted while the
// sweep of 3,000 running workspaces is under way is SCHEDULED before the sweep is done; the sweep
// still marks every one of them LOST.
TEST_F(SchedulerFleet, PlacementsGoOnWhileALostNodeIsSwept) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 2;
  fleet.prefix = "p";
  fleet.profiles = {vm()};
  start(fleet, 1, /*broker=*/false);

  // Workspaces of a node the scheduler has never heard of (so no heartbeat overrules the notice).
  constexpr int kOnGhost = 3000;
  auto ws = client_->ensure_kv(service::workspaces_bucket());
  ASSERT_TRUE(ws.ok());
  for (int i = 0; i < kOnGhost; ++i) {
    cvm::v1::WorkspaceRecord r;
    r.set_workspace_id("ws-ghost-" + std::to_string(i));
    r.set_build_id("ghost-" + std::to_string(i));
    r.set_node_id("ghost");
    r.set_phase(cvm::v1::RUNNING);
    ASSERT_TRUE(ws->put(r.workspace_id(), r.SerializeAsString()).ok());
  }
  // In the order the server has them: how many LOST events came before the build's SCHEDULED.
  std::atomic<int> lost_events{0};
  std::atomic<int> lost_before_scheduled{-1};
  auto sub = client_->subscribe("cvm.v1.builds.*.events", "", [&](bus::Message m) {
    cvm::v1::BuildEvent e;
    if (!e.ParseFromString(m.data)) return;
    if (e.phase() == cvm::v1::LOST) ++lost_events;
    if (e.build_id() == "meanwhile" && e.phase() == cvm::v1::SCHEDULED) {
      lost_before_scheduled = lost_events.load();
    }
  });
  ASSERT_TRUE(sub.ok());

  cvm::v1::NodeLostNotice notice;
  notice.set_node_id("ghost");
  notice.set_last_heartbeat_unix_ms(clock_.now_unix_ms() - 60'000);
  ASSERT_TRUE(client_
                  ->js_publish(std::string(wire::kBuildsSubmit), notice.SerializeAsString(),
                               "lost.ghost", {{std::string(scheduler::kHeaderNodeLost), "ghost"}})
                  .ok());
  ASSERT_TRUE(test::wait_until([&] { return lost_events.load() > 0; }, 20s))
      << "the sweep never started";

  submit(request("meanwhile"));
  ASSERT_TRUE(test::wait_until([&] { return lost_before_scheduled.load() >= 0; }, 20s))
      << "never SCHEDULED";
  EXPECT_LT(lost_before_scheduled.load(), kOnGhost) << "the build waited for the whole sweep";

  ASSERT_TRUE(test::wait_until(
      [&] { return harness_->on_scheduler(0, [](auto& s) { return s.counts().nodes_lost; }) == 1; },
      120s))
      << "the sweep never finished";
  EXPECT_EQ(lost_events.load(), kOnGhost);
  auto last = ws->get("ws-ghost-" + std::to_string(kOnGhost - 1));
  ASSERT_TRUE(last.ok() && last->has_value());
  cvm::v1::WorkspaceRecord r;
  ASSERT_TRUE(r.ParseFromString((*last)->value));
  EXPECT_EQ(r.phase(), cvm::v1::LOST);
}

// Settings come from KV cvm_settings and apply from the next build: CVMs disabled, "default to
// CVM" off with the workspace's own override, and the scoring strategy.
TEST_F(SchedulerFleet, SettingsApplyFromTheNextBuild) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 2;
  fleet.prefix = "s";
  fleetsim::Profile enforcing = vm();
  enforcing.selinux_enabled = enforcing.selinux_enforcing = true;
  fleet.profiles = {enforcing};
  start(fleet, 1, false);

  // Defaults: CVMs on and the default, so SELinux-enforcing nodes cannot take it.
  submit(request("d1"));
  auto e = wait_phase("d1", {cvm::v1::FAILED, cvm::v1::SCHEDULED, cvm::v1::RUNNING});
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e->reason(), cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(e->message(), "0/2 nodes fit: 2 SELinux enforcing");

  // A workspace that opts out of CVMs runs as a plain container, which SELinux does not stop.
  auto plain = request("p1");
  plain.set_use_cvm(false);
  submit(plain);
  e = wait_phase("p1", {cvm::v1::FAILED, cvm::v1::RUNNING});
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::RUNNING) << e->message();

  // "Default to CVM" off: plain containers by default, a workspace may still ask for a CVM.
  cvm::v1::InfrastructureSettings s;
  s.set_default_to_cvm(false);
  put_settings(s);
  std::optional<cvm::v1::BuildEvent> got;
  int n = 0;
  ASSERT_TRUE(test::wait_until(
      [&] {
        // The watch delivers the change asynchronously: new builds until one sees it.
        const std::string id = "nd" + std::to_string(n++);
        submit(request(id));
        got = wait_phase(id, {cvm::v1::FAILED, cvm::v1::RUNNING});
        return got && got->phase() == cvm::v1::RUNNING;
      },
      15s, 1ms));
  auto cvm_req = request("c1");
  cvm_req.set_use_cvm(true);
  submit(cvm_req);
  e = wait_phase("c1", {cvm::v1::FAILED, cvm::v1::RUNNING});
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->phase(), cvm::v1::FAILED);
  EXPECT_EQ(e->reason(), cvm::v1::NO_ELIGIBLE_NODE);

  // CVMs disabled: an explicit CVM request is refused with its own reason.
  s.set_cvm_enabled(false);
  put_settings(s);
  ASSERT_TRUE(test::wait_until(
      [&] {
        const std::string id = "x" + std::to_string(n++);
        auto r = request(id);
        r.set_use_cvm(true);
        submit(r);
        got = wait_phase(id, {cvm::v1::FAILED, cvm::v1::RUNNING});
        return got && got->reason() == cvm::v1::CVM_DISABLED;
      },
      15s, 1ms));
}

TEST_F(SchedulerFleet, SpreadSettingSpreadsBinpackPacks) {
  fleetsim::FleetConfig fleet;
  fleet.nodes = 4;
  fleet.prefix = "sp";
  fleet.profiles = {vm(16'000, 64 * kGiB)};
  start(fleet, 1, false);
  auto nodes_used = [&](const std::string& prefix, int count) {
    std::set<std::string> used;
    for (int i = 0; i < count; ++i) {
      const std::string id = prefix + std::to_string(i);
      submit(request(id));
      auto e = wait_phase(id, {cvm::v1::RUNNING, cvm::v1::FAILED});
      if (e && e->phase() == cvm::v1::RUNNING) used.insert(e->node_id());
    }
    return used.size();
  };
  EXPECT_EQ(nodes_used("bp", 4), 1u) << "binpack (the default) fills one node first";
  cvm::v1::InfrastructureSettings s;
  s.set_scoring(cvm::v1::SPREAD);
  put_settings(s);
  // Wait until the replica applies it: a spread decision avoids the busiest node.
  int n = 0;
  ASSERT_TRUE(test::wait_until(
      [&] {
        const std::string id = "spw" + std::to_string(n++);
        submit(request(id));
        auto e = wait_phase(id, {cvm::v1::RUNNING, cvm::v1::FAILED});
        return e && e->phase() == cvm::v1::RUNNING && e->node_id() != "sp-0";
      },
      15s, 1ms));
  EXPECT_GE(nodes_used("spr", 3), 2u) << "spread puts them on different, emptier nodes";
}

}  // namespace
}  // namespace cvm
