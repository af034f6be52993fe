#pragma once
// Reading a build's events back from CVM_EVENTS, as a client would, for tests that drive the
// services over a real NATS.

#include <chrono>
#include <initializer_list>
#include <optional>
#include <string>

#include "cvm/bus/bus.h"
#include "cvm/v1/build.pb.h"

namespace cvm::test {

// The newest event of a build, if it has any.
std::optional<cvm::v1::BuildEvent> last_build_event(bus::Connection& conn,
                                                    const std::string& build_id);

// Polls (bounded) until the build's newest event is in one of `phases`; that event, or nullopt.
std::optional<cvm::v1::BuildEvent> wait_build_phase(bus::Connection& conn,
                                                    const std::string& build_id,
                                                    std::initializer_list<cvm::v1::Phase> phases,
                                                    std::chrono::milliseconds timeout);

}  // namespace cvm::test
