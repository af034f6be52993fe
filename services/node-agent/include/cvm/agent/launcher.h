#pragma once
// Turns a workspace start into running containers on this host, and takes them down again. No NATS:
// the agent's wiring calls it on its worker thread, integration tests call it directly.
//
// A CVM is laid out under <workspaces_dir>/<workspace>/:
//   bundle/       the inner container's bundle: rootfs/ is the image unpacked onto the workspace's
//                 ID range (Caching off), or an overlay of the node cache's ID-mapped rootfs
//   overlay/      Caching on: the overlay's upper (the workspace's writes) and work dirs
//   supervisor/   the supervising container's bundle (config.json + an empty rootfs)
//   run/          shared with the supervisor: status.json (its report), inner.log (inner stdio)
//   runc.log      the supervising (or plain) container's stdio and the runtime's errors
// The host's runc knows one container per workspace, "cvm-<workspace>": the supervising container
// of a CVM, or the only container of a plain (non-CVM) workspace.

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/agent/id_range.h"
#include "cvm/agent/idmap_mount.h"
#include "cvm/agent/image.h"
#include "cvm/agent/network.h"
#include "cvm/agent/oci_spec.h"
#include "cvm/agent/runtime.h"
#include "cvm/base/result.h"
#include "cvm/v1/build.pb.h"

namespace cvm::agent {

struct LauncherConfig {
  std::string workspaces_dir;  // <state-dir>/workspaces
  // Per-workspace storage that outlives STOP/START and a failed start (the inner Docker's
  // /var/lib/docker, the console log) and goes with DELETE; empty: <workspaces_dir>/../storage.
  std::string storage_dir;
  int64_t console_log_max_bytes = 1 << 20;  // per file; the supervisor keeps one rotated file
  std::string supervisor_binary;            // host path of cvm-supervisor
  std::string inner_runtime;          // host path of sysbox-runc, or of runc standing in for it
  std::string host_paths_root = "/";  // where the mount table's hostPaths are taken from
  std::string dev_root = "/dev";      // where the NVIDIA device nodes are looked up
  std::string gpu_library_dir;        // NVIDIA driver libraries; empty: none handed over
  std::string machine = "x86_64";     // for the image's multiarch library folder
  std::vector<BindMount> supervisor_extra_binds;  // e.g. /run/sysbox for sysbox-runc
  std::chrono::milliseconds stop_grace{10000};
  std::chrono::milliseconds ready_timeout{60000};  // supervisor started -> inner running
  std::optional<uint64_t> host_cap_bounding;
  std::optional<uint64_t> host_nofile_hard;
  // The workspaces' network (CNI). nullptr, or one whose prepare() failed: CVMs get only `lo`,
  // and each launch says so in a warning.
  WorkspaceNetwork* network = nullptr;
  // Where lxcfs is mounted (Debian's lxcfs.service: /var/lib/lxcfs); empty: not used. Looked at
  // at each launch: without it, the workspace runs and its build's warnings say so.
  std::string lxcfs_dir;
  // Every workspace's seccomp profile (seccomp.h): empty, the built-in one; kUnconfined, none; else
  // a file, read at each launch, so that a replaced profile applies to the next workspace. A
  // profile that cannot be read or checked fails the launch with the reason.
  std::string seccomp_profile;
};
inline constexpr std::string_view kUnconfined = "unconfined";

// The linux.seccomp object `setting` (LauncherConfig::seccomp_profile) names; nullopt for
// kUnconfined.
[[nodiscard]] Result<std::optional<nlohmann::json>> workspace_seccomp(const std::string& setting);

struct AssignedGpu {
  uint32_t minor = 0;
  std::string uuid;
};

struct LaunchRequest {
  std::string workspace_id;
  std::string build_id;
  std::string image;
  bool cvm = true;
  bool caching = false;
  bool auto_load_shiftfs = false;
  uint64_t cpu_millicores = 0;  // 0: no CPU quota
  std::string cpuset;           // the CPUs it is pinned to ("0-1", cpu_pinning.h); empty: none
  uint64_t memory_bytes = 512ULL << 20;
  bool tun = false;
  bool fuse = false;
  std::vector<AssignedGpu> gpus;
  IdRange ids;
  // Asked right after on_starting, before the runtime is called; false withdraws the launch (it
  // fails, leaving nothing). The node agent's check that the build is still its own.
  std::function<bool()> may_start;
};

struct LaunchOutcome {
  bool ok = false;
  cvm::v1::Reason reason = cvm::v1::REASON_UNSPECIFIED;
  std::string message;
  std::vector<std::string> warnings;
  int pid = 0;  // host pid of the runc container's init (the supervisor for a CVM)
  // Which rootfs path the launch took (ID-mapped overlay of the node cache, or an unpack), for the
  // build's STARTING event.
  std::string rootfs_note;
  std::string address;  // the workspace's eth0 address (CIDR); empty: no network
};

// Called once the bundles are written, before the runtime: the launch is STARTING.
using StartingCallback = std::function<void(const std::string& rootfs_note)>;

// What the supervisor reported in run/status.json.
struct SupervisorStatus {
  // kCreated: the inner container exists, its init has not run yet; the supervisor waits for the
  // agent to give it its network.
  enum class State { kStarting, kCreated, kRunning, kFailed, kExited, kStopping, kStopped };
  State state = State::kStarting;
  int pid = 0;  // the inner init, in the supervisor's PID namespace
  int code = 0;
  std::string message;
};
// How a running workspace ended on its own (its init exited; nobody asked the agent to stop it).
struct InitExit {
  bool shutdown = false;  // the user shut it down (poweroff, halt, reboot, exit 0): STOPPED
  std::string message;    // for FAILED: the exit status and the console's last lines
};
// Parses status.json text; kInvalid when it is not one.
[[nodiscard]] Result<SupervisorStatus> parse_supervisor_status(std::string_view text);

// The host PID of the inner container's init: the child of `supervisor_pid` that is PID 1 of its
// own namespace (NSpid ends in 1). 0 when there is none.
[[nodiscard]] int find_inner_host_pid(const std::string& procfs, int supervisor_pid);

// The host path of `name` (absolute or looked up on PATH); kNotFound when it is not executable.
[[nodiscard]] Result<std::string> find_executable(const std::string& name);

class WorkspaceLauncher {
 public:
  WorkspaceLauncher(LauncherConfig config, OciRuntime& runtime, ImageTool& images);
  ~WorkspaceLauncher();
  WorkspaceLauncher(const WorkspaceLauncher&) = delete;
  WorkspaceLauncher& operator=(const WorkspaceLauncher&) = delete;

