#include "agent_helpers.h"

#include <unistd.h>

#include <chrono>
#include <filesystem>

#include "child_process.h"
#include "cvm/service/streams.h"
#include "cvm/test/wait.h"
#include "cvm/v1/node.pb.h"

namespace cvm::test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

TestImages build_test_images(const std::string& build_script, const std::string& name, bool big) {
  TestImages images;
  images.dir = fs::temp_directory_path() / (name + "-" + std::to_string(getpid()));
  auto r = run_command({build_script, images.dir, "latest"}, 120s);
  if (r.exit_code == 0 && big) {
    const std::string b = images.dir + "-big";
    r = run_command(
        {"/bin/sh", "-c",
         "set -e; umoci unpack --image " + images.dir + ":latest " + b +
             "; head -c 50331648 /dev/urandom > " + b + "/rootfs/big; umoci repack --image " +
             images.dir + ":big " + b + "; rm -rf " + b},
        120s);
  }
  if (r.exit_code != 0)
    images.error = r.output.empty() ? "exit " + std::to_string(r.exit_code) : r.output;
  return images;
}

void remove_test_images(const TestImages& images) {
  std::error_code ec;
  fs::remove_all(images.dir, ec);
  fs::remove_all(images.dir + "-big", ec);
}

bool wait_agent_ready(bus::Connection& conn, const std::string& node_id, int64_t since_ms) {
  auto nodes = conn.ensure_kv(service::nodes_bucket());
  if (!nodes.ok()) return false;
  return wait_until(
      [&] {
        auto e = nodes->get(node_id);
        cvm::v1::NodeStatus st;
        return e.ok() && e->has_value() && st.ParseFromString((*e)->value) &&
               st.started_unix_ms() >= since_ms;
      },
      60s);
}

}  // namespace cvm::test
