// cvm-node-agent: runs CVM workspaces on this node. main() parses flags and runs AgentService.
#include <malloc.h>
#include <unistd.h>

#include <iostream>
#include <string>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/agent/agent_service.h"
#include "cvm/service/service.h"

namespace {
std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "node";
  std::string h(buf);
  // A node id must be a single NATS subject token.
  for (char& c : h) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') c = '-';
  }
  return h.empty() ? "node" : h;
}
}  // namespace

int main(int argc, char** argv) {
  // Few malloc arenas: the launch path runs on short-lived threads (the background unpack), and
  // each new arena would keep its freed pages resident (idle RSS target <= 15 MiB).
  ::mallopt(M_ARENA_MAX, 2);
  CLI::App app{"cvm-node-agent: builds and runs CVM workspaces on this node"};
  cvm::service::CommonOptions common;
  common.metrics_listen = "127.0.0.1:9463";
  cvm::service::add_common_flags(app, common);
  cvm::agent::AgentConfig config;
  config.node_id = hostname();
  app.add_option("--node-id", config.node_id, "this node's id (default: the hostname)")
      ->capture_default_str();
  app.add_option("--state-dir", config.state_dir, "bundles, ID ranges and logs")
      ->capture_default_str();
  app.add_option("--runc-root", config.runc_root, "runc's state directory (--root)")
      ->capture_default_str();
  app.add_option("--path.procfs", config.roots.procfs, "procfs mountpoint")->capture_default_str();
  app.add_option("--path.sysfs", config.roots.sysfs, "sysfs mountpoint")->capture_default_str();
  app.add_option("--path.rootfs", config.roots.rootfs, "host root filesystem")
      ->capture_default_str();
  std::string pool =
      std::to_string(config.id_pool.start) + ":" + std::to_string(config.id_pool.count);
  app.add_option("--id-pool", pool, "START:COUNT host IDs handed out as 65536-wide ranges")
      ->capture_default_str();
  app.add_option("--runc", config.tools.runc, "runc binary")->capture_default_str();
  app.add_option("--umoci", config.tools.umoci, "umoci binary")->capture_default_str();
  app.add_option("--skopeo", config.tools.skopeo, "skopeo binary")->capture_default_str();
  app.add_option("--cvm-unpack", config.tools.unpack,
                 "the layer applier (default: cvm-unpack next to this executable)");
  app.add_option("--sysbox-runc", config.tools.sysbox_runc,
                 "sysbox-runc binary (used when present)")
      ->capture_default_str();
  app.add_option("--supervisor", config.supervisor_binary,
                 "cvm-supervisor binary (default: next to this executable)");
  app.add_option("--host-paths-root", config.host_paths_root,
                 "where the supervising container's hostPath mounts (/usr/src, /lib/modules, "
                 "/var/run, /var/lib) are taken from")
      ->capture_default_str();
  app.add_option("--dev-root", config.dev_root, "where NVIDIA device nodes are looked up")
      ->capture_default_str();
  app.add_option("--gpu-library-dir", config.gpu_library_dir,
                 "host folder of NVIDIA driver libraries bind-mounted into GPU workspaces");
  app.add_option("--image-cache", config.image_cache_dir,
                 "node image cache used with Caching on (default: <state-dir>/image-cache)");
  app.add_option("--registry-tls-verify", config.registry_tls_verify,
                 "verify registry TLS when pulling docker:// images (false: plain HTTP)")
      ->capture_default_str();
  double heartbeat_s = 5;
  app.add_option("--heartbeat-interval", heartbeat_s, "seconds between NodeStatus heartbeats")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  double grace_s = 10;
  app.add_option("--stop-grace", grace_s, "seconds between SIGTERM and SIGKILL on stop")
      ->capture_default_str();
  config.network.enabled = true;
  app.add_option("--network", config.network.enabled,
                 "give each CVM an eth0 through CNI (bridge, host-local, firewall)")
      ->capture_default_str();
  app.add_option("--network-subnet", config.network.subnet, "the workspaces' subnet")
      ->capture_default_str();
  app.add_option("--network-bridge", config.network.bridge, "the node's bridge")
      ->capture_default_str();
  app.add_option("--cni-bin-dir", config.network.cni_bin_dir, "where the CNI plugins are")
      ->capture_default_str();
  app.add_option("--network-dns", config.network.nameservers,
                 "the workspaces' DNS servers (default: the node's, less loopback ones)");
  app.add_option("--network-search", config.network.search, "the workspaces' DNS search domains");
  app.add_option("--allow-workspace-traffic", config.network.workspace_to_workspace,
                 "let workspaces on this node reach each other")
      ->capture_default_str();
  app.add_option("--lxcfs-dir", config.lxcfs_dir,
                 "lxcfs's mount, whose files give workspaces their own /proc/meminfo, ... "
                 "(empty: not used)")
      ->capture_default_str();
  app.add_option("--seccomp-profile", config.seccomp_profile,
                 "every workspace's seccomp profile: a file in the OCI linux.seccomp form "
                 "(deploy/seccomp/workspace.json is the built-in one), or 'unconfined'")
      ->capture_default_str();
  app.add_option("--tune-sysctls", config.tune_sysctls,
                 "raise fs.inotify limits that would stop systemd workspaces from booting")
      ->capture_default_str();
  app.add_option("--session-admins", config.session_admins,
                 "NATS users who may exec into every workspace of this node (others: their own)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--sessions-per-workspace", config.session_limits.per_workspace,
                 "concurrent exec/shell sessions a workspace may have (0: no limit)")
      ->capture_default_str();
  app.add_option("--sessions-per-user", config.session_limits.per_user,
                 "concurrent sessions one user may have on this node (0: no limit)")
      ->capture_default_str();
  int64_t idle_s = 0;
  app.add_option("--session-idle-timeout", idle_s,
                 "seconds without input or output that end a session (0: never)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  config.session_limits.idle = std::chrono::seconds(idle_s);
  config.heartbeat_interval = std::chrono::milliseconds(static_cast<int64_t>(heartbeat_s * 1000));
  config.stop_grace = std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  auto parsed = cvm::agent::parse_subid_pool("cvm:" + pool, "cvm");
  if (!parsed) {
    std::cerr << "cvm-node-agent: --id-pool: " << parsed.error().message << "\n";
    return 2;
  }
  config.id_pool = *parsed;

  return cvm::service::run_service("cvm-node-agent", common,
                                   [&](const cvm::service::ServiceContext& ctx) {
                                     return std::make_unique<cvm::agent::AgentService>(
                                         ctx.io, ctx.conn, ctx.metrics, ctx.clock, config);
                                   });
}
