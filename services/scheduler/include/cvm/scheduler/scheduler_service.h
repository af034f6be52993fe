#pragma once
// The scheduler's wiring: CVM_BUILDS in, NodeAssignments and BuildEvents out. The decisions are in
// placement.h, ledger.h and liveness.h; this class only moves data between the bus and them, on
// one executor thread (a lost node's record-by-record sweep runs on a thread of its own, see
// sweep_lost_node). Several replicas may run at once (they share the durable consumer):
//
//   decide (in-memory index)  ->  hold capacity (CAS on KV cvm_capacity)  ->  GPUs (broker)
//   ->  record the placement (KV cvm_placements, "<node>.<build>")  ->  NodeAssignment
//   ->  SCHEDULED  ->  ack
//
// The record is written before the assignment, so a request redelivered after a crash anywhere in
// that chain finds it and finishes on the same node instead of deciding again.
//
// Pipelined: up to max_in_flight requests move through that chain at once, each step an
// asynchronous bus call whose completion comes back to the executor. The decision and the
// in-memory view of the holds stay on the one thread; the duplicate lookup runs alongside the
// first capacity hold; holds on one node are written one compare-and-set at a time, each write
// carrying every hold queued for the node meanwhile (a group commit: bin-packing sends many
// requests to the same node), and the holds not yet written already count in the index so the
// next decisions do not pick room that is promised. The assignment and SCHEDULED go out together
// after the record; a redelivery finds the record before looking for events, so a crash between
// the two still ends with both sent.

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/clock.h"
#include "cvm/bus/bus.h"
#include "cvm/scheduler/liveness.h"
#include "cvm/scheduler/placement.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/node.pb.h"
#include "cvm/v1/settings.pb.h"

namespace cvm::scheduler {

// Headers on cvm.v1.builds.submit that only schedulers publish (CVM_BUILDS is their work queue):
// a node-lost notice, and a build to place again because its node was lost.
inline constexpr std::string_view kHeaderNodeLost = "Cvm-Node-Lost";
inline constexpr std::string_view kHeaderPlaceAgain = "Cvm-Place-Again-From";

// What the last delivery of a request that failed once more does (pure; give_up does the I/O).
// The server delivers no more after it, so the message is always termed (a dead letter); the build
// gets FAILED unless that could be its second terminal event.
enum class GiveUp : uint8_t { kTermOnly, kFailAndTerm };
// has_build: the message names a build (not a node-lost notice, not unreadable); last_phase: the
// build's newest event; has_record: a START whose placement was recorded (its assignment may be
// out); place_again: a request to move a build off a lost node.
GiveUp give_up_action(bool has_build, std::optional<cvm::v1::Phase> last_phase, bool has_record,
                      bool place_again);

// What a redelivered START does, from what a previous delivery left: its placement record (found
// or not) and the build's newest event (none, or its phase; nullopt also when the lookup failed).
// A START has no event before its record is stored, so an event that does not end the build with
// no record found is a read that has not caught up (docs/reliability.md, "Record read behind the
// write"): retried, never dropped.
enum class RedeliveredStart : uint8_t { kFinishRecorded, kPlace, kDropDuplicate, kRetryLater };
RedeliveredStart redelivered_start_action(bool has_record,
                                          std::optional<cvm::v1::Phase> last_phase);

struct SchedulerConfig {
  std::chrono::milliseconds node_ttl{kDefaultLivenessTtlMs};
  // How long a capacity hold counts on top of the node's own NodeStatus.allocated (the agent
  // reports a workspace once it has received its assignment, on its next heartbeat).
  std::chrono::milliseconds reservation_hold{30000};
  std::chrono::milliseconds gpu_reserve_timeout{2000};
  std::chrono::milliseconds retry_delay{2000};  // nak delay when a peer or the bus is down
  // How often expired holds are dropped from the index and heartbeats are checked.
  std::chrono::milliseconds sweep_interval{1000};
  bool detect_lost_nodes = true;
  // The node watch is taken as stale when it has delivered nothing for this long (0: node_ttl / 2)
  // while nodes are registered. A stale view declares no node lost without reading its NodeStatus
  // from KV first, and a build that fails only because nodes look dead is retried, not FAILED:
  // a scheduler whose watch stalls (a JetStream leader election in a cluster recreating its
  // ordered consumers for tens of seconds, docs/reliability.md "Silent node watch") must not take
  // its own blindness for dead nodes.
  std::chrono::milliseconds node_view_silence{0};
  int max_deliver = 20;
  uint32_t max_candidates = 3;
  int cas_attempts = 4;  // compare-and-set tries on one node before moving to the next candidate
  // Requests being placed at once by this replica (fetched ones beyond it wait in memory).
  size_t max_in_flight = 256;
  std::chrono::milliseconds bus_timeout{5000};  // for each asynchronous JetStream step
  Sampling sampling = Sampling::kNone;
  uint32_t sample_percent = 100;
  // Keeps per-stage times of every placement for stage_report() (the fleet simulator's
  // --stages): where submit->SCHEDULED goes. Off in the service (it grows with every request).
  bool trace_stages = false;
};

class SchedulerService {
 public:
  SchedulerService(boost::asio::io_context& io, bus::ConnectionPtr conn,
                   telemetry::Metrics& metrics, const Clock& clock, SchedulerConfig config);
  ~SchedulerService();
  SchedulerService(const SchedulerService&) = delete;
  SchedulerService& operator=(const SchedulerService&) = delete;

