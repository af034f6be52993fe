#pragma once
// The fleet simulator's load side: submits BuildRequests to CVM_BUILDS at a steady rate, times
// submit -> SCHEDULED from the events, measures the raw cnats request-reply round trip in the same
// run as the baseline, and audits CVM_EVENTS for "every request has exactly one terminal event".

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cvm/base/result.h"
#include "cvm/v1/build.pb.h"

namespace cvm::fleetsim {

struct LoadConfig {
  std::string nats_url;
  int requests = 100;
  double rate_per_s = 0;        // 0: as fast as the window allows
  int window = 0;               // most requests submitted but not yet SCHEDULED/FAILED; 0: no limit
  std::string prefix = "load";  // build ids <prefix>-b<i>, workspaces <prefix>-w<i>
  uint64_t cpu_millicores = 1000;
  uint64_t memory_bytes = 1ULL << 30;
  int gpu_every = 0;                         // every n-th request asks for one GPU (0: none)
  std::chrono::milliseconds timeout{60000};  // for every request to be decided
};

struct Percentiles {
  double p50_us = 0;
  double p90_us = 0;
  double p99_us = 0;
  double max_us = 0;
  size_t samples = 0;
};
Percentiles percentiles(std::vector<double> micros);

struct LoadReport {
  int submitted = 0;
  int scheduled = 0;  // builds whose first decision was SCHEDULED
  int failed = 0;     // builds whose first decision was FAILED
  int undecided = 0;  // neither within the timeout
  std::map<std::string, int> failure_reasons;
  double seconds = 0;          // first submit to last decision
  double submit_seconds = 0;   // first submit to last submit (the offered rate actually reached)
  double decisions_per_s = 0;  // (scheduled + failed) / seconds
  double scheduled_per_s = 0;
  Percentiles submit_to_scheduled;
};

// Submits the load and waits for every decision. Runs its own connections and threads.
Result<LoadReport> run_load(const LoadConfig& config);

// The raw cnats request-reply round trip on this server (an echo responder on its own connection).
// Back to back by default. With `pace` > 0 one request per `pace`, until `samples` are taken or
// `*stop` turns true: the round trip while the load runs, under the same CPU contention.
Result<Percentiles> measure_request_reply(const std::string& nats_url, int samples,
                                          std::chrono::microseconds pace = {},
                                          const std::atomic<bool>* stop = nullptr);

struct EventAudit {
  size_t builds = 0;                    // builds with at least one event
  size_t events = 0;                    // events stored in CVM_EVENTS
  std::map<std::string, int> terminal;  // build id -> terminal events (RUNNING, STOPPED, FAILED)
  std::vector<std::string> problems;    // builds without exactly one terminal event
};
// Reads CVM_EVENTS from the start (a throwaway durable consumer) until `expected_builds` builds
// have a terminal event and nothing new arrives for `quiet`, or until `timeout`; then checks that
// each of `build_ids` has exactly one terminal event.
Result<EventAudit> audit_events(const std::string& nats_url,
                                const std::vector<std::string>& build_ids,
                                std::chrono::milliseconds quiet, std::chrono::milliseconds timeout);

}  // namespace cvm::fleetsim
