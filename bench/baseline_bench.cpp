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

#include "child_process.h"
#include "cvm/test/nats_server.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Steady = std::chrono::steady_clock;

double us_since(Steady::time_point t0) {
  return std::chrono::duration<double, std::micro>(Steady::now() - t0).count();
}

void print(const char* label, std::vector<double> us) {
  if (us.empty()) {
    std::printf("%-34s n/a\n", label);
    return;
  }
  std::sort(us.begin(), us.end());
  const auto at = [&](double q) { return us[std::min(us.size() - 1, size_t(q * us.size()))]; };
  std::printf("%-34s p50 %10.1f us  p99 %10.1f us  (n=%zu)\n", label, at(0.50), at(0.99),
              us.size());
}

void echo(natsConnection* nc, natsSubscription*, natsMsg* msg, void*) {
  if (natsMsg_GetReply(msg) != nullptr) {
    natsConnection_Publish(nc, natsMsg_GetReply(msg), natsMsg_GetData(msg),
                           natsMsg_GetDataLength(msg));
  }
  natsMsg_Destroy(msg);
}

natsConnection* connect(const std::string& url) {
  natsOptions* opts = nullptr;
  natsConnection* nc = nullptr;
  natsOptions_Create(&opts);
  natsOptions_SetURL(opts, url.c_str());
  // Our bus adapter sets SendAsap (every request flushed at once); the floor must too, or the
  // baseline would pay a flush delay our code does not.
  natsOptions_SetSendAsap(opts, true);
  const natsStatus s = natsConnection_Connect(&nc, opts);
  natsOptions_Destroy(opts);
  return s == NATS_OK ? nc : nullptr;
}

std::vector<double> request_reply(const std::string& url, int samples) {
  std::vector<double> out;
  natsConnection* responder = connect(url);
  natsConnection* client = connect(url);
  natsSubscription* sub = nullptr;
  if (responder == nullptr || client == nullptr ||
      natsConnection_Subscribe(&sub, responder, "bench.echo", echo, nullptr) != NATS_OK ||
      natsConnection_Flush(responder) != NATS_OK) {
    return out;
  }
  const std::string payload(200, 'x');  // about a BuildRequest's size
  for (int i = 0; i < samples + 100; ++i) {
    natsMsg* reply = nullptr;
    const auto t0 = Steady::now();
    const natsStatus s = natsConnection_Request(&reply, client, "bench.echo", payload.data(),
                                                static_cast<int>(payload.size()), 2000);
    const double us = us_since(t0);
    natsMsg_Destroy(reply);
    if (s != NATS_OK) return {};
    if (i >= 100) out.push_back(us);  // the first hundred warm the connections up
  }
  natsSubscription_Destroy(sub);
  natsConnection_Destroy(client);
  natsConnection_Destroy(responder);
  return out;
}

std::vector<double> js_publish(const std::string& url, int samples) {
  std::vector<double> out;
  natsConnection* nc = connect(url);
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
  print("raw cnats request-reply", request_reply(nats.url(), samples));
  print("raw JetStream publish (acked)", js_publish(nats.url(), samples));
  if (runc > 0) print("raw runc run --detach", runc_run(runc));
  nats_Close();
  return 0;
}
