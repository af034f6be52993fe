// The one place where a natsStatus becomes a cvm::Error.

#include <nats/nats.h>

#include <string>

#include "cvm/bus/bus.h"

namespace cvm::bus {

Error nats_error(int status, std::string_view context, int js_code) {
  const auto s = static_cast<natsStatus>(status);
  // nats_GetLastError is per thread and may describe an older failure; only trust it when it
  // belongs to this status.
  natsStatus last_status = NATS_OK;
  const char* last = nats_GetLastError(&last_status);
  std::string detail = (last != nullptr && last_status == s) ? last : "";

  // kvStore_Create/Update swallow the jsErrCode of the failed publish and leave only the
  // server's text ("wrong last sequence: N") behind: recover the code so CAS failures are
  // conflicts for every caller.
  if (js_code == 0 && s == NATS_ERR && detail.find("wrong last sequence") != std::string::npos) {
    js_code = JSStreamWrongLastSequenceErr;
  }

  ErrorDomain domain = ErrorDomain::kNats;
  switch (s) {
    case NATS_TIMEOUT:
      domain = ErrorDomain::kTimeout;
      break;
    case NATS_NO_RESPONDERS:
    case NATS_NOT_FOUND:
      domain = ErrorDomain::kNotFound;
      break;
    default:
      break;
  }
  switch (js_code) {
    case JSStreamWrongLastSequenceErr:
      domain = ErrorDomain::kConflict;
      break;
    case JSStreamNotFoundErr:
    case JSConsumerNotFoundErr:
      domain = ErrorDomain::kNotFound;
      break;
    default:
      break;
  }

  std::string message(context);
  message += ": ";
  message += natsStatus_GetText(s);
  if (!detail.empty() && detail != natsStatus_GetText(s)) message += " (" + detail + ")";
  if (js_code != 0) message += " [jetstream error " + std::to_string(js_code) + "]";
  return Error{domain, status, js_code, std::move(message)};
}

bool is_slow_consumer(const Error& error) {
  return error.domain == ErrorDomain::kNats && error.code == NATS_SLOW_CONSUMER;
}

}  // namespace cvm::bus
