#pragma once
// cvmctl's commands, each a function of parsed options and a bus connection; main() only parses.
// Everything shown is computed by the pure functions of views.h and watch.h.

#include <chrono>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "cvm/cli/views.h"
#include "cvm/cli/watch.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::cli {

// Exit codes scripts can rely on.
enum ExitCode : int {
  kExitOk = 0,
  kExitBuildFailed = 1,   // the build ended FAILED
  kExitUsage = 2,         // bad flags or input
  kExitUnavailable = 3,   // NATS unreachable, refused us, or a request timed out
  kExitWatchTimeout = 4,  // --watch gave up before a terminal phase
  kExitNotFound = 5       // `events`: nothing for that build; `logs`: no such workspace or log
};

struct GlobalOptions {
  std::string nats_url = "nats://127.0.0.1:4222";
  std::string nats_user;
  std::string nats_password;
  std::string output = "text";  // text | json
  // Redraw a progress line in place: stdout is a terminal and the output is text.
  bool live = false;
};

struct BuildOptions {
  std::string workspace;
  std::string image;
  std::string build_id;  // generated when empty
  std::string owner;
  std::string cpu;     // e.g. "500m", "2"
  std::string memory;  // e.g. "512Mi"
  uint32_t gpus = 0;
  std::string gpu_vendor = "nvidia";
  std::string gpu_min_memory;
  bool tun = false;
  bool fuse = false;
  std::optional<bool> use_cvm;
  bool watch = false;
  std::chrono::seconds timeout{300};
};

struct LogsOptions {
  std::string workspace;
  bool follow = false;      // keep printing what comes, until the workspace is deleted
  int64_t tail_lines = -1;  // only the last N lines of what is kept; < 0: all of it
  std::chrono::milliseconds poll{500};
};

struct ExecOptions {
  std::string workspace;
  std::vector<std::string> argv;  // empty: the user's login shell (cvmctl shell)
  bool interactive = false;       // -i: stdin goes to the process (else it reads end of file)
  bool tty = false;               // -t: a terminal
  std::string user;               // -u: inside the workspace
  std::string cwd;                // -w
  std::vector<std::string> env;   // -e K=V
};

// Who this cvmctl is to sessions: the NATS user (the server pins it), else $USER, else root.
std::string session_user(const GlobalOptions& global);

// Runs a process inside a workspace (cvmctl exec / shell) over the bus; returns its exit status,
// or kExitSessionError when there was no session or it broke off.
inline constexpr int kExitSessionError = 255;
int exec_command(const GlobalOptions& global, const ExecOptions& options, std::ostream& err);
// stdin/stdout as a TCP stream to `port` on the workspace's own loopback (ssh's ProxyCommand).
int proxy_command(const GlobalOptions& global, const std::string& workspace, uint16_t port,
                  std::ostream& err);
// Listens on 127.0.0.1:local (0: any free port, printed) and carries each connection to
// `remote` on the workspace's loopback, until interrupted.
int port_forward_command(const GlobalOptions& global, const std::string& workspace, uint16_t local,
                         uint16_t remote, std::ostream& out, std::ostream& err);
// "LOCAL:REMOTE" or "PORT" (the same both sides); nullopt for anything else. Pure.
std::optional<std::pair<uint16_t, uint16_t>> parse_port_pair(const std::string& text);

int build_command(const GlobalOptions& global, const BuildOptions& options,
                  cvm::v1::Transition transition, std::ostream& out, std::ostream& err);
// Follows a build by id: its history first, then live events, until a terminal phase.
int watch_command(const GlobalOptions& global, const std::string& build_id,
                  std::chrono::seconds timeout, std::ostream& out, std::ostream& err);
// Prints the history of a build's events and exits.
int events_command(const GlobalOptions& global, const std::string& build_id, std::ostream& out,
                   std::ostream& err);
// Every workspace KV cvm_workspaces records, optionally only those on `node` or of `owner`.
int workspaces_command(const GlobalOptions& global, const std::string& node,
                       const std::string& owner, std::ostream& out, std::ostream& err);
int nodes_command(const GlobalOptions& global, std::ostream& out, std::ostream& err);
int gpus_command(const GlobalOptions& global, std::ostream& out, std::ostream& err);
// The newest `limit` records of CVM_DEAD_LETTERS (0: all), with the request where it is still
// stored.
int dead_letters_command(const GlobalOptions& global, uint64_t limit, std::ostream& out,
                         std::ostream& err);
int settings_get_command(const GlobalOptions& global, std::ostream& out, std::ostream& err);
// assignments: "key=value" each.
int settings_set_command(const GlobalOptions& global, const std::vector<std::string>& assignments,
                         std::ostream& out, std::ostream& err);

// A workspace's console log (what its init wrote to /dev/console), asked of the agent of the node
// it lives on, as raw bytes.
int logs_command(const GlobalOptions& global, const LogsOptions& options, std::ostream& out,
                 std::ostream& err);

// Pure pieces, unit-tested.
// The last `n` lines of `text` (a last line without its newline counts as one).
std::string last_lines(const std::string& text, int64_t n);
std::string new_build_id();
// Splits "key=value"; nullopt without '=' or with an empty key.
std::optional<std::pair<std::string, std::string>> split_assignment(const std::string& text);

}  // namespace cvm::cli