  // Ensures streams and buckets, starts the watches and the consumer.
  Status start();
  void stop();

  // Counters for tests and the fleet simulator's report (read on the io thread).
  struct Counts {
    uint64_t scheduled = 0;
    uint64_t failed = 0;
    uint64_t cas_conflicts = 0;
    uint64_t placed_again = 0;
    uint64_t nodes_lost = 0;
    uint64_t finished_from_record = 0;
    uint64_t duplicates = 0;  // requests of builds decided already, dropped
    uint64_t given_up = 0;    // requests termed on their last delivery
    uint64_t retried = 0;     // deliveries naked for a later try
    // Redelivered placements whose recorded node had no room left (their hold had expired), placed
    // afresh.
    uint64_t moved_no_room = 0;
  };
  [[nodiscard]] const Counts& counts() const { return counts_; }
  // Requests between fetch and ack/nak/term (tests: back to 0 once the stream is drained).
  [[nodiscard]] size_t in_flight() const { return in_flight_; }
  [[nodiscard]] size_t nodes() const { return index_.size(); }
  // The index's copy of a node's NodeStatus (null when unknown); on the service's thread.
  [[nodiscard]] const NodeRecord* node(std::string_view node_id) const {
    return index_.find(node_id);
  }
  // With trace_stages: percentiles of each stage of a placement (stored in CVM_BUILDS -> fetched
  // -> on the executor -> capacity held -> duplicate lookup in -> recorded -> assignment and
  // SCHEDULED acknowledged), and the mean of each stage over the slowest 1%.
  [[nodiscard]] std::string stage_report() const;

 private:
  struct Meters;
  struct Placement;  // one request on its way through the pipeline (scheduler_service.cpp)
  using PlacementPtr = std::shared_ptr<Placement>;
  struct CachedLedger {
    cvm::v1::CapacityLedger ledger;
    uint64_t revision = 0;  // 0: no key (create it)
    uint64_t last_seq = 0;  // the key's last revision, delete markers included (what a CAS expects)
  };
  // kAlreadyHeld: the build held room there already (a previous delivery's hold, not ours to drop
  // when this one turns out to be a duplicate).
  enum class HoldOutcome : uint8_t { kHeld, kAlreadyHeld, kNoRoom, kError };
  // A hold to add to (or, with remove, drop from) one node's ledger.
  struct PendingHold {
    std::string build_id;
    Reservation amount;
    bool remove = false;
    bool renewal = false;  // the build held room already: answered kAlreadyHeld once written
    int attempts = 0;
    std::function<void(HoldOutcome)> done;  // may be empty (removals)
  };
  // This replica's writes to one node's ledger: one compare-and-set in flight at a time.
  struct NodeWrites {
    bool busy = false;                 // a write or a re-read of the ledger is in flight
    std::vector<PendingHold> writing;  // in the write in flight
    std::vector<PendingHold> queued;   // for the next write
  };

