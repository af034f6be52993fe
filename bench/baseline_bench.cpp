// baseline_bench: the floors our figures are divided by, measured on this machine in the same
// run as them (scripts/bench.sh): a raw cnats request-reply round trip, a raw JetStream publish
// waiting for its ack, and a raw `runc run --detach` of an unpacked busybox bundle. No code of
// ours is on these paths: plain cnats calls and the runc CLI.
//
//   baseline_bench [--samples N] [--runc N]
// Prints "label  p50 X us  p99 Y us  (n=N)" lines; needs nats-server, and root + runc + umoci for
// the runc line (skipped with a note otherwise).
#include <nats/nats.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "child_process.h"
#include "cvm/test/nats_server.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cvm::bench::Steady;

using cvm::bench::print_latency;
using cvm::bench::us_since;

std::vector<double> js_publish(const std::string& url, int samples) {
  std::vector<double> out;
  natsConnection* nc = cvm::bench::raw_connect(url);
  jsCtx* js = nullptr;
  if (nc == nullptr || natsConnection_JetStream(&js, nc, nullptr) != NATS_OK) return out;
  jsStreamConfig sc;
  jsStreamConfig_Init(&sc);
  sc.Name = "BENCH";
  const char* subjects[] = {"bench.js.>"};
  sc.Subjects = subjects;
  sc.SubjectsLen = 1;
  sc.Storage = js_FileStorage;  // as CVM_BUILDS and CVM_EVENTS
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_AddStream(nullptr, js, &sc, nullptr, &jerr) != NATS_OK) return out;
  const std::string payload(200, 'x');
  for (int i = 0; i < samples + 100; ++i) {
    jsPubAck* ack = nullptr;
    const std::string subject = "bench.js." + std::to_string(i % 64);
    const auto t0 = Steady::now();
    const natsStatus s = js_Publish(&ack, js, subject.c_str(), payload.data(),
                                    static_cast<int>(payload.size()), nullptr, &jerr);
    const double us = us_since(t0);
    jsPubAck_Destroy(ack);
    if (s != NATS_OK) return {};
    if (i >= 100) out.push_back(us);
  }
  jsCtx_Destroy(js);
  natsConnection_Destroy(nc);
  return out;
}

std::vector<double> runc_run(int samples) {
  std::vector<double> out;
  using cvm::test::run_command;
  if (geteuid() != 0 || run_command({"runc", "--version"}).exit_code != 0) {
    std::fprintf(stderr, "baseline_bench: raw runc run needs root and runc; skipped\n");
    return out;
  }
  const std::string work = fs::temp_directory_path() / ("cvm-baseline-" + std::to_string(getpid()));
  fs::create_directories(work);
  const std::string image = work + "/image";
  const std::string bundle = work + "/bundle";
  const std::string root = work + "/runc";
  if (run_command({CVM_BUILD_IMAGE_SCRIPT, image, "latest"}, 120s).exit_code != 0 ||
      run_command({"umoci", "unpack", "--image", image + ":latest", bundle}, 120s).exit_code != 0) {
    std::fprintf(stderr, "baseline_bench: cannot build and unpack the default image\n");
    return out;
  }
  // The image has no /sbin/init; run what the agent's plain workspaces run: a sleep, no terminal.
  {
    std::ifstream in(bundle + "/config.json");
    auto spec = nlohmann::json::parse(in);
    spec["process"]["terminal"] = false;
    spec["process"]["args"] = {"/bin/sleep", "3600"};
    std::ofstream(bundle + "/config.json") << spec.dump();
  }
  for (int i = 0; i < samples + 1; ++i) {
    const std::string id = "baseline-" + std::to_string(i);
    const auto t0 = Steady::now();
    // stdio to a file, as the agent does: the container's init would hold a capture pipe open.
    const auto r = run_command({"/bin/sh", "-c",
                                "exec runc --root " + root + " run --detach --bundle " + bundle +
                                    " " + id + " >>" + work + "/runc.log 2>&1"},
                               60s);
    const double us = us_since(t0);
    run_command({"runc", "--root", root, "delete", "--force", id});
    if (r.exit_code != 0) {
      std::fprintf(stderr, "baseline_bench: runc run failed (see %s/runc.log)\n", work.c_str());
      return {};
    }
    if (i >= 1) out.push_back(us);  // the first pays for cold caches
  }
  std::error_code ec;
  fs::remove_all(work, ec);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int samples = 2000;
  int runc = 20;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--samples") samples = std::max(1, std::atoi(argv[i + 1]));
    if (a == "--runc") runc = std::max(0, std::atoi(argv[i + 1]));
  }
  cvm::test::NatsServer nats;
  if (!nats.start().ok()) {
    std::cerr << "baseline_bench: cannot start nats-server\n";
    return 1;
  }
  print_latency("raw cnats request-reply",
                cvm::bench::raw_round_trips(nats.url(), samples,
                                            std::string(200, 'x')));  // a BuildRequest's size
  print_latency("raw JetStream publish (acked)", js_publish(nats.url(), samples));
  if (runc > 0) print_latency("raw runc run --detach", runc_run(runc));
  nats_Close();
  return 0;
}
