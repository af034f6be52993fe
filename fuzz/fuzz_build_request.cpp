// BuildRequest from CVM_BUILDS, as the scheduler reads it: decode_build_request (the one decoder +
// validator every service uses), then the pure decisions that follow a valid request: the settings
// folded in (make_placement_request), the request-level rules (check_request), a placement over a
// small fixed index, and the broker's GPU policy.
//
// Input: flags byte (bit 0: a Nats-Msg-Id header is present; bits 1-4: the admin settings in
// force), the msg id as a short string, then the payload.
#include <cstdlib>

#include "cvm/base/validate.h"
#include "cvm/broker/allocator.h"
#include "cvm/scheduler/placement.h"
#include "fuzz_input.h"

namespace {

const cvm::scheduler::NodeIndex& fixed_index() {
  static const cvm::scheduler::NodeIndex index = [] {
    cvm::scheduler::NodeIndex ix;
    for (int i = 0; i < 3; ++i) {
      cvm::v1::NodeStatus s;
      s.set_node_id("node-" + std::to_string(i));
      s.set_heartbeat_unix_ms(1'000'000);
      s.mutable_capacity()->set_cpu_millicores(4000);
      s.mutable_capacity()->set_memory_bytes(8ULL << 30);
      s.mutable_host()->set_bare_metal(i == 2);
      s.mutable_host()->set_shiftfs_loaded(i != 0);
      s.mutable_runtime()->set_ready(true);
      if (i == 2) {
        auto* g = s.add_gpus();
        g->set_uuid("GPU-0");
        g->set_vendor(cvm::v1::NVIDIA);
        g->set_memory_bytes(16ULL << 30);
        g->set_healthy(true);
      }
      ix.upsert(s, 1);
    }
    return ix;
  }();
  return index;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const uint8_t flags = in.byte();
  const std::string_view msg_id = in.short_string();
  const auto decoded = cvm::decode_build_request(
      in.rest(), (flags & 1) != 0 ? std::optional<std::string_view>(msg_id) : std::nullopt);
  // Exactly one of the two, always.
  if (decoded.request.has_value() == decoded.invalid.has_value()) std::abort();
  if (!decoded.request) return 0;
  const cvm::v1::BuildRequest& request = *decoded.request;
  // What the decoder accepted, the validator accepts too (the agent re-validates assignments).
  if (!cvm::validate_build_request(request).empty()) std::abort();

  cvm::scheduler::EffectiveSettings settings;
  settings.cvm_enabled = (flags & 2) != 0;
  settings.default_to_cvm = (flags & 4) != 0;
  settings.caching = (flags & 8) != 0;
  settings.auto_load_shiftfs = (flags & 16) != 0;
  const auto placement = cvm::scheduler::make_placement_request(request, settings);
  (void)cvm::scheduler::reservation_for(placement);
  if (auto refused = cvm::scheduler::check_request(placement)) {
    if (refused->ok()) std::abort();  // a refusal names its reason
    return 0;
  }
  cvm::scheduler::PlacementOptions options;
  options.now_unix_ms = 1'000'500;
  options.max_candidates = 3;
  const auto decision = cvm::scheduler::place(fixed_index(), placement, options);
  if (decision.ok() == decision.candidates.empty()) std::abort();
  (void)cvm::scheduler::rejection_message(decision.stats);

  (void)cvm::broker::check_gpu_policy({.vendor = placement.gpu_vendor,
                                       .bare_metal = true,
                                       .cached_cvm = placement.cvm && placement.caching});
  return 0;
}
