#pragma once
// Human text for the wire enums, shared by every service and cvmctl.

#include <string_view>

#include "cvm/v1/build.pb.h"

namespace cvm {

std::string_view reason_text(cvm::v1::Reason reason);
std::string_view phase_name(cvm::v1::Phase phase);
// RUNNING ends a START, STOPPED ends a STOP/DELETE, FAILED ends anything.
bool is_terminal_phase(cvm::v1::Phase phase);
// A workspace in this phase uses none of its node's room: STOPPED, FAILED (and LOST, whose node
// is gone). A scheduler's capacity hold for its build can go at once instead of at its expiry.
bool releases_capacity(cvm::v1::Phase phase);

}  // namespace cvm
