#pragma once
// What the load tools in bench/ share: timing, the two printed line shapes bench/results_table.py
// parses ("LABEL  p50 X us  p99 Y us  (n=N)" and "LABEL  X MB/s"), and the raw cnats floor every
// bus figure is divided by (a connection set up as our bus adapter sets its own, and an echo
// responder). Header-only: each bench is one program.
#include <nats/nats.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace cvm::bench {

using Steady = std::chrono::steady_clock;

inline double us_since(Steady::time_point t0) {
  return std::chrono::duration<double, std::micro>(Steady::now() - t0).count();
}

inline double mb_per_s(uint64_t bytes, Steady::time_point t0) {
  const double s = std::chrono::duration<double>(Steady::now() - t0).count();
  return s > 0 ? static_cast<double>(bytes) / 1e6 / s : 0;
}

// The middle value (the upper one of an even count); 0 for none.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// "LABEL  p50 X us  p99 Y us  (n=N)", or "LABEL  n/a" without samples; `width` pads the label.
inline void print_latency(const char* label, std::vector<double> us, int width = 34) {
  if (us.empty()) {
    std::printf("%-*s n/a\n", width, label);
    return;
  }
  std::sort(us.begin(), us.end());
  const auto at = [&](double q) { return us[std::min(us.size() - 1, size_t(q * us.size()))]; };
  std::printf("%-*s p50 %10.1f us  p99 %10.1f us  (n=%zu)\n", width, label, at(0.50), at(0.99),
              us.size());
}

// "LABEL  X MB/s", or "LABEL  n/a" when nothing was measured.
inline void print_rate(const char* label, double mb_per_s, int width = 44) {
  if (mb_per_s <= 0) {
    std::printf("%-*s n/a\n", width, label);
  } else {
    std::printf("%-*s %10.1f MB/s\n", width, label, mb_per_s);
  }
}

// A plain cnats connection with SendAsap, as our bus adapter connects: without it the floor
// would pay a flush delay our code does not. nullptr when the server is not there.
inline natsConnection* raw_connect(const std::string& url) {
  natsOptions* opts = nullptr;
  natsConnection* nc = nullptr;
  natsOptions_Create(&opts);
  natsOptions_SetURL(opts, url.c_str());
  natsOptions_SetSendAsap(opts, true);
  const natsStatus s = natsConnection_Connect(&nc, opts);
  natsOptions_Destroy(opts);
  return s == NATS_OK ? nc : nullptr;
}

// Answers each request with its own payload.
inline void raw_echo(natsConnection* nc, natsSubscription*, natsMsg* msg, void*) {
  if (natsMsg_GetReply(msg) != nullptr) {
    natsConnection_Publish(nc, natsMsg_GetReply(msg), natsMsg_GetData(msg),
                           natsMsg_GetDataLength(msg));
  }
  natsMsg_Destroy(msg);
}

// Microseconds of `samples` raw cnats request-reply round trips of `payload` between two
// connections, after 100 that warm them up. Empty when the server is not there or one timed out.
inline std::vector<double> raw_round_trips(const std::string& url, int samples,
                                           const std::string& payload) {
  std::vector<double> out;
  natsConnection* responder = raw_connect(url);
  natsConnection* client = raw_connect(url);
  natsSubscription* sub = nullptr;
  const bool ready =
      responder != nullptr && client != nullptr &&
      natsConnection_Subscribe(&sub, responder, "bench.echo", raw_echo, nullptr) == NATS_OK &&
      natsConnection_Flush(responder) == NATS_OK;
  for (int i = 0; ready && i < samples + 100; ++i) {
    natsMsg* reply = nullptr;
    const auto t0 = Steady::now();
    const natsStatus s = natsConnection_Request(&reply, client, "bench.echo", payload.data(),
                                                static_cast<int>(payload.size()), 2000);
    const double us = us_since(t0);
    natsMsg_Destroy(reply);
    if (s != NATS_OK) {
      out.clear();
      break;
    }
    if (i >= 100) out.push_back(us);
  }
  natsSubscription_Destroy(sub);
  natsConnection_Destroy(client);
  natsConnection_Destroy(responder);
  return out;
}

}  // namespace cvm::bench
