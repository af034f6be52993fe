#pragma once
// Sessions on this node: `cvmctl exec` / `cvmctl shell` run a process inside a workspace's inner
// container, its streams carried by core NATS (session.proto, cvm/session/flow.h).
//
// The process is started as the product runs everything in a workspace: `runc exec` of the
// supervising container runs the inner runtime's `exec` of the inner container, so it gets the
// inner container's user namespace, cgroup, capabilities, seccomp and mounts, never the
// supervisor's or the host's. With a terminal the agent holds a pty whose slave is the outer
// runc's terminal; each runc level proxies its own pty, and a resize or hangup travels down the
// chain as SIGWINCH / SIGHUP.
//
// Threads: opens are authorized on the agent's io thread (it owns the workspace table); each
// session's I/O then runs on the server's own thread (one io_context for all sessions), so a slow
// client or process never stalls heartbeats or launches.
//
// A session ends when its process exits (exit frame), the client hangs up or goes silent for three
// heartbeats (SIGHUP to the process, as sshd does), the workspace stops (error frame), or the agent
// stops (error frame). What SIGHUP did not end within hangup_grace is killed, the whole tree below
// the outer runc: a hung-up session leaves nothing running (what a user means to outlive it is a
// service of the workspace's systemd, or a daemon, which is not below the chain). A killed agent's
// sessions are found by the next one at start and ended the same way.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/result.h"
#include "cvm/bus/bus.h"
#include "cvm/session/flow.h"
#include "cvm/v1/session.pb.h"

namespace cvm::agent {

// A user inside the workspace, as the process runs.
struct SessionUser {
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::vector<uint32_t> groups;  // supplementary (from /etc/group)
  std::string name;              // empty: not in /etc/passwd
  std::string home = "/";
  std::string shell = "/bin/sh";
};

// Who `spec` is in the image's /etc/passwd and /etc/group: "" is `default_uid` (the init's user),
// "name", "uid", "uid:gid", "name:group". kNotFound for a name the files do not have. Pure.
[[nodiscard]] Result<SessionUser> resolve_session_user(std::string_view spec,
                                                       std::string_view passwd,
                                                       std::string_view group, uint32_t default_uid,
                                                       uint32_t default_gid);

// What runs the process: the outer runc's exec of the inner runtime's exec.
struct ExecPlan {
  std::string runc;       // host runc
  std::string runc_root;  // the agent's runc --root
  std::string container_id;
  std::string inner_runtime;  // its path inside the supervising container
  std::string inner_root;     // the inner runtime's --root there
  std::string inner_id;
  bool tty = false;
  SessionUser user;
  std::string cwd;               // empty: the user's home
  std::vector<std::string> env;  // K=V, after the defaults (HOME, USER, TERM, ...)
  std::vector<std::string> argv;
};
// The command line of `plan`. Pure; unit-tested.
[[nodiscard]] std::vector<std::string> exec_argv(const ExecPlan& plan);
// What a shell session runs: the user's shell as a login shell.
[[nodiscard]] std::vector<std::string> login_shell_argv(const SessionUser& user);

// The outer `runc --root <runc_root> exec` processes under `proc_root` (/proc): sessions of an
// agent that died. Its pty and pipes closed with it, but a process that never writes would not
// notice; the new agent hangs them up at start.
[[nodiscard]] std::vector<int> leftover_session_processes(const std::string& proc_root,
                                                          const std::string& runc_root);

// Each process under `proc_root` (/proc) by its parent, as its stat names it: parent -> child.
using ProcessTree = std::multimap<int, int>;
[[nodiscard]] ProcessTree read_process_tree(const std::string& proc_root);

// Every descendant of `root` in `tree`, parents before their children; `root` itself is not in
// it. A session's process and whatever it started that still hangs below the runc chain (runc exec
// is a child subreaper, so orphans land on it) are all descendants of the outer runc. Pure.
[[nodiscard]] std::vector<int> descendants(const ProcessTree& tree, int root);
// descendants() of a tree read from `proc_root` now.
[[nodiscard]] std::vector<int> process_descendants(const std::string& proc_root, int root);

// A workspace a session may enter, as the agent knows it.
struct SessionTarget {
  std::string owner;
  std::string container_id;
  std::string rootfs;  // host path of the inner rootfs (its /etc/passwd names the users)
  uint32_t default_uid = 0;
  uint32_t default_gid = 0;
};

struct SessionServerConfig {
  std::string node_id;
  std::string runc = "runc";
  std::string runc_root;
  std::string inner_runtime;
  std::vector<std::string> admins;  // users who may enter every workspace
  session::Limits limits;
  std::chrono::milliseconds heartbeat{2000};
  std::chrono::milliseconds hangup_grace{3000};  // SIGHUP -> SIGKILL of the runc chain
};

struct SessionCounters {
  uint64_t opened = 0;
  uint64_t refused = 0;  // forbidden, not found, over a limit, bad request
  uint64_t failed = 0;   // could not start, or broke the protocol
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  int open = 0;
};

class SessionServer {
 public:
  // `lookup` runs on the connection's executor (the agent's io thread): the workspace, if it runs
  // on this node now.
  using Lookup = std::function<std::optional<SessionTarget>(const std::string& workspace_id)>;
  SessionServer(bus::ConnectionPtr conn, SessionServerConfig config, Lookup lookup);
  ~SessionServer();
  SessionServer(const SessionServer&) = delete;
  SessionServer& operator=(const SessionServer&) = delete;

