#pragma once
// The node agent's wiring: registers and heartbeats its NodeStatus, consumes its own work subject,
// and drives WorkspaceLauncher. State changes happen on the io thread; the slow tool runs (skopeo,
// umoci, runc) happen on one worker thread so heartbeats never stall behind a launch.
//
// Crash safety: before a launch starts, the assignment is written to <state-dir>/inflight/<ws>.pb
// and removed once its outcome is in KV cvm_workspaces. A restarted agent reconciles `runc list`,
// those files and KV before it consumes work again: it adopts what runs (publishing RUNNING for a
// launch that had got there), fails a launch that had not (FAILED, nothing left behind), removes
// orphan containers, bundles and ID ranges, and marks workspaces whose container is gone as lost.
// It does not wait for the assignment's redelivery (ack wait 120 s); when that comes, the record
// of the same build answers it without a second launch.
//
// Ownership (docs/reliability.md, "Stale agent writes" and "Returning agent"): a node gone past the
// scheduler's node TTL (dead or frozen) may have its build placed on another node. The agent
// therefore writes its workspace records only by compare-and-set, from the revision it read when
// the assignment arrived (or last wrote), and checks that the build is still its own before the
// runtime starts, before each record it writes and before it settles an unfinished launch after a
// restart. A build that moved is given up silently: what this agent started for it (container,
// bundle, ID range, GPU lease, in-flight record) is removed and no event is published.

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include "cvm/agent/gpu/monitor.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/network.h"
#include "cvm/agent/runtime.h"
#include "cvm/agent/session_server.h"
#include "cvm/agent/tool_paths.h"
#include "cvm/base/clock.h"
#include "cvm/bus/bus.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/node.pb.h"

namespace cvm::agent {

// Whether a build assigned to `node_id` still belongs there, given the workspace's record in KV
// now (`current`, nullptr when there is none) at revision `current_revision`, and the revision the
// agent expected (read when the assignment arrived, or its own last write). A record of another
// node for the same build means the build moved; a record of another node for another build is
// the workspace's past when it is the one the agent saw (the workspace moves here), and a newer
// placement elsewhere when it is not. Pure; unit-tested.
bool build_still_ours(const cvm::v1::WorkspaceRecord* current, uint64_t current_revision,
                      uint64_t expected_revision, const std::string& node_id,
                      const std::string& build_id);

// Whether the ownership read of a START, sent `age` ago, may still stand for "now" right before
// the runtime (otherwise the agent reads again). A build moves only after its node missed
// heartbeats for the scheduler's node TTL (seconds), so a read this fresh still holds; an older
// one (a slow unpack, an agent frozen in between) is not trusted. Pure; unit-tested.
bool ownership_read_fresh(std::chrono::steady_clock::duration age);

struct AgentConfig {
  std::string node_id;
  std::string state_dir = "/var/lib/cvm-agent";
  std::string runc_root = "/run/cvm-agent/runc";
  HostRoots roots;
  ToolPaths tools;
  IdPool id_pool{231072, 65536 * 64};
  std::chrono::milliseconds heartbeat_interval{5000};
  std::chrono::milliseconds stop_grace{10000};
  std::chrono::milliseconds ack_wait{120000};
  // cvm-supervisor; empty: next to this executable.
  std::string supervisor_binary;
  std::string host_paths_root = "/";  // the mount table's hostPaths are taken from here
  std::string dev_root = "/dev";
  std::string gpu_library_dir;      // NVIDIA driver libraries handed to GPU workspaces
  std::string image_cache_dir;      // empty: <state-dir>/image-cache (under /var/lib by default)
  bool registry_tls_verify = true;  // false: plain-HTTP / self-signed registries (tests)
  std::chrono::milliseconds ready_timeout{60000};
  // The workspaces' network (CNI); off: CVMs get only lo. state_dir empty: <state-dir>/network.
  NetworkConfig network;
  // lxcfs's mount (the node's lxcfs.service); empty: not used.
  std::string lxcfs_dir = "/var/lib/lxcfs";
  // Every workspace's seccomp profile (LauncherConfig::seccomp_profile): empty, the built-in one.
  std::string seccomp_profile;
  // Raise the kernel limits systemd workspaces need (node_tuning.h) at start.
  bool tune_sysctls = true;
  // exec/shell sessions (session_server.h): who may enter every workspace, and the limits.
  std::vector<std::string> session_admins = {"cvmctl"};  // deploy/nats: the operator user
  session::Limits session_limits;
  std::chrono::milliseconds session_heartbeat{2000};
};

class AgentService {
 public:
  AgentService(boost::asio::io_context& io, bus::ConnectionPtr conn, telemetry::Metrics& metrics,
               const Clock& clock, AgentConfig config);
  ~AgentService();
  AgentService(const AgentService&) = delete;
  AgentService& operator=(const AgentService&) = delete;