  // Finds the shared libraries of the supervisor and the inner runtime (ldd). CVM launches fail
  // until this has succeeded; the error says why (for the node status).
  Status prepare();
  [[nodiscard]] bool cvm_ready() const { return prepared_; }

  // Unpacks, writes the bundle(s), creates and starts, and for a CVM waits for the supervisor's
  // report. `on_starting` runs once the bundles are written, before the runtime is called. On
  // failure nothing is left: no container, no bundle.
  LaunchOutcome launch(const LaunchRequest& request, const StartingCallback& on_starting = nullptr);

  // For a workspace whose container runs (an agent restart): the supervisor's report, waiting up
  // to `timeout` while it is still starting.
  // `until_created`: a kCreated report is an answer too (otherwise it is waited past).
  Result<SupervisorStatus> wait_ready(const std::string& workspace_id, int supervisor_pid,
                                      std::chrono::milliseconds timeout,
                                      bool until_created = false);

  // SIGTERM (a CVM's supervisor then stops the inner container with its grace), then SIGKILL.
  // A container already gone is success.
  Status stop(const std::string& workspace_id);
  // Deletes the container, releases its network (address, interface, NAT rules) and, with
  // `remove_files`, the workspace's directory.
  Status remove(const std::string& workspace_id, bool remove_files);

  [[nodiscard]] static std::string container_id(const std::string& workspace_id);
  [[nodiscard]] std::string workspace_dir(const std::string& workspace_id) const;
  // <storage_dir>/<workspace>: docker/ (the inner /var/lib/docker), console.log (+ .1).
  [[nodiscard]] std::string storage_dir(const std::string& workspace_id) const;
  [[nodiscard]] std::string console_log(const std::string& workspace_id) const {
    return storage_dir(workspace_id) + "/console.log";
  }
  // After a running workspace's container ended by itself: what its supervisor reported and its
  // console said (reads files only).
  [[nodiscard]] InitExit exit_report(const std::string& workspace_id) const;
  [[nodiscard]] const std::vector<std::string>& supervisor_files() const { return files_; }
  // The inner runtime, as found at prepare() (its path inside the supervising container too).
  [[nodiscard]] const std::string& inner_runtime() const { return config_.inner_runtime; }
  // Whether an overlay over an ID-mapped lower layer works on this host (probed once, on real
  // mounts in the image cache's directory).
  const IdmapSupport& idmap_support();