  Status start();
  // Ends every session (an error frame to each client) and joins the thread.
  void stop();
  // The workspace stopped: its sessions end with `why`.
  void end_workspace(const std::string& workspace_id, const std::string& why);
  [[nodiscard]] SessionCounters counters() const;

 private:
  struct Session;
  void on_open(const bus::Message& msg);
  void on_frame(const bus::Message& msg);
  void open_on_lane(cvm::v1::SessionOpen open, std::string user, std::string reply,
                    SessionTarget target);
  // A port session: a TCP connection to the workspace's loopback, made in its network namespace.
  void open_port_on_lane(cvm::v1::SessionOpen open, const std::string& user,
                         const std::string& reply_to, const SessionTarget& target);
  void reply(const std::string& subject, const cvm::v1::SessionOpened& answer);
  // Counts the refusal (or failure) and answers `answer` with `why` as its error.
  void refuse(const std::string& reply_to, cvm::v1::SessionOpened answer, std::string why,
              bool failed = false);
  // A session of `user` for `open`, not yet registered.
  std::shared_ptr<Session> new_session(const cvm::v1::SessionOpen& open, const std::string& user);
  // Registers it, counts it, and tells the client its window and heartbeat.
  void admit(const std::shared_ptr<Session>& s, const std::string& reply_to);
  void tick();
  void end_all(const std::string& why);
  // The session's parts, on the lane.
  void send(const std::shared_ptr<Session>& s, cvm::v1::SessionFrame frame);
  void read_output(const std::shared_ptr<Session>& s, bool errors);
  void write_input(const std::shared_ptr<Session>& s);
  // SIGHUP down the runc chain, SIGKILL of its whole tree after hangup_grace.
  void hang_up(const std::shared_ptr<Session>& s);
  // An error frame to the client (once), then hang_up().
  void end_session(const std::shared_ptr<Session>& s, const std::string& why, bool failed);
  void on_exited(const std::shared_ptr<Session>& s);
  // Once the process exited and its output is read (or a moment passed): the exit frame, and the
  // session is gone.
  void maybe_finish(const std::shared_ptr<Session>& s);

  bus::ConnectionPtr conn_;
  SessionServerConfig config_;
  Lookup lookup_;
  boost::asio::io_context lane_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread thread_;
  std::optional<bus::Subscription> open_sub_;
  std::optional<bus::Subscription> frame_sub_;
  std::unique_ptr<boost::asio::steady_timer> timer_;
  // On the lane only.
  std::map<std::string, std::shared_ptr<Session>> sessions_;  // by "<user>.<session id>"
  // The outer runc processes of a previous agent's sessions, hung up at start; what is left of
  // them at leftover_kill_at_ is killed.
  std::vector<int> leftovers_;
  std::chrono::steady_clock::time_point leftover_kill_at_;
  mutable std::mutex counters_mu_;
  SessionCounters counters_;
};

}  // namespace cvm::agent
