#include "cvm/base/reasons.h"

namespace cvm {

std::string_view reason_text(cvm::v1::Reason reason) {
  using cvm::v1::Reason;
  switch (reason) {
    case cvm::v1::REASON_UNSPECIFIED:
      return "";
    case cvm::v1::CVM_DISABLED:
      return "CVMs are disabled in the infrastructure settings";
    case cvm::v1::NO_ELIGIBLE_NODE:
      return "no node can run this workspace";
    case cvm::v1::GPU_VENDOR_UNSUPPORTED:
      return "only NVIDIA GPUs are supported";
    case cvm::v1::GPU_REQUIRES_BARE_METAL:
      return "GPUs are only supported on bare-metal nodes";
    case cvm::v1::GPU_WITH_CACHING_UNSUPPORTED:
      return "GPUs are not supported with cached CVMs";
    case cvm::v1::INSUFFICIENT_CAPACITY:
      return "not enough free capacity";
    case cvm::v1::IMAGE_UNAVAILABLE:
      return "the image could not be found or pulled";
    case cvm::v1::RUNTIME_ERROR:
      return "the container runtime failed";
    case cvm::v1::NODE_LOST:
      return "the node stopped sending heartbeats";
    case cvm::v1::INVALID_REQUEST:
      return "the request is malformed";
    case cvm::v1::WORKSPACE_NOT_FOUND:
      return "no such workspace";
    default:
      return "unknown reason";
  }
}

std::string_view phase_name(cvm::v1::Phase phase) {
  const auto& name = cvm::v1::Phase_Name(phase);
  return name;
}

bool is_terminal_phase(cvm::v1::Phase phase) {
  return phase == cvm::v1::RUNNING || phase == cvm::v1::STOPPED || phase == cvm::v1::FAILED;
}

bool releases_capacity(cvm::v1::Phase phase) {
  return phase == cvm::v1::STOPPED || phase == cvm::v1::FAILED || phase == cvm::v1::LOST;
}

}  // namespace cvm
