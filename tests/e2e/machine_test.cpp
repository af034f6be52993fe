// The workspace is a real machine: a CVM made from an ordinary Debian image (mmdebstrap with
// systemd, dbus, docker.io, sudo; scripts/build-debian-image.sh, cached by its recipe) is launched
// by WorkspaceLauncher with real runc and cvm-supervisor, and checked from inside: systemd as PID 1
// reaches `running`, dockerd runs on overlay2 and runs and builds containers, sudo/su/ping work for
// a non-root user in the docker group, namespaced sysctls are writable and the node's are not, the
// cgroup limits cannot be raised from inside, the console goes to the console log, Docker's images
// survive STOP/START and go with DELETE, `docker pull` works from a registry the test runs in its
// own network namespace, an image the inner Docker builds and saves unpacks on the node as umoci
// unpacks it, `poweroff` ends the workspace, and all of it runs under the workspace's seccomp
// filter, which denies the calls a workspace never needs.
//
// Needs root, runc, umoci and mmdebstrap (the README's install step adds them) and the apt mirror
// the first time. Fails, not skips, when the image cannot be built as root: that is the CVM test.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cvm/agent/capabilities.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/network.h"
#include "cvm/agent/process.h"
#include "cvm/agent/runtime.h"
#include "cvm/test/files.h"
#include "cvm/test/tree_compare.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cvm::test::read_file;

