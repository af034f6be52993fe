#include "cvm/cli/watch.h"

#include <cstdio>

#include "cvm/base/reasons.h"

namespace cvm::cli {

bool ends_build(cvm::v1::Transition transition, cvm::v1::Phase phase) {
  if (phase == cvm::v1::FAILED) return true;
  switch (transition) {
    case cvm::v1::START:
      return phase == cvm::v1::RUNNING;
    case cvm::v1::STOP:
    case cvm::v1::DELETE:
      return phase == cvm::v1::STOPPED;
    default:
      return phase == cvm::v1::RUNNING || phase == cvm::v1::STOPPED;
  }
}

std::string waiting_on(cvm::v1::Phase phase, const std::string& node_id, bool scheduler_fetching) {
  const std::string node = node_id.empty() ? "the node" : "node " + node_id;
  switch (phase) {
    case cvm::v1::PHASE_UNSPECIFIED:
      // Nothing heard yet: the one useful hint is whether anything is taking requests at all.
      return scheduler_fetching ? "waiting for cvm-scheduler to take the request"
                                : "waiting for a cvm-scheduler: none is fetching requests (is it "
                                  "running? systemctl status cvm-scheduler)";
    case cvm::v1::PENDING:
      return "waiting for a node with room";
    case cvm::v1::SCHEDULED:
      return "waiting for the node agent on " + node + " to take the assignment";
    case cvm::v1::PREPARING:
      return node + " is preparing the image and the workspace's files";
    case cvm::v1::STARTING:
      return node + " is starting the container";
    case cvm::v1::STOPPING:
      return node + " is stopping the container";
    case cvm::v1::RUNNING:
      return "running on " + node;
    case cvm::v1::STOPPED:
      return "stopped";
    case cvm::v1::FAILED:
      return "failed";
    default:
      return node + " stopped reporting; the scheduler handles it";
  }
}

bool BuildWatch::on_event(const cvm::v1::BuildEvent& event, int64_t now_ms) {
  ++events_;
  if (event.phase() != phase_) phase_since_ms_ = now_ms;
  phase_ = event.phase();
  if (!event.node_id().empty()) node_ = event.node_id();
  if (!done_ && ends_build(transition_, phase_)) {
    done_ = true;
    failed_ = phase_ == cvm::v1::FAILED;
    return true;
  }
  return false;
}

int BuildWatch::exit_code() const { return failed_ ? 1 : 0; }

std::string BuildWatch::status_line(int64_t now_ms, bool scheduler_fetching) const {
  const std::string phase =
      phase_ == cvm::v1::PHASE_UNSPECIFIED ? "SUBMITTED" : std::string(phase_name(phase_));
  return phase + "  " + format_duration(now_ms - phase_since_ms_) + " in phase, " +
         format_duration(now_ms - started_ms_) + " total  " +
         waiting_on(phase_, node_, scheduler_fetching);
}

std::string format_duration(int64_t ms) {
  if (ms < 0) ms = 0;
  char buf[32];
  if (ms < 60'000) {
    std::snprintf(buf, sizeof(buf), "%.1fs", static_cast<double>(ms) / 1000.0);
  } else if (ms < 3'600'000) {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(ms / 60'000),
                  static_cast<long long>((ms / 1000) % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(ms / 3'600'000),
                  static_cast<long long>((ms / 60'000) % 60));
  }
  return buf;
}

}  // namespace cvm::cli