  void on_build(const bus::JsMessagePtr& msg);
  void handle_build(const bus::JsMessagePtr& msg);
  void pump();
  void handle_redelivered_start(const cvm::v1::BuildRequest& req, const bus::JsMessagePtr& msg);
  void handle_place_again(const cvm::v1::BuildRequest& req, const std::string& lost_node,
                          const bus::JsMessagePtr& msg);
  void handle_node_lost(const bus::JsMessagePtr& msg);
  // What a lost node's sweep did off the executor, for the executor to finish.
  struct LostSweep {
    std::string retry;  // set: the notice is retried later, for this reason
    std::vector<std::pair<std::string, std::string>> leases;  // (workspace, lease) to release
  };
  // The part of a node-lost notice that reads and writes a record at a time (placement records,
  // workspace records, LOST events, the node's holds): on lost_lane_, never on the executor.
  LostSweep sweep_lost_node(const std::string& node, const std::string& tag);
  void handle_transition(const cvm::v1::BuildRequest& req, const bus::JsMessagePtr& msg);

  // Places on the first candidate whose capacity hold, GPUs and record all succeed; publishes the
  // assignment and SCHEDULED. `lost_node` is set when placing again after a node was lost.
  // Asynchronous from here on: the request's in-flight slot is freed by done().
  void place_and_dispatch(const cvm::v1::BuildRequest& req, const bus::JsMessagePtr& msg,
                          const std::string& lost_node, bool check_duplicate = false);
  void decide(const PlacementPtr& p);
  void when_looked_up(const PlacementPtr& p, std::function<void()> fn);
  void try_candidate(const PlacementPtr& p);
  void on_held(const PlacementPtr& p, const std::string& node_id, HoldOutcome outcome);
  void reserve_gpus(const PlacementPtr& p);
  void write_record(const PlacementPtr& p);
  void dispatch(const PlacementPtr& p);
  void fail_placement(const PlacementPtr& p, cvm::v1::Reason reason, const std::string& message);
  void drop_duplicate(const PlacementPtr& p);
  void finish_as_redelivery(const PlacementPtr& p);
  // release_slot=false: the request's in-flight slot went on to another placement.
  void done(const PlacementPtr& p, bool release_slot = true);
  void publish_assignment_async(const cvm::v1::NodeAssignment& a, bool placed_again,
                                std::function<void(Status)> then);
  void publish_scheduled_async(const cvm::v1::NodeAssignment& a, const std::string& lost_node,
                               bool no_room, std::function<void(Status)> then);
  // Wraps an asynchronous completion so that it does nothing once the service is gone.
  template <class Fn>
  auto guarded(Fn fn);
  // Publishes the recorded assignment again (deduplicated) and its SCHEDULED event, then acks;
  // holds capacity on the recorded node again first (the first hold may have expired), and when
  // there is no room left places the build afresh (move_recorded).
  void finish_recorded(const cvm::v1::PlacementRecord& record, const bus::JsMessagePtr& msg);
  void move_recorded(const PlacementPtr& p);
  static cvm::v1::Reason moved_reason(const Placement& p, cvm::v1::Reason reason);
  static std::string moved_prefix(const Placement& p);
  Status publish_assignment(const cvm::v1::NodeAssignment& a, bool placed_again);
  Status publish_scheduled(const cvm::v1::NodeAssignment& a, const std::string& lost_node);
  // Publishes the terminal FAILED event and acks; naks for a retry if the event cannot be sent.
  void fail(const cvm::v1::BuildRequest& req, cvm::v1::Reason reason, const std::string& message,
            const bus::JsMessagePtr& msg);
  // Naks for a later retry; on the last delivery (max_deliver) gives up instead.
  void retry_later(const bus::JsMessagePtr& msg, const std::string& why);
  // The node watch has been silent past node_view_silence with nodes registered (see there).
  [[nodiscard]] bool node_view_stale() const;
  // Lost-node notices: published at once, or, with a stale view, after KV confirms the node's
  // NodeStatus is as old as the watch said (a fresher one is taken instead).
  void publish_lost(const LostNode& lost, int64_t now_unix_ms);
  void confirm_lost(const LostNode& lost);
  void give_up(const bus::JsMessagePtr& msg, const std::string& why);
  void ack(const bus::JsMessagePtr& msg);
  bool already_handled(const std::string& build_id);
  Result<std::optional<cvm::v1::Phase>> last_phase(const std::string& build_id);
  // The newest placement record of the build on any node.
  Result<std::optional<cvm::v1::PlacementRecord>> find_record(const std::string& build_id);