std::string make_temp_dir(const std::string& prefix) {
  std::string templ = (fs::temp_directory_path() / (prefix + ".XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) return {};
  fs::permissions(templ, fs::perms(0755));
  return templ;
}

std::string image_cache() {
  const char* dir = std::getenv("CVM_TEST_IMAGE_CACHE");
  return dir != nullptr && *dir != '\0' ? dir : "/var/cache/cvm-control/images";
}

class MachineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::geteuid() != 0) {
      skip_ = new std::string("needs root (runc, umoci, nested containers)");
      return;
    }
    skip_ = new std::string();
    ProcessOptions o;
    o.timeout = 900s;  // the first build downloads ~100 MB of packages
    auto built = run_tool({"/bin/sh", CVM_BUILD_DEBIAN_IMAGE_SCRIPT, image_cache(), "debian"}, o);
    build_error_ = new std::string(built ? "" : built.error().message);
    // A tiny image for the inner Docker (no registry is reachable from here).
    busybox_tar_ = new std::string(make_temp_dir("cvm-machine-bb") + "/bb.tar");
    const std::string root = fs::path(*busybox_tar_).parent_path().string() + "/root";
    auto made = run_tool({"/bin/sh", "-c",
                          "set -e; mkdir -p " + root + "/bin; cp /bin/busybox " + root +
                              "/bin/; for a in sh echo cat id sleep; do ln -s busybox " + root +
                              "/bin/$a; done; tar -C " + root + " -cf " + *busybox_tar_ + " ."});
    if (!made && build_error_->empty()) *build_error_ = made.error().message;
  }
  static void TearDownTestSuite() {
    if (busybox_tar_ != nullptr) fs::remove_all(fs::path(*busybox_tar_).parent_path());
    delete skip_;
    delete build_error_;
    delete busybox_tar_;
    skip_ = build_error_ = busybox_tar_ = nullptr;
  }

  void SetUp() override {
    if (!skip_->empty()) GTEST_SKIP() << *skip_;
    ASSERT_TRUE(build_error_->empty()) << "the Debian image: " << *build_error_;
    work_ = make_temp_dir("cvm-machine");
    ASSERT_FALSE(work_.empty());
    runtime_ = std::make_unique<RuncRuntime>(RuncOptions{"runc", work_ + "/runc", 60s});
    images_ =
        std::make_unique<ImageTool>(ImageToolOptions{.tools = ToolPaths{.unpack = CVM_UNPACK_BIN},
                                                     .staging_dir = work_ + "/staging",
                                                     .cache_dir = work_ + "/cache"});
    LauncherConfig c;
    c.workspaces_dir = work_ + "/workspaces";
    c.supervisor_binary = CVM_SUPERVISOR_BIN;
    c.inner_runtime = "runc";
    c.host_paths_root = work_ + "/host";  // no host paths: the rows are not what is tested here
    c.stop_grace = 20s;
    c.ready_timeout = 120s;
    if (auto b = read_cap_bounding(HostRoots{})) c.host_cap_bounding = *b;
    rlimit nofile{};
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) c.host_nofile_hard = nofile.rlim_max;
    config_ = c;
    launcher_ = std::make_unique<WorkspaceLauncher>(c, *runtime_, *images_);
    ASSERT_TRUE(launcher_->prepare().ok());
    auto pool = IdRangeAllocator::create(IdPool{4000000, 65536 * 4});
    ASSERT_TRUE(pool.ok());
    ids_ = std::make_unique<IdRangeAllocator>(std::move(*pool));
  }

  void TearDown() override {
    if (launcher_) {
      for (const auto& ws : launched_) {
        (void)launcher_->stop(ws);
        (void)launcher_->remove(ws, true);
      }
    }
    std::error_code ec;
    if (!work_.empty() && !HasFailure()) fs::remove_all(work_, ec);
  }

  LaunchRequest request(const std::string& name, bool caching = true) {
    LaunchRequest r;
    r.workspace_id = name + "-" + std::to_string(::getpid());
    r.build_id = "b-" + r.workspace_id;
    r.image = "oci:" + image_cache() + ":debian";
    r.caching = caching;
    r.memory_bytes = 1ULL << 30;
    r.cpu_millicores = 0;  // no quota asked for: none applied
    r.tun = true;
    r.fuse = true;
    auto ids = ids_->allocate(r.workspace_id);
    EXPECT_TRUE(ids.ok());
    if (ids) r.ids = *ids;
    return r;
  }

  // Launches and waits for systemd to finish booting; returns the inner init's host pid.
  int boot(const LaunchRequest& r) {
    if (std::find(launched_.begin(), launched_.end(), r.workspace_id) == launched_.end()) {
      launched_.push_back(r.workspace_id);
    }
    auto out = launcher_->launch(r, nullptr);
    EXPECT_TRUE(out.ok) << out.message;
    if (!out.ok) return 0;
    supervisor_pid_ = out.pid;
    const int inner = find_inner_host_pid("/proc", out.pid);
    EXPECT_GT(inner, 0);
    inner_ = inner;
    // systemctl needs systemd's private socket, made a moment into the boot.
    auto state =
        sh("for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 0.1; done; "
           "timeout 90 systemctl is-system-running --wait; true");
    state_ = state;
    return inner;
  }

  // Runs a shell command inside the inner container as its root (all of its namespaces).
  std::string sh(const std::string& command, int* exit_code = nullptr) {
    ProcessOptions o;
    o.timeout = 180s;
    auto r = run_process({"nsenter", "-t", std::to_string(inner_), "-a", "/usr/bin/env", "-i",
                          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                          "HOME=/root", "/bin/sh", "-c", command},
                         o);
    if (!r) return "<nsenter: " + r.error().message + ">";
    if (exit_code != nullptr) *exit_code = r->exit_code;
    return r->out + r->err;
  }

  // A shell command on the node; its stdout.
  static std::string read_tool(const std::string& command) {
    auto r = run_process({"/bin/bash", "-c", command});
    return r ? r->out : "";
  }

  std::string why(const std::string& ws) {
    return "\nfailed units: " + sh("systemctl --failed --no-pager --no-legend") +
           "\nconsole: " + read_file(launcher_->console_log(ws)).substr(0, 4000) +
           "\ninner.log: " + read_file(launcher_->workspace_dir(ws) + "/run/inner.log");
  }

  static std::string trimmed(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s;
  }

  // Relaunches the launcher with a workspace network (a member: TearDown's launcher points at it).
  ::testing::AssertionResult use_network(const NetworkConfig& nc) {
    network_ = std::make_unique<WorkspaceNetwork>(nc);
    if (auto ok = network_->prepare(); !ok.ok()) {
      return ::testing::AssertionFailure() << network_->ready().error().message;
    }
    LauncherConfig c = config_;
    c.network = network_.get();
    launcher_ = std::make_unique<WorkspaceLauncher>(c, *runtime_, *images_);
    if (!launcher_->prepare().ok()) return ::testing::AssertionFailure() << "launcher prepare";
    return ::testing::AssertionSuccess();
  }

  static inline std::string* skip_ = nullptr;
  static inline std::string* build_error_ = nullptr;
  static inline std::string* busybox_tar_ = nullptr;
  std::string work_;
  LauncherConfig config_;
  std::unique_ptr<RuncRuntime> runtime_;
  std::unique_ptr<ImageTool> images_;
  std::unique_ptr<WorkspaceNetwork> network_;  // before launcher_, which may point at it
  std::unique_ptr<WorkspaceLauncher> launcher_;
  std::unique_ptr<IdRangeAllocator> ids_;
  std::vector<std::string> launched_;
  int inner_ = 0;
  int supervisor_pid_ = 0;
  std::string state_;
};

TEST_F(MachineTest, SystemdBootsToRunningAndDockerRunsAndBuilds) {
  auto r = request("machine");
  ASSERT_GT(boot(r), 0);
  EXPECT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  EXPECT_EQ(trimmed(sh("cat /proc/1/comm")), "systemd");
  EXPECT_EQ(trimmed(sh("systemd-detect-virt --container")), "container-other");

  // dockerd started at boot, on overlay2 (its storage is the workspace's, not the overlay rootfs).
  EXPECT_EQ(trimmed(sh("systemctl is-active docker")), "active") << why(r.workspace_id);
  EXPECT_EQ(trimmed(sh("docker info --format '{{.Driver}}'")), "overlay2");
  EXPECT_NE(sh("findmnt -n -o TARGET /var/lib/docker"), "");

  // docker run and docker build, from an image imported from a tarball.
  fs::copy_file(*busybox_tar_, "/proc/" + std::to_string(inner_) + "/root/root/bb.tar",
                fs::copy_options::overwrite_existing);
  int code = -1;
  sh("docker import /root/bb.tar bb:1", &code);
  ASSERT_EQ(code, 0);
  EXPECT_EQ(trimmed(sh("docker run --rm bb:1 echo hello-from-docker")), "hello-from-docker");
  const std::string built = sh(
      "mkdir -p /root/ctx && printf 'FROM bb:1\\nRUN echo built > /built\\n' > "
      "/root/ctx/Dockerfile && DOCKER_BUILDKIT=0 docker build -q -t bb:2 /root/ctx >/dev/null && "
      "docker run --rm bb:2 cat /built");
  EXPECT_EQ(trimmed(built), "built");
  // Docker's bridge network works inside (its own iptables in the workspace's netns).
  EXPECT_NE(sh("docker network inspect bridge --format '{{range .IPAM.Config}}{{.Subnet}}{{end}}'"),
            "");
}

