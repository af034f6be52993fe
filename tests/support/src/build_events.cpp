#include "cvm/test/build_events.h"

#include <algorithm>

#include "cvm/base/wire.h"
#include "cvm/test/wait.h"

namespace cvm::test {

std::optional<cvm::v1::BuildEvent> last_build_event(bus::Connection& conn,
                                                    const std::string& build_id) {
  auto m =
      conn.last_message(std::string(wire::kStreamEvents), wire::build_events_subject(build_id));
  if (!m.ok() || !m->has_value()) return std::nullopt;
  cvm::v1::BuildEvent e;
  if (!e.ParseFromString((*m)->data)) return std::nullopt;
  return e;
}

std::optional<cvm::v1::BuildEvent> wait_build_phase(bus::Connection& conn,
                                                    const std::string& build_id,
                                                    std::initializer_list<cvm::v1::Phase> phases,
                                                    std::chrono::milliseconds timeout) {
  std::optional<cvm::v1::BuildEvent> found;
  wait_until(
      [&] {
        auto e = last_build_event(conn, build_id);
        if (!e || std::find(phases.begin(), phases.end(), e->phase()) == phases.end()) {
          return false;
        }
        found = std::move(e);
        return true;
      },
      timeout);
  return found;
}

}  // namespace cvm::test
