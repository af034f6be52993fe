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

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include "cvm/agent/gpu/monitor.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/runtime.h"
#include "cvm/agent/tool_paths.h"
#include "cvm/base/clock.h"
#include "cvm/bus/bus.h"
#include "cvm/telemetry/metrics.h"
#include "cvm/v1/node.pb.h"

namespace cvm::agent {

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
    uint64_t cpu_millicores = 0;
    uint64_t memory_bytes = 0;
  };
  // What the worker thread hands back after a launch.
  struct LaunchResult {
    LaunchOutcome outcome;
    int64_t starting_ms = 0;  // when STARTING was published (0: never)
  };

  void on_work(const bus::JsMessagePtr& msg);
  void handle_start(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg);
  void handle_stop(const cvm::v1::NodeAssignment& a, const bus::JsMessagePtr& msg, bool remove);
  LaunchResult launch(const cvm::v1::NodeAssignment& a, IdRange ids);  // on the worker thread
  void finish_start(const cvm::v1::NodeAssignment& a, IdRange ids, LaunchResult result,
                    int64_t preparing_ms, const bus::JsMessagePtr& msg);
  // The outcome of a launch, into workspaces_ and KV (with the phases it went through).
  void record_outcome(const cvm::v1::NodeAssignment& a, IdRange ids, const LaunchOutcome& outcome,
                      const std::vector<std::pair<cvm::v1::Phase, int64_t>>& phases);

  // Restart recovery (see the top of this file); runs in start() before work is consumed.
  void reconcile();
  Status write_inflight(const cvm::v1::NodeAssignment& a);
  void remove_inflight(const std::string& workspace_id);
  std::map<std::string, cvm::v1::NodeAssignment> read_inflight();

  void publish(const cvm::v1::NodeAssignment& a, cvm::v1::Phase phase,
               cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED,
               const std::string& message = {}, const std::vector<std::string>& warnings = {});
  void heartbeat();
  void schedule_heartbeat();
  cvm::v1::NodeStatus node_status() const;
  Status save_id_ranges();
  Status load_id_ranges();
  void load_workspaces();
  void put_workspace(const Workspace& ws);
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
  std::unique_ptr<WorkspaceLauncher> launcher_;
  std::optional<IdRangeAllocator> ids_;
  std::optional<bus::KeyValue> nodes_kv_;
  std::optional<bus::KeyValue> workspaces_kv_;
  std::unique_ptr<bus::PullConsumer> consumer_;

  cvm::v1::HostCapabilities host_;
  cvm::v1::RuntimeInfo runtime_info_;
  cvm::v1::Capacity capacity_;
  std::optional<uint64_t> cap_bounding_;
  std::unique_ptr<gpu::GpuMonitor> gpu_monitor_;  // GPUs and their health (issue 5)
  int64_t started_ms_ = 0;
  std::map<std::string, Workspace> workspaces_;  // by workspace id, running or stopped here
  std::set<std::string> busy_;                   // workspaces with an operation in flight
  bool stopping_ = false;
};

}  // namespace cvm::agent
