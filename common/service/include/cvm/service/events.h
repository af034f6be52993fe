#pragma once
// Publishing BuildEvents to CVM_EVENTS. Every event carries Nats-Msg-Id "<build_id>.<PHASE>", so a
// redelivered request that runs the same step again cannot publish the same phase twice: the
// stream drops the duplicate. That is what makes "exactly one terminal event" hold across crashes.

#include <string>

#include "cvm/base/clock.h"
#include "cvm/base/result.h"
#include "cvm/bus/bus.h"
#include "cvm/v1/build.pb.h"

namespace cvm::service {

cvm::v1::BuildEvent make_event(const std::string& build_id, const std::string& workspace_id,
                               cvm::v1::Phase phase, const Clock& clock, std::string_view source);

std::string event_msg_id(const cvm::v1::BuildEvent& event);

// Returns the PubAck so the caller can tell a duplicate (already published) from a new event.
Result<bus::PubAck> publish_event(bus::Connection& conn, const cvm::v1::BuildEvent& event);

}  // namespace cvm::service
