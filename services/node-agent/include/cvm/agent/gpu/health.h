#pragma once
// GPU health as the agent reports it. Pure: events and poll results in, GpuDevice health fields
// out. The broker decides quarantine from these facts (healthy now, time of the last event).
//
// Which XIDs count follows NVIDIA's device plugin: application-caused XIDs (13, 31, 43, 45, 68,
// 109) say nothing about the hardware and are ignored; every other XID is a health event.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "cvm/v1/node.pb.h"

namespace cvm::agent::gpu {

[[nodiscard]] bool is_critical_xid(uint32_t xid);
// "XID 79: GPU has fallen off the bus"; "XID 1234" for codes without a known text.
[[nodiscard]] std::string xid_text(uint32_t xid);

class GpuHealthTracker {
 public:
  // Returns true when it is a health event (critical XID).
  bool on_xid(const std::string& uuid, uint32_t xid, int64_t now_unix_ms);
  // The volatile uncorrected ECC count from a poll: an increase is a health event (the first
  // poll only sets the baseline). Returns true on an event.
  bool on_ecc_count(const std::string& uuid, uint64_t count, int64_t now_unix_ms);
  bool on_double_bit_ecc(const std::string& uuid, int64_t now_unix_ms);
  // Whether the device answered a query just now (error text when not). Returns true when the
  // state changed.
  bool on_query(const std::string& uuid, const std::string& error, int64_t now_unix_ms);

  // Sets healthy, health_reason, last_health_event_unix_ms, last_xid, ecc_uncorrected_errors.
  void apply(cvm::v1::GpuDevice& gpu) const;

 private:
  struct State {
    bool answering = true;
    std::string query_error;
    std::string last_reason;
    int64_t last_event_unix_ms = 0;
    uint32_t last_xid = 0;
    std::optional<uint64_t> ecc;
  };
  std::map<std::string, State, std::less<>> by_uuid_;
};

}  // namespace cvm::agent::gpu
