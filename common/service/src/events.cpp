#include "cvm/service/events.h"

#include "cvm/base/reasons.h"
#include "cvm/base/wire.h"

namespace cvm::service {

cvm::v1::BuildEvent make_event(const std::string& build_id, const std::string& workspace_id,
                               cvm::v1::Phase phase, const Clock& clock, std::string_view source) {
  cvm::v1::BuildEvent e;
  e.set_build_id(build_id);
  e.set_workspace_id(workspace_id);
  e.set_phase(phase);
  e.set_timestamp_unix_ms(clock.now_unix_ms());
  e.set_source(std::string(source));
  return e;
}

std::string event_msg_id(const cvm::v1::BuildEvent& event) {
  return event.build_id() + "." + std::string(phase_name(event.phase()));
}

Result<bus::PubAck> publish_event(bus::Connection& conn, const cvm::v1::BuildEvent& event) {
  return conn.js_publish(wire::build_events_subject(event.build_id()), event.SerializeAsString(),
                         event_msg_id(event));
}

}  // namespace cvm::service