// The workspace's seccomp filter (deploy/seccomp/workspace.json, built in): PID 1 runs under it,
// without no_new_privs (sudo), and a process systemd starts, as every process of a user is, gets
// EPERM from the calls a workspace never needs (ENOSYS from the keyring's), while mounts and
// namespaces, which systemd and the inner Docker need (the test above runs under the same filter),
// still work. Without the filter keyctl and userfaultfd (user-mode only) would succeed and
// io_uring_setup and perf_event_open would fail with EFAULT, so these answers are the filter's.
TEST_F(MachineTest, ASyscallFilterDeniesTheKernelsAttackSurfaceAndKeepsTheMachine) {
  auto r = request("filtered");
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  const std::string status = sh("grep -E '^(Seccomp|NoNewPrivs):' /proc/1/status");
  EXPECT_NE(status.find("Seccomp:\t2"), std::string::npos) << status;
  EXPECT_NE(status.find("NoNewPrivs:\t0"), std::string::npos) << status;
  // The capabilities a workspace never needs are out of its bounding set (CAP_SYS_TIME is 25,
  // CAP_SYS_MODULE 16); CAP_SYS_ADMIN (21) is in, in its own user namespace.
  auto bounding = parse_status_cap_mask(sh("cat /proc/1/status"));
  ASSERT_TRUE(bounding.ok());
  EXPECT_EQ((*bounding >> 25) & 1, 0u);
  EXPECT_EQ((*bounding >> 16) & 1, 0u);
  EXPECT_EQ((*bounding >> 21) & 1, 1u);

  // x86_64 numbers; each call's errno (0: it succeeded). Written into the workspace from the node.
  std::ofstream("/proc/" + std::to_string(inner_) + "/root/root/probe.pl")
      << "my @c = (['keyctl', 250, 0, -3, 0], ['bpf', 321, 0, 0, 0],\n"
         "  ['perf_event_open', 298, 0, 0, -1, -1, 0], ['kexec_load', 246, 0, 0, 0, 0],\n"
         "  ['open_by_handle_at', 304, -1, 0, 0], ['userfaultfd', 323, 1],\n"
         "  ['init_module', 175, 0, 0, 0], ['io_uring_setup', 425, 1, 0]);\n"
         "for my $c (@c) {\n"
         "  my ($n, $nr, @a) = @$c;\n"
         "  $! = 0;\n"
         "  my $r = syscall($nr, @a);\n"
         "  printf(\"%s=%d\\n\", $n, $r == -1 ? $! + 0 : 0);\n"
         "}\n";
  const std::string got =
      sh("systemd-run --wait --pipe --quiet --collect /usr/bin/perl /root/probe.pl 2>&1");
  for (const char* denied : {"bpf", "perf_event_open", "kexec_load", "open_by_handle_at",
                             "userfaultfd", "init_module", "io_uring_setup"}) {
    EXPECT_NE(got.find(std::string(denied) + "=1\n"), std::string::npos) << denied << ":\n" << got;
  }
  EXPECT_NE(got.find("keyctl=38\n"), std::string::npos) << got;

  // What a machine needs still works under the filter: a mount in a namespace of its own, a host
  // name in a UTS namespace, sudo.
  EXPECT_EQ(trimmed(sh("systemd-run --wait --pipe --quiet --collect unshare -m -u sh -c "
                       "'mount -t tmpfs t /mnt && hostname inner && hostname' 2>&1")),
            "inner");
  EXPECT_EQ(trimmed(sh("systemd-run --wait --pipe --quiet --collect "
                       "su -s /bin/sh dev -c 'sudo -n id -u' 2>&1")),
            "0");
}

