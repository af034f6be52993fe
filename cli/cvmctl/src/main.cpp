// cvmctl: the command line of cvm-control. main() only parses flags; the commands live in
// commands.cpp.
#include <unistd.h>

#include <iostream>

#include <CLI/CLI.hpp>

#include "cvm/cli/commands.h"

int main(int argc, char** argv) {
  using namespace cvm::cli;
  CLI::App app{"cvmctl: build, stop and inspect CVM workspaces"};
  app.require_subcommand(1);
  // Global flags are accepted after the subcommand too: `cvmctl nodes -o json`.
  app.fallthrough();
  app.footer(
      "Exit codes: 0 ok, 1 the build FAILED, 2 bad usage, 3 NATS or a service unavailable, "
      "4 --watch timed out, 5 no such build (events) or workspace (logs); exec and shell exit "
      "with the command's status, or 255 when there was no session.");
  GlobalOptions global;
  bool plain = false;
  app.add_option("--nats-url", global.nats_url, "NATS server URL(s), comma-separated")
      ->capture_default_str()
      ->envname("CVM_NATS_URL");
  app.add_option("--nats-user", global.nats_user)->envname("CVM_NATS_USER");
  app.add_option("--nats-password", global.nats_password)->envname("CVM_NATS_PASSWORD");
  app.add_option("-o,--output", global.output, "text or json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  app.add_flag("--plain", plain, "no live progress line, even on a terminal");

  auto* build = app.add_subcommand("build", "start, stop, delete or watch a workspace build");
  build->require_subcommand(1);
  BuildOptions opts;
  int timeout_s = 300;
  bool cvm = false;
  bool no_cvm = false;
  std::string build_id;
  auto add_timeout = [&](CLI::App* cmd) {
    cmd->add_option("--timeout", timeout_s, "seconds to wait for a final phase")
        ->capture_default_str();
  };
  auto add_common = [&](CLI::App* cmd) {
    cmd->add_option("--workspace", opts.workspace, "workspace id")->required();
    cmd->add_option("--build-id", opts.build_id, "build id (default: generated)");
    cmd->add_flag("--watch", opts.watch, "follow the build until a final phase");
    add_timeout(cmd);
  };
  auto* start = build->add_subcommand("start", "build and start a workspace");
  add_common(start);
  start->add_option("--image", opts.image, "oci:PATH:TAG or docker://HOST/REPO:TAG")->required();
  start->add_option("--owner", opts.owner,
                    "who owns the workspace and may exec into it (default: you, see exec)");
  start->add_option("--cpu", opts.cpu, "CPU limit: 500m, 1, 2.5");
  start->add_option("--memory", opts.memory, "memory limit: 512Mi, 2Gi");
  start->add_option("--gpus", opts.gpus, "number of GPUs");
  start->add_option("--gpu-vendor", opts.gpu_vendor, "nvidia or amd")
      ->check(CLI::IsMember({"nvidia", "amd"}));
  start->add_option("--gpu-min-memory", opts.gpu_min_memory, "minimum memory per GPU: 16Gi");
  start->add_flag("--tun", opts.tun, "expose /dev/net/tun");
  start->add_flag("--fuse", opts.fuse, "expose /dev/fuse");
  auto* cvm_flag = start->add_flag("--cvm", cvm, "run as a CVM (overrides the admin default)");
  start->add_flag("--no-cvm", no_cvm, "run as a plain container")->excludes(cvm_flag);
  auto* stop = build->add_subcommand("stop", "stop a workspace's container");
  add_common(stop);
  auto* del = build->add_subcommand("delete", "stop a workspace and remove its files");
  add_common(del);
  auto* watch = build->add_subcommand("watch", "follow a build: its history, then live events");
  watch->add_option("BUILD_ID", build_id, "the id `build start` printed")->required();
  add_timeout(watch);

  auto* events = app.add_subcommand("events", "print the events of a build so far");
  events->add_option("BUILD_ID", build_id, "the id `build start` printed")->required();
  auto* logs = app.add_subcommand("logs", "a workspace's console: what its init printed");
  LogsOptions logs_opts;
  logs->add_option("WORKSPACE", logs_opts.workspace, "workspace id")->required();
  logs->add_flag("-f,--follow", logs_opts.follow, "keep printing until the workspace is deleted");
  logs->add_option("--tail", logs_opts.tail_lines, "only the last N lines, then what follows");
  auto* workspaces = app.add_subcommand("workspaces", "workspaces: phase, node, owner, resources");
  std::string ws_node;
  std::string ws_owner;
  workspaces->add_option("--node", ws_node, "only those on this node");
  workspaces->add_option("--owner", ws_owner, "only those of this owner");
  auto* nodes = app.add_subcommand("nodes", "nodes: capabilities, runtime, capacity, GPUs");
  ExecOptions exec_opts;
  auto* exec = app.add_subcommand(
      "exec", "run a command inside a workspace: cvmctl exec WS [-i] [-t] -- CMD ARGS...");
  exec->add_option("workspace", exec_opts.workspace, "workspace id")->required();
  exec->add_option("command", exec_opts.argv, "the command and its arguments (after --)")
      ->required();
  exec->add_flag("-i,--interactive", exec_opts.interactive, "send stdin to the command");
  exec->add_flag("-t,--tty", exec_opts.tty, "give the command a terminal");
  auto* shell = app.add_subcommand("shell", "a login shell inside a workspace, on a terminal");
  shell->add_option("workspace", exec_opts.workspace, "workspace id")->required();
  for (auto* cmd : {exec, shell}) {
    cmd->add_option("-u,--user", exec_opts.user,
                    "user inside the workspace: name, uid, uid:gid (default: the image's)");
    cmd->add_option("-w,--workdir", exec_opts.cwd, "working directory (default: the user's home)");
    cmd->add_option("-e,--env", exec_opts.env, "K=V for the command's environment")
        ->allow_extra_args(false);
  }
  std::string proxy_ws;
  uint16_t proxy_port = 0;
  auto* proxy = app.add_subcommand(
      "proxy",
      "stdin/stdout to a TCP port inside a workspace (ssh -o ProxyCommand='cvmctl proxy "
      "%h 22')");
  proxy->add_option("workspace", proxy_ws, "workspace id")->required();
  proxy->add_option("port", proxy_port, "port on the workspace's loopback")
      ->required()
      ->check(CLI::Range(1, 65535));
  std::string forward_ws;
  std::string forward_ports;
  auto* forward = app.add_subcommand(
      "port-forward", "listen on 127.0.0.1:LOCAL and carry each connection to REMOTE inside");
  forward->add_option("workspace", forward_ws, "workspace id")->required();
  forward->add_option("ports", forward_ports, "LOCAL:REMOTE, or PORT for both (LOCAL 0: any)")
      ->required();
  auto* gpus = app.add_subcommand("gpus", "GPUs of every node, their health and leases");
  auto* dead_letters = app.add_subcommand(
      "dead-letters", "requests the scheduler gave up on (CVM_DEAD_LETTERS), newest last");
  uint64_t limit = 20;
  dead_letters->add_option("--limit", limit, "how many of the newest to show; 0: all")
      ->capture_default_str();
  auto* settings = app.add_subcommand("settings", "the admin's infrastructure settings");
  settings->require_subcommand(1);
  auto* get = settings->add_subcommand("get", "show the settings in force");
  auto* set = settings->add_subcommand("set", "change settings: KEY=VALUE ...");
  std::vector<std::string> assignments;
  set->add_option("KEY=VALUE", assignments, "e.g. caching=true auto_load_shiftfs=false")
      ->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  opts.timeout = std::chrono::seconds(timeout_s);
  if (cvm) opts.use_cvm = true;
  if (no_cvm) opts.use_cvm = false;
  global.live = !plain && global.output == "text" && isatty(STDOUT_FILENO) == 1;

  auto& out = std::cout;
  auto& err = std::cerr;
  if (start->parsed()) return build_command(global, opts, cvm::v1::START, out, err);
  if (stop->parsed()) return build_command(global, opts, cvm::v1::STOP, out, err);
  if (del->parsed()) return build_command(global, opts, cvm::v1::DELETE, out, err);
  if (watch->parsed()) return watch_command(global, build_id, opts.timeout, out, err);
  if (events->parsed()) return events_command(global, build_id, out, err);
  if (logs->parsed()) return logs_command(global, logs_opts, out, err);
  if (exec->parsed()) return exec_command(global, exec_opts, err);
  if (proxy->parsed()) return proxy_command(global, proxy_ws, proxy_port, err);
  if (forward->parsed()) {
    const auto ports = parse_port_pair(forward_ports);
    if (!ports) {
      err << "cvmctl: '" << forward_ports << "' is not LOCAL:REMOTE or PORT\n";
      return kExitUsage;
    }
    return port_forward_command(global, forward_ws, ports->first, ports->second, out, err);
  }
  if (shell->parsed()) {
    exec_opts.interactive = true;
    exec_opts.tty = true;
    return exec_command(global, exec_opts, err);
  }
  if (workspaces->parsed()) return workspaces_command(global, ws_node, ws_owner, out, err);
  if (nodes->parsed()) return nodes_command(global, out, err);
  if (gpus->parsed()) return gpus_command(global, out, err);
  if (dead_letters->parsed()) return dead_letters_command(global, limit, out, err);
  if (get->parsed()) return settings_get_command(global, out, err);
  if (set->parsed()) return settings_set_command(global, assignments, out, err);
  return kExitUsage;
}
