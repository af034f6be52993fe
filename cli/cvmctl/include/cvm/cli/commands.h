#pragma once
// cvmctl's commands, each a function of parsed options and a bus connection; main() only parses.

#include <chrono>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::cli {

// Exit codes scripts can rely on.
enum ExitCode : int {
  kExitOk = 0,
  kExitBuildFailed = 1,  // the build ended FAILED
  kExitUsage = 2,        // bad flags or input
  kExitUnavailable = 3,  // NATS unreachable, or a request timed out
  kExitWatchTimeout = 4  // --watch gave up before a terminal phase
};

struct GlobalOptions {
  std::string nats_url = "nats://127.0.0.1:4222";
  std::string nats_user;
  std::string nats_password;
  std::string output = "text";  // text | json
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

int build_command(const GlobalOptions& global, const BuildOptions& options,
                  cvm::v1::Transition transition, std::ostream& out, std::ostream& err);
int nodes_command(const GlobalOptions& global, std::ostream& out, std::ostream& err);

// Pure pieces, unit-tested.
std::string new_build_id();
// One line per event for people, e.g. "12:00:01.123  b1  RUNNING  node-1".
std::string format_event_line(const cvm::v1::BuildEvent& event);
// Does this phase end a build of the given transition, and was it a success?
bool ends_build(cvm::v1::Transition transition, cvm::v1::Phase phase);
std::string format_nodes_table(const std::vector<cvm::v1::NodeStatus>& nodes, int64_t now_ms);

}  // namespace cvm::cli