TEST_F(MachineTest, UserToolsWorkAndNodeBoundariesHold) {
  auto r = request("tools");
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);

  // A non-root user: sudo (setuid: the rootfs is not nosuid), docker through the docker group.
  EXPECT_EQ(trimmed(sh("su -s /bin/sh dev -c 'id -u; sudo -n id -u' 2>&1")), "1000\n0");
  // The machine's name is the workspace's, and resolves.
  EXPECT_EQ(trimmed(sh("hostname")), r.workspace_id);
  EXPECT_NE(sh("getent hosts " + r.workspace_id), "");
  EXPECT_NE(sh("su -s /bin/sh dev -c 'docker ps' 2>&1").find("CONTAINER ID"), std::string::npos);
  EXPECT_NE(sh("su -s /bin/sh dev -c 'ping -c1 -W2 127.0.0.1' 2>&1").find("1 received"),
            std::string::npos)
      << sh("su -s /bin/sh dev -c 'ping -c1 -W2 127.0.0.1' 2>&1; getcap /usr/bin/ping");
  EXPECT_EQ(trimmed(sh("exec 3<>/dev/fuse && echo ok")), "ok");
  EXPECT_EQ(trimmed(sh("exec 3<>/dev/net/tun && echo ok")), "ok");

  // Namespaced sysctls are the workspace's; the node's are not.
  int code = -1;
  sh("echo 1 > /proc/sys/net/ipv4/ip_forward", &code);
  EXPECT_EQ(code, 0);
  sh("echo 3 > /proc/sys/vm/drop_caches", &code);
  EXPECT_NE(code, 0) << "a node-wide sysctl was writable";
  sh("echo 10 > /proc/sys/vm/swappiness", &code);
  EXPECT_NE(code, 0) << "a node-wide sysctl was writable";
  sh("echo 100000 > /proc/sys/fs/file-max", &code);
  EXPECT_NE(code, 0) << "a node-wide sysctl was writable";

  // systemd owns its cgroup (it made init.scope), but the limits on it stay the node's.
  EXPECT_EQ(trimmed(sh("grep -q 'name=systemd:/init.scope$' /proc/1/cgroup && echo yes")), "yes")
      << sh("cat /proc/1/cgroup");
  sh("echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes", &code);
  EXPECT_NE(code, 0) << "the workspace raised its own memory limit";
  sh("echo -1 > /sys/fs/cgroup/pids/pids.max", &code);
  EXPECT_NE(code, 0) << "the workspace raised its own pids limit";
  // No CPU quota was asked for: none is applied.
  EXPECT_EQ(trimmed(sh("cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us")), "-1");
  // uid 0 inside is the range's first ID outside.
  struct stat st {};
  ASSERT_EQ(::stat(("/proc/" + std::to_string(inner_)).c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, r.ids.base);

  // The console of PID 1 is in the console log.
  EXPECT_NE(read_file(launcher_->console_log(r.workspace_id)).find("Welcome to"), std::string::npos)
      << read_file(launcher_->console_log(r.workspace_id));
}

TEST_F(MachineTest, DockerImagesSurviveStopStartAndGoWithDelete) {
  auto r = request("persist");
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  fs::copy_file(*busybox_tar_, "/proc/" + std::to_string(inner_) + "/root/root/bb.tar",
                fs::copy_options::overwrite_existing);
  int code = -1;
  sh("docker import /root/bb.tar kept:1", &code);
  ASSERT_EQ(code, 0);

  // STOP: systemd halts (SIGRTMIN+3) well within the grace, rather than being killed after it.
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(launcher_->stop(r.workspace_id).ok());
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, config_.stop_grace) << "systemd did not halt on the stop signal";
  ASSERT_TRUE(launcher_->remove(r.workspace_id, false).ok());
  EXPECT_NE(read_file(launcher_->console_log(r.workspace_id)).find("System Halt"),
            std::string::npos)
      << "no orderly shutdown on the console";

  // START again: the image is still there.
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  EXPECT_EQ(trimmed(sh("docker images --format '{{.Repository}}:{{.Tag}}' kept")), "kept:1");

  // DELETE: the storage goes.
  (void)launcher_->stop(r.workspace_id);
  ASSERT_TRUE(launcher_->remove(r.workspace_id, true).ok());
  EXPECT_FALSE(fs::exists(launcher_->storage_dir(r.workspace_id)));
}

TEST_F(MachineTest, PoweroffEndsTheWorkspace) {
  auto r = request("poweroff", /*caching=*/false);  // the unpack path, once
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  sh("systemctl poweroff");
  const std::string status = launcher_->workspace_dir(r.workspace_id) + "/run/status.json";
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline &&
         read_file(status).find("\"exited\"") == std::string::npos) {
    std::this_thread::sleep_for(200ms);
  }
  auto parsed = parse_supervisor_status(read_file(status));
  ASSERT_TRUE(parsed.ok()) << read_file(status);
  EXPECT_EQ(parsed->state, SupervisorStatus::State::kExited) << read_file(status);
  EXPECT_TRUE(is_shutdown_exit(parsed->code)) << "poweroff exit status " << parsed->code;
  // The supervising container ends with its inner init.
  bool stopped = false;
  while (std::chrono::steady_clock::now() < deadline && !stopped) {
    auto state = runtime_->state(WorkspaceLauncher::container_id(r.workspace_id));
    stopped = !state || state->status == ContainerStatus::kStopped;
    if (!stopped) std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(stopped) << "the supervisor outlived its inner init";
}

