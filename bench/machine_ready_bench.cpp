// machine_ready_bench: how long until a Debian workspace is a usable machine, through the node
// agent's launcher, against raw `runc run` of the very bundles it wrote, in the same run.
//
//   machine_ready_bench [--iterations N]      (root, runc, umoci, mmdebstrap; release build)
//
// Three instants after the launch call (the agent's work on an assignment, without NATS: the
// bus's share is agent_launch_bench's figure):
//   running  the launcher reports RUNNING (the supervisor saw the inner init start)
//   systemd  `systemctl is-system-running --wait` answers `running`
//   docker   the first `docker run --rm` of an image kept in the workspace's storage succeeds
// Cold: the node's image cache is emptied first (the launch unpacks the image into it). Warm: the
// cache holds the image (an ID-mapped overlay, no unpack). Raw: `runc run --detach` of the
// supervising bundle of the warm launch (the same cvm-supervisor inside, which runs the inner
// bundle), overlay still mounted; systemd and docker timed the same way. The network is off in
// these three (the raw run has no agent to attach it), so they compare the same work. Warm+net:
// the warm launch with the workspace network on (a CNI bridge of the bench's own, 10.252.0.0/24,
// removed at the end), as a node with --network runs it: its cost over warm is the attach.
// A load tool, not a test: it prints figures, it does not judge them.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/network.h"
#include "cvm/agent/process.h"
#include "cvm/agent/runtime.h"

namespace fs = std::filesystem;
using namespace cvm::agent;
using Steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