  // Capacity holds, compare-and-set on KV cvm_capacity through the node's write queue.
  void request_hold(const std::string& node_id, PendingHold hold);
  void drop_hold(const std::string& node_id, const std::string& build_id);
  void flush_holds(const std::string& node_id);
  void on_holds_written(const std::string& node_id, cvm::v1::CapacityLedger written,
                        const Result<uint64_t>& revision);
  void reread_ledger(const std::string& node_id);
  void apply_holds(const std::string& node_id);
  void release_gpus(const std::string& workspace_id, const std::string& lease_id);

  void on_node(const std::optional<bus::KvEntry>& entry);
  // A NodeStatus into the index and the liveness tracker, from the watch or a direct KV read.
  void take_status(const cvm::v1::NodeStatus& status, uint64_t revision);
  void on_settings(const std::optional<bus::KvEntry>& entry);
  void on_lease(const std::optional<bus::KvEntry>& entry);
  void on_ledger(const std::optional<bus::KvEntry>& entry);
  // A workspace record whose phase uses no room (FAILED, STOPPED): this replica drops the hold
  // its build still has on the node, so that a failed build does not count until the hold expires.
  void on_workspace(const std::optional<bus::KvEntry>& entry);
  void schedule_sweep();
  void sweep();

  boost::asio::io_context& io_;
  bus::ConnectionPtr conn_;
  const Clock& clock_;
  SchedulerConfig config_;
  std::unique_ptr<Meters> meters_;
  Counts counts_;

  NodeIndex index_;
  LivenessTracker liveness_;
  std::unordered_map<std::string, CachedLedger> ledgers_;    // by node id
  std::unordered_map<std::string, NodeWrites> node_writes_;  // by node id
  size_t in_flight_ = 0;
  bool went_async_ = false;                // handle_build handed the request to the pipeline
  std::deque<bus::JsMessagePtr> waiting_;  // fetched beyond max_in_flight
  bool pump_posted_ = false;
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);
  // GPU leases seen in cvm_gpu_leases, by node, so a lost node's leases can be released.
  std::unordered_map<std::string, std::vector<cvm::v1::GpuLease>> leases_;
  std::optional<cvm::v1::InfrastructureSettings> settings_;
  std::optional<bus::KeyValue> workspaces_;
  std::optional<bus::KeyValue> nodes_kv_;  // a node's own report, when the watch has not shown it
  std::optional<bus::KeyValue> capacity_;
  std::optional<bus::KeyValue> placements_;
  std::unique_ptr<bus::KvWatch> nodes_watch_;
  std::unique_ptr<bus::KvWatch> workspaces_watch_;
  std::unique_ptr<bus::KvWatch> settings_watch_;
  std::unique_ptr<bus::KvWatch> leases_watch_;
  std::unique_ptr<bus::KvWatch> capacity_watch_;
  std::unique_ptr<bus::PullConsumer> consumer_;
  boost::asio::steady_timer sweep_timer_;
  // One thread for lost-node sweeps: a bus round trip per record is seconds on a big fleet, and
  // placements must not wait behind it. Sweeps run one at a time, in the order of their notices.
  boost::asio::io_context lost_lane_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>
      lost_lane_work_;
  std::thread lost_lane_thread_;
  struct StageSample {
    int64_t stored = 0, fetched = 0, executing = 0, held = 0, looked_up = 0, recorded = 0,
            published = 0;  // unix ns
  };
  std::vector<StageSample> stages_;
  bool nodes_loaded_ = false;
  // When the cvm_nodes watch last delivered anything (steady clock), for node_view_stale().
  std::chrono::steady_clock::time_point nodes_seen_{};
  bool stopped_ = false;
  uint64_t decisions_ = 0;
};

}  // namespace cvm::scheduler
