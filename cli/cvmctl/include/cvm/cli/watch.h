#pragma once
// Following one build: which events end the watch, the exit code they mean, and what a person
// sees meanwhile (phase, elapsed time, what the build waits on). Pure: events and times come in,
// text and decisions go out; commands.cpp owns the bus and the terminal.

#include <cstdint>
#include <string>

#include "cvm/v1/build.pb.h"

namespace cvm::cli {

// Does this phase end a build of the given transition? TRANSITION_UNSPECIFIED (watching a build
// by id, transition unknown): any of RUNNING, STOPPED, FAILED does.
bool ends_build(cvm::v1::Transition transition, cvm::v1::Phase phase);

// What a build in `phase` (nothing yet: PHASE_UNSPECIFIED) waits on, in words that point at the
// component to look at. `scheduler_fetching`: a cvm-scheduler is pulling requests right now.
std::string waiting_on(cvm::v1::Phase phase, const std::string& node_id, bool scheduler_fetching);

class BuildWatch {
 public:
  // started_ms: when the watch began (the request was submitted), on the local clock.
  BuildWatch(cvm::v1::Transition transition, int64_t started_ms)
      : transition_(transition), started_ms_(started_ms), phase_since_ms_(started_ms) {}

  // Takes one event, received at now_ms; returns true when it ends the watch. Events of a build
  // that already ended (a duplicate's history, a later LOST notice) still update the view.
  bool on_event(const cvm::v1::BuildEvent& event, int64_t now_ms);

  [[nodiscard]] bool done() const { return done_; }
  [[nodiscard]] int events() const { return events_; }
  [[nodiscard]] cvm::v1::Phase phase() const { return phase_; }
  // The exit code the watch ends with: 0 when the build reached its goal, 1 when it FAILED.
  [[nodiscard]] int exit_code() const;
  // One line for a terminal, redrawn in place: "PREPARING  4.2s in phase, 6.0s total  node n1
  // is unpacking the image".
  [[nodiscard]] std::string status_line(int64_t now_ms, bool scheduler_fetching) const;

 private:
  cvm::v1::Transition transition_;
  int64_t started_ms_;
  int64_t phase_since_ms_;
  cvm::v1::Phase phase_ = cvm::v1::PHASE_UNSPECIFIED;
  std::string node_;
  bool done_ = false;
  bool failed_ = false;
  int events_ = 0;
};

// "1.2s", "2m03s", "1h02m".
std::string format_duration(int64_t ms);

}  // namespace cvm::cli
