#include "cvm/base/validate.h"

#include <string>

#include "cvm/base/wire.h"

namespace cvm {

std::string validate_build_request(const cvm::v1::BuildRequest& r) {
  if (r.build_id().empty()) return "build_id is required";
  if (!wire::is_valid_id(r.build_id())) {
    return "build_id must be 1-128 characters of [A-Za-z0-9_-]";
  }
  if (r.workspace_id().empty()) return "workspace_id is required";
  if (!wire::is_valid_id(r.workspace_id())) {
    return "workspace_id must be 1-128 characters of [A-Za-z0-9_-]";
  }
  if (!cvm::v1::Transition_IsValid(r.transition())) return "transition is not a known value";
  const auto transition =
      r.transition() == cvm::v1::TRANSITION_UNSPECIFIED ? cvm::v1::START : r.transition();
  if (transition == cvm::v1::START && r.image().empty()) return "image is required to start";
  if (r.image().size() > 1024) return "image reference is longer than 1024 characters";
  if (r.owner().size() > 256) return "owner is longer than 256 characters";
  const auto& gpu = r.resources().gpu();
  if (!cvm::v1::GpuVendor_IsValid(gpu.vendor())) return "gpu vendor is not a known value";
  if (gpu.count() > 64) return "at most 64 GPUs can be requested";
  if (r.resources().cpu_millicores() > 1'000'000) return "cpu_millicores is out of range";
  // 1 PiB: far above any node, far below where sums of a few requests could wrap a uint64_t.
  constexpr uint64_t kMaxBytes = 1ULL << 50;
  if (r.resources().memory_bytes() > kMaxBytes) return "memory_bytes is out of range (max 1 PiB)";
  if (gpu.min_memory_bytes() > kMaxBytes) return "gpu min_memory_bytes is out of range (max 1 PiB)";
  return {};
}

DecodedBuild decode_build_request(std::string_view data, std::optional<std::string_view> msg_id) {
  DecodedBuild out;
  cvm::v1::BuildRequest request;
  if (!request.ParseFromArray(data.data(), static_cast<int>(data.size()))) {
    InvalidBuild bad;
    bad.message = "the message is not a cvm.v1.BuildRequest (protobuf decoding failed)";
    if (msg_id && wire::is_valid_id(*msg_id)) bad.build_id = std::string(*msg_id);
    out.invalid = std::move(bad);
    return out;
  }
  if (std::string problem = validate_build_request(request); !problem.empty()) {
    InvalidBuild bad;
    bad.message = std::move(problem);
    if (wire::is_valid_id(request.build_id())) {
      bad.build_id = request.build_id();
    } else if (msg_id && wire::is_valid_id(*msg_id)) {
      bad.build_id = std::string(*msg_id);
    }
    if (wire::is_valid_id(request.workspace_id())) bad.workspace_id = request.workspace_id();
    out.invalid = std::move(bad);
    return out;
  }
  if (request.transition() == cvm::v1::TRANSITION_UNSPECIFIED) {
    request.set_transition(cvm::v1::START);
  }
  out.request = std::move(request);
  return out;
}

}  // namespace cvm