// A network namespace this test makes for its servers, at 10.250.0.2, reached from the node
// through a veth pair on 10.250.0.0/30. Traffic goes only to namespaces made here.
struct ServerNamespace {
  std::string ns, veth, bridge;
  std::string error;
  explicit ServerNamespace(const std::string& tag, std::string workspace_bridge)
      : ns("cvmsrv" + tag), veth("cvmv" + tag), bridge(std::move(workspace_bridge)) {
    auto made = run_tool({"/bin/sh", "-c",
                          "set -e; ip netns add " + ns + "; ip link add " + veth +
                              " type veth peer name eth0 netns " + ns +
                              "; ip addr add 10.250.0.1/30 dev " + veth + "; ip link set " + veth +
                              " up; ip -n " + ns + " addr add 10.250.0.2/30 dev eth0; ip -n " + ns +
                              " link set eth0 up; ip -n " + ns + " link set lo up"});
    if (!made) error = made.error().message;
  }
  ~ServerNamespace() {
    (void)run_process({"/bin/sh", "-c",
                       "ip netns pids " + ns + " | xargs -r kill; ip netns del " + ns +
                           "; ip link del " + veth + "; ip link del " + bridge +
                           "; iptables -w -D INPUT -i " + bridge +
                           " -j CVM-ISOLATE; "
                           "pkill -f cvm-net-probe-" +
                           ns + "; true"});
  }
  ServerNamespace(const ServerNamespace&) = delete;
  ServerNamespace& operator=(const ServerNamespace&) = delete;
};

NetworkConfig test_network(const std::string& tag, const std::string& state_dir) {
  NetworkConfig nc;
  nc.enabled = true;
  nc.name = "cvmtest" + tag;
  nc.bridge = "cvmt" + tag;
  nc.subnet = "10.251.0.0/24";
  nc.state_dir = state_dir;
  nc.nameservers = {"10.250.0.2"};
  nc.search = {"test"};
  return nc;
}

// The workspace's network: eth0 from CNI, NAT out to a server in a namespace this test made, DNS
// servers from the config, the node and other workspaces out of reach, Docker's -p reachable, and
// everything released on STOP.
TEST_F(MachineTest, NetworkReachesOutButNotTheNodeOrOtherWorkspaces) {
  const std::string tag = std::to_string(::getpid() % 10000);
  const NetworkConfig nc = test_network(tag, work_ + "/network");
  const ServerNamespace server(tag, nc.bridge);
  ASSERT_EQ(server.error, "");
  const std::string& srv_ns = server.ns;
  const std::string server_root = work_ + "/www";
  fs::create_directories(server_root);
  std::ofstream(server_root + "/index.html") << "hello-from-the-test-server\n";
  // Bounded servers: each ends by itself.
  ASSERT_TRUE(run_tool({"/bin/sh", "-c",
                        "cd " + server_root + " && ip netns exec " + srv_ns +
                            " timeout 300 python3 -m http.server --bind 10.250.0.2 8000 "
                            ">/dev/null 2>&1 & "
                            "timeout 300 python3 -c 'import socket,sys; s=socket.socket(); "
                            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                            "s.bind((\"0.0.0.0\", 47999)); s.listen(8); "
                            "[c.close() for c in iter(lambda: s.accept()[0], None)]' "
                            "cvm-net-probe-" +
                            srv_ns + " >/dev/null 2>&1 &"})
                  .ok());
  ASSERT_TRUE(use_network(nc));
  WorkspaceNetwork& network = *network_;

  auto ra = request("neta");
  auto rb = request("netb");
  ASSERT_GT(boot(rb), 0);
  const int inner_b = inner_;
  ASSERT_GT(boot(ra), 0);
  const int inner_a = inner_;
  ASSERT_EQ(trimmed(state_), "running") << why(ra.workspace_id);
  const auto a = network.find(ra.workspace_id);
  const auto b = network.find(rb.workspace_id);
  ASSERT_TRUE(a && b);
  ASSERT_NE(a->ip, "");
  EXPECT_EQ(a->gateway, "10.251.0.1");

  // eth0 with its address and a default route, a resolver from the config.
  EXPECT_NE(sh("ip -4 -o addr show dev eth0").find(a->address), std::string::npos);
  EXPECT_NE(sh("ip route show default").find("via 10.251.0.1"), std::string::npos);
  const std::string resolv = sh("cat /etc/resolv.conf");
  EXPECT_NE(resolv.find("nameserver 10.250.0.2"), std::string::npos) << resolv;
  EXPECT_NE(resolv.find("search test"), std::string::npos) << resolv;

  // Out through the node's NAT to the test's server.
  const std::string get =
      "timeout 10 bash -c 'exec 3<>/dev/tcp/10.250.0.2/8000; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" "
      ">&3; cat <&3'";
  EXPECT_NE(sh(get).find("hello-from-the-test-server"), std::string::npos) << sh(get);
  const std::string nat = read_tool("iptables -w -t nat -S POSTROUTING");
  EXPECT_NE(nat.find("-s " + a->ip + "/32"), std::string::npos) << nat;

  // The node: a listener on all its addresses answers the node itself, not the workspace (the
  // connection times out: dropped, not refused).
  EXPECT_NE(read_tool("timeout 5 bash -c '</dev/tcp/127.0.0.1/47999' && echo reached"), "");
  int code = -1;
  sh("timeout 3 bash -c '</dev/tcp/10.251.0.1/47999'", &code);
  EXPECT_EQ(code, 124) << "the workspace reached (or was refused by) the node";
  EXPECT_NE(read_tool("iptables -w -L CVM-ISOLATE -v -n -x | awk '/DROP/ {print $1}'"), "0\n");

  // The other workspace: its listener answers the node, not workspace A (isolated bridge ports).
  fs::copy_file("/bin/busybox", "/proc/" + std::to_string(inner_b) + "/root/root/busybox",
                fs::copy_options::overwrite_existing);
  inner_ = inner_b;
  sh("mkdir -p /root/www && echo from-b > /root/www/index.html && "
     "(timeout 300 /root/busybox httpd -f -p 7000 -h /root/www >/dev/null 2>&1 &)");
  EXPECT_NE(read_tool("sleep 0.5; timeout 5 bash -c 'exec 3<>/dev/tcp/" + b->ip +
                      "/7000; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'")
                .find("from-b"),
            std::string::npos);
  inner_ = inner_a;
  code = -1;
  sh("timeout 3 bash -c '</dev/tcp/" + b->ip + "/7000'", &code);
  EXPECT_NE(code, 0) << "workspace A reached workspace B";

  // Docker's -p inside the workspace, reached at the workspace's address.
  fs::copy_file(*busybox_tar_, "/proc/" + std::to_string(inner_a) + "/root/root/bb.tar",
                fs::copy_options::overwrite_existing);
  sh("docker import /root/bb.tar bb:1 >/dev/null", &code);
  ASSERT_EQ(code, 0);
  sh("mkdir -p /root/www && echo from-docker > /root/www/index.html && docker run -d -p 8080:80 "
     "-v /root/www:/www bb:1 /bin/busybox httpd -f -p 80 -h /www",
     &code);
  ASSERT_EQ(code, 0);
  std::string published;
  for (int i = 0; i < 50 && published.find("from-docker") == std::string::npos; ++i) {
    published = read_tool("timeout 5 bash -c 'exec 3<>/dev/tcp/" + a->ip +
                          "/8080; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'");
    if (published.find("from-docker") == std::string::npos) std::this_thread::sleep_for(200ms);
  }
  EXPECT_NE(published.find("from-docker"), std::string::npos) << published;

  // STOP: the address, the veth and the NAT rules are released.
  ASSERT_TRUE(launcher_->stop(ra.workspace_id).ok());
  ASSERT_TRUE(launcher_->remove(ra.workspace_id, false).ok());
  EXPECT_FALSE(fs::exists(nc.state_dir + "/ipam/" + nc.name + "/" + a->ip));
  EXPECT_FALSE(network.find(ra.workspace_id));
  EXPECT_EQ(read_tool("ip link show " + a->host_interface + " 2>/dev/null"), "");
  EXPECT_EQ(read_tool("iptables -w -t nat -S POSTROUTING").find("-s " + a->ip + "/32"),
            std::string::npos);
  (void)launcher_->stop(rb.workspace_id);
  ASSERT_TRUE(launcher_->remove(rb.workspace_id, true).ok());
  EXPECT_TRUE(network.attached().empty());
}

