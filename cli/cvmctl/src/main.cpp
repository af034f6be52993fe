// cvmctl: the command line of cvm-control. main() only parses flags; the commands live in
// commands.cpp.
#include <iostream>

#include <CLI/CLI.hpp>

#include "cvm/cli/commands.h"

int main(int argc, char** argv) {
  using namespace cvm::cli;
  CLI::App app{"cvmctl: build, stop and inspect CVM workspaces"};
  app.require_subcommand(1);
  GlobalOptions global;
  app.add_option("--nats-url", global.nats_url, "NATS server URL")
      ->capture_default_str()
      ->envname("CVM_NATS_URL");
  app.add_option("--nats-user", global.nats_user)->envname("CVM_NATS_USER");
  app.add_option("--nats-password", global.nats_password)->envname("CVM_NATS_PASSWORD");
  app.add_option("-o,--output", global.output, "text or json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));

  auto* build = app.add_subcommand("build", "start, stop or delete a workspace build");
  build->require_subcommand(1);
  BuildOptions opts;
  int timeout_s = 300;
  bool cvm = false;
  bool no_cvm = false;
  auto add_common = [&](CLI::App* cmd) {
    cmd->add_option("--workspace", opts.workspace, "workspace id")->required();
    cmd->add_option("--build-id", opts.build_id, "build id (default: generated)");
    cmd->add_flag("--watch", opts.watch, "print each phase until a terminal one");
    cmd->add_option("--timeout", timeout_s, "seconds --watch waits")->capture_default_str();
  };
  auto* start = build->add_subcommand("start", "build and start a workspace");
  add_common(start);
  start->add_option("--image", opts.image, "oci:PATH:TAG or docker://HOST/REPO:TAG")->required();
  start->add_option("--owner", opts.owner, "who owns the workspace");
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

  auto* nodes = app.add_subcommand("nodes", "list registered nodes and their capabilities");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  opts.timeout = std::chrono::seconds(timeout_s);
  if (cvm) opts.use_cvm = true;
  if (no_cvm) opts.use_cvm = false;

  if (start->parsed()) return build_command(global, opts, cvm::v1::START, std::cout, std::cerr);
  if (stop->parsed()) return build_command(global, opts, cvm::v1::STOP, std::cout, std::cerr);
  if (del->parsed()) return build_command(global, opts, cvm::v1::DELETE, std::cout, std::cerr);
  if (nodes->parsed()) return nodes_command(global, std::cout, std::cerr);
  return kExitUsage;
}
