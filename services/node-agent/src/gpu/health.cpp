#include "cvm/agent/gpu/health.h"

#include <array>
#include <utility>

namespace cvm::agent::gpu {

bool is_critical_xid(uint32_t xid) {
  switch (xid) {
    case 13:   // graphics engine exception: an application fault
    case 31:   // GPU memory page fault: an application fault
    case 43:   // GPU stopped processing: the application's channel
    case 45:   // preemptive cleanup after a previous error
    case 68:   // NVDEC0 exception: video decoder input
    case 109:  // context switch timeout: an application hang
      return false;
    default:
      return true;
  }
}

std::string xid_text(uint32_t xid) {
  static constexpr std::array<std::pair<uint32_t, const char*>, 14> kTexts{{
      {13, "graphics engine exception"},
      {31, "GPU memory page fault"},
      {43, "GPU stopped processing"},
      {45, "preemptive cleanup"},
      {48, "double-bit ECC error"},
      {61, "internal micro-controller breakpoint"},
      {62, "internal micro-controller halt"},
      {63, "ECC page retirement or row remapping event"},
      {64, "ECC page retirement or row remapping failure"},
      {74, "NVLink error"},
      {79, "GPU has fallen off the bus"},
      {92, "high single-bit ECC error rate"},
      {94, "contained ECC error"},
      {95, "uncontained ECC error"},
  }};
  for (const auto& [code, text] : kTexts) {
    if (code == xid) return "XID " + std::to_string(xid) + ": " + text;
  }
  return "XID " + std::to_string(xid);
}

bool GpuHealthTracker::on_xid(const std::string& uuid, uint32_t xid, int64_t now_unix_ms) {
  if (!is_critical_xid(xid)) return false;
  auto& s = by_uuid_[uuid];
  s.last_xid = xid;
  s.last_event_unix_ms = now_unix_ms;
  s.last_reason = xid_text(xid);
  return true;
}

bool GpuHealthTracker::on_ecc_count(const std::string& uuid, uint64_t count, int64_t now_unix_ms) {
  auto& s = by_uuid_[uuid];
  const bool increased = s.ecc.has_value() && count > *s.ecc;
  const uint64_t before = s.ecc.value_or(0);
  s.ecc = count;
  if (!increased) return false;
  s.last_event_unix_ms = now_unix_ms;
  s.last_reason = std::to_string(count - before) + " new uncorrectable ECC error" +
                  (count - before == 1 ? "" : "s") + " (" + std::to_string(count) + " in total)";
  return true;
}

bool GpuHealthTracker::on_double_bit_ecc(const std::string& uuid, int64_t now_unix_ms) {
  auto& s = by_uuid_[uuid];
  s.last_event_unix_ms = now_unix_ms;
  s.last_reason = "double-bit ECC error";
  return true;
}

bool GpuHealthTracker::on_query(const std::string& uuid, const std::string& error,
                                int64_t now_unix_ms) {
  auto& s = by_uuid_[uuid];
  const bool answering = error.empty();
  if (answering == s.answering) return false;
  s.answering = answering;
  s.query_error = error;
  if (!answering) {
    // Going silent is itself an event: the quarantine period runs from when it answers again.
    s.last_event_unix_ms = now_unix_ms;
    s.last_reason = "not answering: " + error;
  }
  return true;
}

void GpuHealthTracker::apply(cvm::v1::GpuDevice& gpu) const {
  const auto it = by_uuid_.find(gpu.uuid());
  if (it == by_uuid_.end()) return;
  const auto& s = it->second;
  if (!s.answering) {
    gpu.set_healthy(false);
    gpu.set_health_reason("not answering: " + s.query_error);
  } else if (!s.last_reason.empty()) {
    gpu.set_health_reason(s.last_reason);
  }
  if (s.last_event_unix_ms > 0) gpu.set_last_health_event_unix_ms(s.last_event_unix_ms);
  if (s.last_xid > 0) gpu.set_last_xid(s.last_xid);
  if (s.ecc) gpu.set_ecc_uncorrected_errors(*s.ecc);
}

}  // namespace cvm::agent::gpu