// `docker pull` inside the workspace from a docker-registry the test runs in its own namespace
// (the image pushed there by skopeo from the node), and the pulled image is still there after
// STOP/START, with the registry gone.
TEST_F(MachineTest, DockerPullsFromARegistryAndKeepsTheImageAcrossStopStart) {
  if (::access("/usr/bin/docker-registry", X_OK) != 0 || ::access("/usr/bin/skopeo", X_OK) != 0) {
    GTEST_SKIP() << "docker-registry or skopeo missing (scripts/install-deps.sh installs them)";
  }
  const std::string tag = std::to_string(::getpid() % 10000);
  const NetworkConfig nc = test_network(tag, work_ + "/network");
  const ServerNamespace server(tag, nc.bridge);
  ASSERT_EQ(server.error, "");
  const std::string registry = work_ + "/registry";
  fs::create_directories(registry);
  std::ofstream(registry + "/config.yml")
      << "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " << registry
      << "/data\nhttp:\n  addr: 10.250.0.2:5000\n";
  // The project's busybox image, pushed as a Docker v2 image once the registry answers.
  const std::string layout = work_ + "/bb-layout";
  auto pushed = run_tool(
      {"/bin/sh", "-c",
       "set -e; ip netns exec " + server.ns + " timeout 600 /usr/bin/docker-registry serve " +
           registry + "/config.yml >" + registry + "/log 2>&1 & /bin/sh " +
           CVM_BUILD_DEFAULT_IMAGE_SCRIPT + " " + layout + " bb >/dev/null; " +
           "for i in $(seq 100); do (exec 3<>/dev/tcp/10.250.0.2/5000) 2>/dev/null && break; "
           "sleep 0.1; done; skopeo copy --quiet --format v2s2 --dest-tls-verify=false oci:" +
           layout + ":bb docker://10.250.0.2:5000/tools/bb:1"});
  ASSERT_TRUE(pushed.ok()) << pushed.error().message << read_file(registry + "/log");
  ASSERT_TRUE(use_network(nc));

  auto r = request("pull");
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  // A plain-HTTP registry is one Docker must be told about, as a user would.
  int code = -1;
  const std::string setup =
      sh("mkdir -p /etc/docker && echo '{\"insecure-registries\": [\"10.250.0.2:5000\"]}' > "
         "/etc/docker/daemon.json && systemctl restart docker && docker pull -q "
         "10.250.0.2:5000/tools/bb:1",
         &code);
  ASSERT_EQ(code, 0) << setup << sh("journalctl -u docker --no-pager | tail -20");
  EXPECT_EQ(trimmed(sh("docker run --rm 10.250.0.2:5000/tools/bb:1 echo pulled-and-ran")),
            "pulled-and-ran");
  // The pull came over the workspace's own network, through the node's NAT.
  EXPECT_NE(read_file(registry + "/log").find("/v2/tools/bb/manifests/1"), std::string::npos);

  // The registry goes; STOP/START: the image is still the workspace's, run without a pull.
  (void)run_process({"/bin/sh", "-c", "ip netns pids " + server.ns + " | xargs -r kill"});
  ASSERT_TRUE(launcher_->stop(r.workspace_id).ok());
  ASSERT_TRUE(launcher_->remove(r.workspace_id, false).ok());
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  EXPECT_EQ(trimmed(sh("docker run --rm --pull never 10.250.0.2:5000/tools/bb:1 echo still-here")),
            "still-here");
  (void)launcher_->stop(r.workspace_id);
  ASSERT_TRUE(launcher_->remove(r.workspace_id, true).ok());
}