double ms(Steady::time_point a, Steady::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string in_ws(int pid, const std::string& command, int* code = nullptr) {
  ProcessOptions o;
  o.timeout = 180s;
  auto r =
      run_process({"nsenter", "-t", std::to_string(pid), "-a", "/usr/bin/env", "-i",
                   "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "/bin/sh", "-c", command},
                  o);
  if (code != nullptr) *code = r ? r->exit_code : -1;
  return r ? r->out : "";
}

struct Times {
  double running = 0, systemd = 0, docker = 0;
};

// From `t0` (the launch call): systemd running, then the first docker run.
bool wait_machine(int inner, Steady::time_point t0, Times& t, bool docker = true) {
  const std::string state =
      in_ws(inner,
            "for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 0.01; done; "
            "timeout 120 systemctl is-system-running --wait");
  t.systemd = ms(t0, Steady::now());
  if (state.rfind("running", 0) != 0) {
    std::cerr << "systemd: " << state << "\n";
    return false;
  }
  if (!docker) return true;
  int code = -1;
  for (int i = 0; i < 600 && code != 0; ++i) {
    in_ws(inner, "docker run --rm --network none bb:1 true 2>/dev/null", &code);
    if (code != 0) std::this_thread::sleep_for(20ms);
  }
  t.docker = ms(t0, Steady::now());
  if (code != 0) std::cerr << "docker run never succeeded\n";
  return code == 0;
}

using cvm::bench::median;

}  // namespace

int main(int argc, char** argv) {
  int iterations = 3;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iterations") iterations = std::max(1, std::atoi(argv[++i]));
  }
  if (::geteuid() != 0) {
    std::cerr << "machine_ready_bench: needs root\n";
    return 77;
  }
  const std::string images = "/var/cache/cvm-control/images";
  fs::create_directories(images);
  ProcessOptions long_run;
  long_run.timeout = std::chrono::minutes(15);
  if (auto b = run_tool({"/bin/sh", CVM_BUILD_DEBIAN_IMAGE_SCRIPT, images, "debian"}, long_run);
      !b) {
    std::cerr << "the Debian image: " << b.error().message << "\n";
    return 1;
  }
  const std::string work =
      fs::temp_directory_path() / ("machine-ready-bench-" + std::to_string(::getpid()));
  fs::create_directories(work + "/bb/bin");
  fs::permissions(work, fs::perms(0755));
  (void)run_tool({"/bin/sh", "-c",
                  "cp /bin/busybox " + work + "/bb/bin/ && ln -s busybox " + work +
                      "/bb/bin/true && tar -C " + work + "/bb -cf " + work + "/bb.tar ."});
  RuncRuntime runtime(RuncOptions{"runc", work + "/runc", 60s});
  ImageTool image_tool(ImageToolOptions{.tools = ToolPaths{.unpack = CVM_UNPACK_BIN},
                                        .staging_dir = work + "/staging",
                                        .cache_dir = work + "/cache"});
  LauncherConfig c;
  c.workspaces_dir = work + "/workspaces";
  c.supervisor_binary = CVM_SUPERVISOR_BIN;
  c.inner_runtime = "runc";
  c.host_paths_root = work + "/host";
  c.stop_grace = 20s;
  c.ready_timeout = 120s;
  if (auto b = read_cap_bounding(HostRoots{})) c.host_cap_bounding = *b;
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) c.host_nofile_hard = nofile.rlim_max;
  WorkspaceLauncher launcher(c, runtime, image_tool);
  if (auto st = launcher.prepare(); !st) {
    std::cerr << st.error().message << "\n";
    return 1;
  }
  NetworkConfig nc;
  nc.enabled = true;
  nc.name = "cvmbench";
  nc.bridge = "cvmbench0";
  nc.subnet = "10.252.0.0/24";
  nc.state_dir = work + "/network";
  nc.nameservers = {"10.252.0.1"};  // never queried: the bench resolves nothing
  WorkspaceNetwork network(nc);
  if (auto st = network.prepare(); !st) {
    std::cerr << "the workspace network: " << st.error().message << "\n";
    return 1;
  }
  LauncherConfig cn = c;
  cn.network = &network;
  WorkspaceLauncher net_launcher(cn, runtime, image_tool);
  if (auto st = net_launcher.prepare(); !st) {
    std::cerr << st.error().message << "\n";
    return 1;
  }
  auto pool = IdRangeAllocator::create(IdPool{4200000, 65536 * 2});
  LaunchRequest r;
  r.workspace_id = "bench-" + std::to_string(::getpid());
  r.build_id = "b-" + r.workspace_id;
  r.image = "oci:" + images + ":debian";
  r.caching = true;
  r.memory_bytes = 1ULL << 30;
  r.ids = *pool->allocate(r.workspace_id);

  const auto launch = [&](Times& t, bool docker = true, WorkspaceLauncher* with = nullptr) -> int {
    const auto t0 = Steady::now();
    auto out = (with != nullptr ? with : &launcher)->launch(r, nullptr);
    t.running = ms(t0, Steady::now());
    if (!out.ok) {
      std::cerr << "launch: " << out.message << "\n";
      return 0;
    }
    const int inner = find_inner_host_pid("/proc", out.pid);
    return inner > 0 && wait_machine(inner, t0, t, docker) ? inner : 0;
  };
  const auto teardown = [&](WorkspaceLauncher* with = nullptr) {
    (void)(with != nullptr ? with : &launcher)->stop(r.workspace_id);
    (void)(with != nullptr ? with : &launcher)->remove(r.workspace_id, false);
  };

  // Once: the image docker runs, kept in the workspace's storage from then on.
  Times prime;
  const int inner = launch(prime, /*docker=*/false);
  if (inner == 0) return 1;
  fs::copy_file(work + "/bb.tar", "/proc/" + std::to_string(inner) + "/root/root/bb.tar");
  in_ws(inner, "docker import /root/bb.tar bb:1 >/dev/null");
  teardown();

  std::vector<double> cold[3], warm[3], raw[3], net[3];
  for (int i = 0; i < iterations; ++i) {
    Times t;
    fs::remove_all(work + "/cache");  // cold: the launch unpacks into the node cache
    if (launch(t) == 0) return 1;
    cold[0].push_back(t.running), cold[1].push_back(t.systemd), cold[2].push_back(t.docker);
    teardown();
    std::this_thread::sleep_for(200ms);
    Times w;
    if (launch(w) == 0) return 1;
    warm[0].push_back(w.running), warm[1].push_back(w.systemd), warm[2].push_back(w.docker);

    // Raw: the warm launch's bundles, its container deleted, its leftovers reset.
    const std::string dir = launcher.workspace_dir(r.workspace_id);
    const std::string id = WorkspaceLauncher::container_id(r.workspace_id);
    (void)run_process({"runc", "--root", work + "/runc", "kill", id, "KILL"});
    std::this_thread::sleep_for(300ms);
    (void)run_process({"runc", "--root", work + "/runc", "delete", "--force", id});
    fs::remove_all(dir + "/run");
    fs::create_directories(dir + "/run");
    for (const auto& e : fs::directory_iterator(dir + "/supervisor/rootfs"))
      fs::remove_all(e.path());
    std::this_thread::sleep_for(200ms);
    Times rt;
    const auto t0 = Steady::now();
    ProcessOptions o;
    o.stdout_file = o.stderr_file = dir + "/raw.log";
    auto ran = run_process({"runc", "--root", work + "/runc", "run", "--detach", "--pid-file",
                            dir + "/raw.pid", "--bundle", dir + "/supervisor", id},
                           o);
    int sup = 0;
    if (ran && ran->success()) {
      if (auto pid = run_process({"cat", dir + "/raw.pid"}); pid && pid->success()) {
        sup = std::atoi(pid->out.c_str());
      }
    }
    int raw_inner = 0;
    for (int k = 0; k < 6000 && sup > 0 && raw_inner == 0; ++k) {
      raw_inner = find_inner_host_pid("/proc", sup);
      if (raw_inner == 0) std::this_thread::sleep_for(1ms);
    }
    rt.running = ms(t0, Steady::now());
    if (raw_inner == 0 || !wait_machine(raw_inner, t0, rt)) {
      std::cerr << "raw runc run failed\n";
      return 1;
    }
    raw[0].push_back(rt.running), raw[1].push_back(rt.systemd), raw[2].push_back(rt.docker);
    teardown();
    std::this_thread::sleep_for(200ms);
    Times n;
    if (launch(n, true, &net_launcher) == 0) return 1;
    net[0].push_back(n.running), net[1].push_back(n.systemd), net[2].push_back(n.docker);
    teardown(&net_launcher);
    std::this_thread::sleep_for(200ms);
    std::cout << "iteration " << i << ": cold " << t.running << "/" << t.systemd << "/" << t.docker
              << " ms, warm " << w.running << "/" << w.systemd << "/" << w.docker << " ms, raw "
              << rt.running << "/" << rt.systemd << "/" << rt.docker << " ms, warm+net "
              << n.running << "/" << n.systemd << "/" << n.docker << " ms\n";
  }
  (void)launcher.remove(r.workspace_id, true);
  const char* names[3] = {"running", "systemd running", "first docker run"};
  std::cout << "\nmedians over " << iterations
            << " (ms from the launch call; raw: from runc run)\n";
  std::cout << "step               cold      warm      raw runc  warm/raw  warm+net\n";
  for (int k = 0; k < 3; ++k) {
    const double cw = median(cold[k]), ww = median(warm[k]), rw = median(raw[k]);
    std::printf("%-17s %8.0f  %8.0f  %8.0f  %7.2f  %8.0f\n", names[k], cw, ww, rw,
                rw > 0 ? ww / rw : 0, median(net[k]));
  }
  // The bench's bridge and its guard rule go with it; the NAT rules went with each detach.
  (void)run_process(
      {"/bin/sh", "-c",
       "ip link del cvmbench0; iptables -w -D INPUT -i cvmbench0 -j CVM-ISOLATE; true"});
  fs::remove_all(work);
  return 0;
}
