// seccomp_bench: what the workspace's seccomp filter (deploy/seccomp/workspace.json, the agent's
// built-in profile) costs a syscall-heavy loop, against the same loop in the same container
// without the filter, in the same run.
//
//   seccomp_bench [--calls N] [--rounds R]      (root, runc)
//
// The container is a workspace's own spec (build_runtime_spec: a user namespace of its own ID
// range, Docker's capabilities) whose rootfs holds only the static syscall_loop; each round runs it
// once with linux.seccomp and once without (alternating, so drift on a shared machine hits both),
// and prints the median nanoseconds per call of each: "LABEL  X ns/call" lines, and the ratio.
// A load tool, not a test: it prints figures, it does not judge them.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.h"
#include "cvm/agent/capabilities.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/oci_spec.h"
#include "cvm/agent/process.h"

namespace fs = std::filesystem;
using namespace cvm::agent;

using cvm::bench::median;

int main(int argc, char** argv) {
  long calls = 2000000;
  int rounds = 7;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--calls") calls = std::max(1000L, std::atol(argv[++i]));
    if (a == "--rounds") rounds = std::max(1, std::atoi(argv[++i]));
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr, "seccomp_bench: needs root (runc)\n");
    return 1;
  }
  auto filter = workspace_seccomp("");
  if (!filter || !filter->has_value()) {
    std::fprintf(stderr, "seccomp_bench: the built-in profile: %s\n",
                 filter ? "none" : filter.error().message.c_str());
    return 1;
  }
  const IdRange ids{3800000000u, 65536};
  const fs::path work =
      fs::temp_directory_path() / ("cvm-seccomp-bench-" + std::to_string(getpid()));
  fs::remove_all(work);
  const fs::path rootfs = work / "bundle" / "rootfs";
  fs::create_directories(rootfs);
  fs::copy_file(SYSCALL_LOOP_BIN, rootfs / "syscall_loop");
  fs::permissions(work, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                            fs::perms::others_read | fs::perms::others_exec);
  // The container's root owns its rootfs (runc makes the mount points in it as that user).
  for (const auto& p : {rootfs, rootfs / "syscall_loop"}) {
    if (::chown(p.c_str(), ids.base, ids.base) != 0) {
      std::perror("seccomp_bench: chown");
      return 1;
    }
  }
  const std::string runc_root = (work / "runc").string();

  // One run of the loop; its "NAME NS" lines.
  auto run = [&](bool filtered, int round) -> std::map<std::string, double> {
    SpecInput in;
    in.hostname = "seccomp-bench";
    in.args = {"/syscall_loop", std::to_string(calls)};
    in.ids = ids;
    in.capability_profile = CapabilityProfile::kDocker;
    if (auto bounding = read_cap_bounding(HostRoots{})) in.host_cap_bounding = *bounding;
    rlimit nofile{};
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) in.host_nofile_hard = nofile.rlim_max;
    if (filtered) in.seccomp = **filter;
    std::ofstream(work / "bundle" / "config.json") << build_runtime_spec(in).dump();
    const std::string id = "seccomp-bench-" + std::to_string(round) + (filtered ? "-f" : "-u");
    ProcessOptions o;
    o.timeout = std::chrono::seconds{300};
    auto r = run_process(
        {"runc", "--root", runc_root, "run", "--bundle", (work / "bundle").string(), id}, o);
    (void)run_process({"runc", "--root", runc_root, "delete", "-f", id});
    std::map<std::string, double> out;
    if (!r || r->exit_code != 0) {
      std::fprintf(stderr, "seccomp_bench: runc run failed: %s\n",
                   r ? (r->out + r->err).c_str() : r.error().message.c_str());
      return out;
    }
    std::istringstream lines(r->out);
    std::string name;
    double ns = 0;
    while (lines >> name >> ns) out[name] = ns;
    // A run that is not what it claims (no filter where one was asked for) measures nothing.
    if (out["seccomp_mode"] != (filtered ? 2 : 0)) {
      std::fprintf(stderr, "seccomp_bench: a %s run ran in seccomp mode %.0f\n",
                   filtered ? "filtered" : "unfiltered", out["seccomp_mode"]);
      return {};
    }
    return out;
  };

  std::map<std::string, std::vector<double>> with, without;
  for (int i = 0; i < rounds; ++i) {
    auto u = run(false, i);
    auto f = run(true, i);
    if (u.empty() || f.empty()) {
      fs::remove_all(work);
      return 1;
    }
    for (const auto& [k, v] : u) without[k].push_back(v);
    for (const auto& [k, v] : f) with[k].push_back(v);
  }
  fs::remove_all(work);
  for (const char* name : {"getppid", "fstat"}) {
    const double f = median(with[name]);
    const double u = median(without[name]);
    std::printf("%-44s %10.1f ns/call\n", (std::string("seccomp ") + name + ": unfiltered").c_str(),
                u);
    std::printf("%-44s %10.1f ns/call\n", (std::string("seccomp ") + name + ": filtered").c_str(),
                f);
    std::printf("%-44s %10.2f x\n", (std::string("seccomp ") + name + ": ratio").c_str(),
                u > 0 ? f / u : 0);
  }
  std::printf("(%ld calls a run, median of %d runs each)\n", calls, rounds);
  return 0;
}