// An image built by the inner Docker (overlay2, the classic builder: a layer per RUN) with a
// deleted base file, a directory removed and made again, links and a setuid file, saved with
// `docker save` and turned into an OCI layout by skopeo on the node: cvm-unpack makes the same tree
// of it as `umoci unpack`.
TEST_F(MachineTest, DockerSavedImageUnpacksAsUmociUnpacksIt) {
  if (::access("/usr/bin/skopeo", X_OK) != 0) {
    GTEST_SKIP() << "skopeo missing (scripts/install-deps.sh installs it)";
  }
  auto r = request("saved");
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  const std::string inside_root = "/proc/" + std::to_string(inner_) + "/root";
  fs::copy_file(*busybox_tar_, inside_root + "/root/bb.tar", fs::copy_options::overwrite_existing);
  // The busybox image has only a few applets linked, so the RUN steps name busybox.
  int code = -1;
  const std::string built = sh(
      "set -e; docker import /root/bb.tar bb:1 >/dev/null; mkdir -p /root/saved-ctx; "
      "cat > /root/saved-ctx/Dockerfile <<'EOF'\n"
      "FROM bb:1\n"
      "RUN busybox mkdir -p /data/sub && echo b > /data/sub/b && echo a > /data/a && "
      "busybox chown 1000:1000 /data/a && busybox ln /data/a /data/a-hard && echo s > /data/suid "
      "&& busybox chmod 4755 /data/suid\n"
      "RUN busybox rm /bin/cat /data/sub/b && busybox rmdir /data/sub && busybox mkdir /data/sub "
      "&& echo c > /data/sub/c && busybox ln -s a /data/l1 && busybox ln -s /data/l1 /data/l2\n"
      "EOF\n"
      "DOCKER_BUILDKIT=0 docker build -q -t saved:1 /root/saved-ctx >/dev/null; "
      "docker save -o /root/saved.tar saved:1",
      &code);
  ASSERT_EQ(code, 0) << built;

  const std::string archive = work_ + "/saved.tar";
  fs::copy_file(inside_root + "/root/saved.tar", archive, fs::copy_options::overwrite_existing);
  const std::string layout = work_ + "/saved-layout";
  ProcessOptions o;
  o.timeout = 300s;
  auto copied = run_tool(
      {"skopeo", "copy", "--quiet", "docker-archive:" + archive, "oci:" + layout + ":saved"}, o);
  ASSERT_TRUE(copied.ok()) << copied.error().message;
  auto manifest = run_tool({"skopeo", "inspect", "--raw", "oci:" + layout + ":saved"}, o);
  ASSERT_TRUE(manifest.ok()) << manifest.error().message;
  size_t layers = 0;
  for (size_t at = 0;
       (at = manifest->out.find("application/vnd.oci.image.layer.", at)) != std::string::npos;
       ++at) {
    ++layers;
  }
  EXPECT_EQ(layers, 3u) << manifest->out;  // the import and the two RUN steps

  constexpr uint32_t kBase = 5000000;
  constexpr uint32_t kCount = 65536;
  const std::string ours = work_ + "/saved-ours";
  const std::string theirs = work_ + "/saved-umoci";
  fs::create_directories(ours);
  auto unpacked =
      run_tool({CVM_UNPACK_BIN, "--layout", layout, "--tag", "saved", "--rootfs", ours, "--id-base",
                std::to_string(kBase), "--id-count", std::to_string(kCount)},
               o);
  ASSERT_TRUE(unpacked.ok()) << unpacked.error().message;
  const std::string map = "0:" + std::to_string(kBase) + ":" + std::to_string(kCount);
  auto umoci = run_tool(
      {"umoci", "unpack", "--uid-map", map, "--gid-map", map, "--image", layout + ":saved", theirs},
      o);
  ASSERT_TRUE(umoci.ok()) << umoci.error().message;
  const auto a = cvm::test::tree(ours);
  const auto b = cvm::test::tree(theirs + "/rootfs");
  EXPECT_EQ(cvm::test::diff(a, b), "");
  // What the RUN steps did, beyond agreeing with umoci.
  ASSERT_TRUE(a.contains("data/sub/c")) << "the second RUN layer is not in the image";
  EXPECT_FALSE(a.contains("bin/cat"));
  EXPECT_TRUE(a.contains("bin/echo"));
  EXPECT_FALSE(a.contains("data/sub/b"));
  const std::string user = std::to_string(kBase + 1000) + ":" + std::to_string(kBase + 1000);
  EXPECT_EQ(a.at("data/a"), "f 644 " + user + " size=2");
  EXPECT_NE(a.at("data/suid").find("4755"), std::string::npos);
  EXPECT_NE(a.at("data/l2").find("-> /data/l1"), std::string::npos);
  // The link is made in its file's layer: a link to a file of an earlier layer is saved as a
  // copy, the layer holding only the new name.
  struct stat file_st {};
  struct stat hard_st {};
  ASSERT_EQ(::lstat((ours + "/data/a").c_str(), &file_st), 0);
  ASSERT_EQ(::lstat((ours + "/data/a-hard").c_str(), &hard_st), 0);
  EXPECT_EQ(file_st.st_ino, hard_st.st_ino) << "data/a-hard is not a hardlink of data/a";
  (void)launcher_->stop(r.workspace_id);
  ASSERT_TRUE(launcher_->remove(r.workspace_id, true).ok());
}

