#pragma once
// Where the host tools the agent drives live. Bare names are looked up on PATH; tests point these
// at fixture scripts or private copies.

#include <chrono>
#include <string>

namespace cvm::agent {

struct ToolPaths {
  std::string runc = "runc";
  std::string sysbox_runc = "sysbox-runc";
  std::string containerd = "containerd";
  std::string umoci = "umoci";
  std::string skopeo = "skopeo";
  // Our own layer applier (cvm-unpack); empty: next to this executable, else on PATH.
  std::string unpack;
  // A version probe that hangs must not stall registration.
  std::chrono::milliseconds probe_timeout{5000};
};

}  // namespace cvm::agent