 private:
  Status prepare_storage(const std::string& workspace_id, IdRange ids);
  // `seccomp`: the launch's filter, read and checked once at its start (workspace_seccomp).
  using Seccomp = std::optional<nlohmann::json>;
  LaunchOutcome launch_plain(const LaunchRequest& r, const UnpackedImage& image,
                             const Seccomp& seccomp, const StartingCallback& on_starting,
                             LaunchOutcome out);
  // The rootfs of a launch: ready (the overlay, or an unpack done first) or being applied on
  // another thread while the supervising container starts.
  using PendingRootfs = std::future<Result<UnpackedImage>>;
  static PendingRootfs ready_rootfs(Result<UnpackedImage> image);
  static void note_image(const UnpackedImage& image, LaunchOutcome& out);
  LaunchOutcome launch_cvm(const LaunchRequest& r, PendingRootfs& rootfs, const Seccomp& seccomp,
                           const StartingCallback& on_starting, LaunchOutcome out);
  // Caching on: the node cache's rootfs of the image under an ID-mapped overlay at bundle/rootfs.
  Result<UnpackedImage> overlay_rootfs(const LaunchRequest& r, const std::string& bundle);
  LaunchOutcome fail(const std::string& workspace_id, cvm::v1::Reason reason, std::string message,
                     LaunchOutcome out);

  LauncherConfig config_;
  OciRuntime& runtime_;
  ImageTool& images_;
  std::vector<std::string> files_;  // bound into every supervising container
  bool prepared_ = false;
  std::optional<IdmapSupport> idmap_;
  // wait_ready's inotify instance, kept for the launcher's life: closing one that had a watch
  // waits for the kernel's fsnotify SRCU grace period (fsnotify_destroy_group; 8-20 ms measured
  // on this project's hosts), which would sit between the supervisor's report and RUNNING. Each
  // wait adds a watch and removes it again (inotify_rm_watch does not wait). One wait at a time.
  std::mutex watch_mu_;
  int watch_fd_ = -1;
};

// Removes a directory tree, first detaching anything mounted below it (a workspace's overlay),
// retrying while something (an orphaned tool of a killed agent) may still be writing into it.
Status remove_tree(const std::string& path);

// chowns every entry below (and at) `root` from the range starting at `old_base` onto `ids`
// (same offset; IDs outside the old range become the new range's root), keeping setuid bits.
// Never follows a link. For storage kept from a life on another ID range.
Status shift_tree_ownership(const std::string& root, uid_t old_base, IdRange ids);

// From the supervisor's last report (nullopt: none, e.g. a plain container or a supervisor that
// was killed) and the console log's text. Pure.
[[nodiscard]] InitExit classify_init_exit(const std::optional<SupervisorStatus>& status,
                                          std::string_view console);
// The last `max_lines` non-empty lines of console output, terminal escape sequences (systemd's
// colours) and carriage returns removed, at most `max_bytes` (the end kept). Pure.
[[nodiscard]] std::string console_tail(std::string_view console, size_t max_lines = 15,
                                       size_t max_bytes = 2000);

// The lxcfs files a CVM's /proc and /sys get, relative to the lxcfs mount: they show the
// workspace's memory, CPU and uptime instead of the node's (free, top, uptime, docker info).
[[nodiscard]] const std::vector<std::string>& lxcfs_files();
// Why the workspaces' mapped root could not reach its bundle below `path`: the first of `path` and
// its ancestors that other users cannot search (no o+x; the mapped IDs own none of them), as
// "<dir> is mode 0700"; "" when every one is searchable. `mode_of` gives a directory's mode bits,
// nullopt when it is missing: the walk ends there (what is made below is made 0755).
[[nodiscard]] std::string unsearchable_ancestor(
    const std::string& path,
    const std::function<std::optional<unsigned>(const std::string&)>& mode_of);

// A machine's /etc/hosts: localhost and its own name (127.0.1.1, as Debian's installer writes it).
[[nodiscard]] std::string etc_hosts(std::string_view hostname);

// Whether an inner init's exit status (the supervisor's `code`: the exit code, or 128 + the
// signal) is a shutdown its user asked for: exit 0, or the kernel ending a PID namespace's init
// after reboot(2) inside it (SIGINT for halt and poweroff, SIGHUP for reboot).
[[nodiscard]] bool is_shutdown_exit(int code);

// The signal that stops an inner init gracefully: systemd halts on SIGRTMIN+3 (SIGTERM only
// makes it re-execute itself), anything else gets TERM. `init_path` is the init's resolved path.
[[nodiscard]] std::string stop_signal_for_init(std::string_view init_path);

}  // namespace cvm::agent