  Status start();
  void stop();

 private:
  struct Meters;
  struct Workspace {
    cvm::v1::WorkspaceRecord record;
    uint64_t revision = 0;  // of `record` in KV as this agent last read or wrote it; 0: none
    uint64_t cpu_millicores = 0;
    uint64_t memory_bytes = 0;
  };
  // Whether a START is still this node's to run (docs/reliability.md, "Stale agent writes"), read
  // from KV by the io thread while the worker already prepares the rootfs; the worker waits for the
  // answer right before the runtime. Shared by the two threads.
  struct Ownership {
    enum class State { kPending, kOurs, kMoved, kUnreadable };
    void set(State s, uint64_t rev, std::chrono::steady_clock::time_point sent);
    // Blocks until set(); returns the state, with the record's revision and when the read was sent.
    State wait(uint64_t& rev, std::chrono::steady_clock::time_point& sent);

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    State state_ = State::kPending;
    uint64_t revision_ = 0;
    std::chrono::steady_clock::time_point sent_;
  };
  // What the worker thread hands back after a launch.
  struct LaunchResult {
    LaunchOutcome outcome;
    int64_t starting_ms = 0;  // when STARTING was published (0: never)
    bool withdrawn = false;   // the build moved to another node: nothing of it runs here
    bool retry = false;       // withdrawn because KV could not say whose it is: redeliver later
    uint64_t revision = 0;  // what the launch's record writes compare against (docs/reliability.md,
                            // "Stale agent writes")
    std::chrono::steady_clock::time_point received;  // the assignment
    // Set when the worker already recorded the workspace and published RUNNING itself.
    std::optional<Workspace> recorded;
  };
  // The workspace's record in KV now; `record` empty when there is none (or it was deleted).
  struct KvRecord {
    std::optional<cvm::v1::WorkspaceRecord> record;
    uint64_t revision = 0;
  };

  void on_work(const bus::JsMessagePtr& msg);
  // A ConsoleLogRequest on the node's console subject: a piece of a workspace's console log, for
  // its owner and the admins (console_access).
  void answer_console(const bus::Message& msg);
  [[nodiscard]] session::Access console_access(const std::string& user,
                                               const std::string& workspace_id) const;
  void handle_start(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg);
  void handle_stop(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg, bool remove);
  // On the worker thread; withdrawn (nothing started) when the build moved, checked right before
  // the runtime. A launch that reached RUNNING is recorded and published from here too (no hop to
  // the io thread on the way to RUNNING).
  LaunchResult launch(const cvm::v1::NodeAssignment& a, IdRange ids,
                      const std::shared_ptr<Ownership>& ownership, int64_t preparing_ms,
                      std::chrono::steady_clock::time_point received, const std::string& cpuset);
  // The CPUs a starting workspace is pinned to (cpu_pinning.h), chosen against the pins of the
  // running workspaces and of the launches in flight; "" without a CPU request.
  std::string pin_cpus(const std::string& workspace_id, uint64_t millicores) const;
  // On the io thread, after launch(): the bookkeeping, or the failure's record and event.
  void finish_start(const cvm::v1::NodeAssignment& a, IdRange ids, LaunchResult result,
                    int64_t preparing_ms, const bus::JsMessagePtr& msg);
  // The workspace's record after a launch's outcome (with the phases it went through). Pure.
  Workspace outcome_record(const cvm::v1::NodeAssignment& a, IdRange ids,
                           const LaunchOutcome& outcome,
                           const std::vector<std::pair<cvm::v1::Phase, int64_t>>& phases,
                           uint64_t expected_revision) const;
  // outcome_record() into KV by compare-and-set from `expected_revision`, and into workspaces_.
  // kConflict: the build moved to another node, nothing was written.
  Status record_outcome(const cvm::v1::NodeAssignment& a, IdRange ids, const LaunchOutcome& outcome,
                        const std::vector<std::pair<cvm::v1::Phase, int64_t>>& phases,
                        uint64_t expected_revision);
  Result<KvRecord> read_record(const std::string& workspace_id);
  // build_still_ours() against KV now. A read that fails counts as ours: the compare-and-set of
  // the record still refuses a stale write.
  bool still_ours(const cvm::v1::NodeAssignment& a, uint64_t expected_revision);
  // The build moved to another node while this agent launched it: remove what the agent started
  // (on the worker thread), free its ID range and GPU lease, drop its in-flight record, ack the
  // assignment (if any) and publish nothing. With `retry` (KV could not tell whose the build is)
  // the assignment is redelivered later instead, and the workspace's own record stays.
  void give_up_moved(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg,
                     bool retry = false);
  // Gives a GPU lease back to the broker (empty: none).
  void release_lease(const std::string& workspace_id, const std::string& lease_id);

