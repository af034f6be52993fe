#pragma once
// What tests with a real node agent share: the OCI images it launches, built once per test binary
// by scripts/build-default-image.sh into a temporary layout, and the wait for its start.

#include <cstdint>
#include <string>

#include "cvm/bus/bus.h"

namespace cvm::test {

struct TestImages {
  std::string dir;    // OCI layout: oci:<dir>:latest, and oci:<dir>:big when asked for
  std::string error;  // why they could not be built; empty when they were
};

// Builds `<tmp>/<name>-<pid>:latest` with `build_script` and, with `big`, a "big" tag: the same
// image plus 48 MiB of incompressible data, so that applying its layers takes long enough for a
// fault to land mid-launch (the default image unpacks in milliseconds).
TestImages build_test_images(const std::string& build_script, const std::string& name, bool big);
void remove_test_images(const TestImages& images);

// Until the agent of `node_id` started last has finished start() (reconcile included): its
// NodeStatus carries a start time from `since_ms` on. False after 60 s.
bool wait_agent_ready(bus::Connection& conn, const std::string& node_id, int64_t since_ms);

}  // namespace cvm::test