// lxcfs (an instance this test starts on its own mount point): free, /proc/meminfo and uptime
// inside show the workspace's 1 GiB and its own boot, not the node's.
TEST_F(MachineTest, FreeTopNprocUptimeAndDockerInfoShowTheWorkspacesOwnLimits) {
  if (::access("/usr/bin/lxcfs", X_OK) != 0 || ::access("/dev/fuse", R_OK) != 0) {
    GTEST_SKIP() << "lxcfs or /dev/fuse missing (apt install lxcfs)";
  }
  const std::string mnt = work_ + "/lxcfs";
  fs::create_directories(mnt);
  ASSERT_TRUE(run_tool({"/bin/sh", "-c",
                        "/usr/bin/lxcfs -p " + work_ + "/lxcfs.pid " + mnt + " >" + work_ +
                            "/lxcfs.log 2>&1 & for i in $(seq 100); do "
                            "[ -r " +
                            mnt + "/proc/meminfo ] && exit 0; sleep 0.1; done; exit 1"})
                  .ok())
      << read_file(work_ + "/lxcfs.log");
  struct Cleanup {
    std::string mnt, pidfile;
    ~Cleanup() {
      (void)run_process({"/bin/sh", "-c",
                         "kill $(cat " + pidfile + ") 2>/dev/null; sleep 0.3; fusermount -u " +
                             mnt + " 2>/dev/null; umount -l " + mnt + " 2>/dev/null; true"});
    }
  } cleanup{mnt, work_ + "/lxcfs.pid"};
  LauncherConfig c = config_;
  c.lxcfs_dir = mnt;
  launcher_ = std::make_unique<WorkspaceLauncher>(c, *runtime_, *images_);
  ASSERT_TRUE(launcher_->prepare().ok());
  auto r = request("lxcfs");
  // One CPU, as the agent pins a 1-CPU request (cpu_pinning.h).
  r.cpu_millicores = 1000;
  r.cpuset = "0";
  ASSERT_GT(boot(r), 0);
  ASSERT_EQ(trimmed(state_), "running") << why(r.workspace_id);
  EXPECT_EQ(trimmed(sh("awk '/^MemTotal:/ {print $2}' /proc/meminfo")), "1048576");
  EXPECT_EQ(trimmed(sh("free -b | awk '/^Mem:/ {print $2}'")), std::to_string(1ULL << 30));
  EXPECT_EQ(trimmed(sh("top -bn1 | awk '/Mem :/ {print $4}'")), "1024.0");
  // nsenter does not join the workspace's cgroup (nor its cpuset): ask its systemd to run them.
  EXPECT_EQ(trimmed(sh("systemd-run --wait --pipe --quiet nproc")), "1");
  EXPECT_EQ(trimmed(sh("grep -c ^processor /proc/cpuinfo")), "1");
  EXPECT_EQ(trimmed(sh("timeout 60 sh -c 'until docker info >/dev/null 2>&1; do sleep 0.5; done'; "
                       "docker info --format '{{.NCPU}} {{.MemTotal}}'")),
            "1 " + std::to_string(1ULL << 30));
  EXPECT_NE(read_file("/proc/meminfo").find("MemTotal:"), std::string::npos);
  // The workspace booted seconds ago; the node long before.
  const double inner_up = std::stod("0" + trimmed(sh("cut -d' ' -f1 /proc/uptime")));
  const double node_up = std::stod(read_file("/proc/uptime"));
  EXPECT_LT(inner_up, 300.0);
  EXPECT_GT(node_up - inner_up, 1.0);
  (void)launcher_->stop(r.workspace_id);
  ASSERT_TRUE(launcher_->remove(r.workspace_id, true).ok());
}

}  // namespace
}  // namespace cvm::agent