  // A running workspace's end, seen at once: a pidfd of its container's init (the supervisor for
  // a CVM) in the io loop. When it exits without a STOP (poweroff inside, a crash, a kill), the
  // workspace is STOPPED (a shutdown) or FAILED (the exit status and the console's last lines),
  // its container is removed (files kept, as after STOP), its capacity and GPUs released.
  void watch_exit(const std::string& workspace_id, const std::string& build_id, int pid);
  void unwatch_exit(const std::string& workspace_id);
  void on_exit(const std::string& workspace_id, const std::string& build_id);

  // Restart recovery (see the top of this file); runs in start() before work is consumed.
  void reconcile();
  Status write_inflight(const cvm::v1::NodeAssignment& a);
  void remove_inflight(const std::string& workspace_id);
  std::map<std::string, cvm::v1::NodeAssignment> read_inflight();

  cvm::v1::BuildEvent event(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                            cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED,
                            const std::string& message = {},
                            const std::vector<std::string>& warnings = {}) const;
  // Publishes and waits for the stream's ack (any thread).
  void publish(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
               cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED,
               const std::string& message = {}, const std::vector<std::string>& warnings = {});
  // Publishes without waiting (any thread): events published on this connection reach the stream
  // in the order they were handed to it, whichever thread did it.
  void publish_async(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
                     const std::string& message = {});
  void heartbeat();
  void schedule_heartbeat();
  cvm::v1::NodeStatus node_status() const;
  Status save_id_ranges();
  Status load_id_ranges();
  void load_workspaces();
  // Writes ws.record by compare-and-set from ws.revision (create when 0) and keeps the new
  // revision. On a conflict the current record decides: still this node's (the scheduler marked
  // it LOST while the agent was away) -> written over that revision; another node's -> refused
  // (kConflict), the workspace is no longer this node's.
  Status put_workspace(Workspace& ws);
  void release_gpus(const cvm::v1::WorkspaceRecord& record);

  std::string workspace_dir(const std::string& workspace_id) const;
  static std::string container_id(const std::string& workspace_id);
  void update_running_gauge();

  boost::asio::io_context& io_;
  bus::ConnectionPtr conn_;
  const Clock& clock_;
  AgentConfig config_;
  std::unique_ptr<Meters> meters_;
  boost::asio::thread_pool worker_{1};
  boost::asio::steady_timer heartbeat_timer_;
  std::unique_ptr<RuncRuntime> runtime_;
  std::unique_ptr<ImageTool> images_;
  std::unique_ptr<WorkspaceNetwork> network_;  // before launcher_, which points at it
  std::unique_ptr<WorkspaceLauncher> launcher_;
  std::optional<IdRangeAllocator> ids_;
  std::optional<bus::KeyValue> nodes_kv_;
  std::optional<bus::KeyValue> workspaces_kv_;
  std::unique_ptr<bus::PullConsumer> consumer_;
  std::optional<bus::Subscription> console_sub_;
  std::unique_ptr<SessionServer> sessions_;
  // A workspace running here that a session may enter (the io thread's view), else nullopt.
  std::optional<SessionTarget> session_target(const std::string& workspace_id) const;
  void export_session_counters();
  std::vector<int> node_cpus_;                         // the CPUs the agent may run on
  std::map<std::string, std::string> launching_cpus_;  // pins of launches in flight, by workspace

  cvm::v1::HostCapabilities host_;
  cvm::v1::RuntimeInfo runtime_info_;
  cvm::v1::Capacity capacity_;
  std::optional<uint64_t> cap_bounding_;
  std::unique_ptr<gpu::GpuMonitor> gpu_monitor_;  // GPUs and their health
  int64_t started_ms_ = 0;
  std::map<std::string, Workspace> workspaces_;  // by workspace id, running or stopped here
  std::set<std::string> busy_;                   // workspaces with an operation in flight
  std::map<std::string, std::unique_ptr<boost::asio::posix::stream_descriptor>> exit_watches_;
  bool stopping_ = false;
};

}  // namespace cvm::agent
