#pragma once
// Decoding and validation of bus input. Pure: bytes in, a request or a precise complaint out.
// Every service that reads from the bus goes through these, so bad input is judged the same way
// everywhere (and one fuzz target covers it).

#include <optional>
#include <string>
#include <string_view>

#include "cvm/v1/build.pb.h"

namespace cvm {

struct InvalidBuild {
  // The build id, when one could be read (from the payload or the Nats-Msg-Id header) and is a
  // valid id: then the requester can be told on cvm.v1.builds.<id>.events.
  std::optional<std::string> build_id;
  std::optional<std::string> workspace_id;
  std::string message;
};

struct DecodedBuild {
  std::optional<cvm::v1::BuildRequest> request;  // set when valid
  std::optional<InvalidBuild> invalid;           // set otherwise
};

// msg_id: the Nats-Msg-Id header if present (cvmctl sets it to the build id).
DecodedBuild decode_build_request(std::string_view data, std::optional<std::string_view> msg_id);

// Empty when the request is acceptable; otherwise what is wrong, for a person to read.
std::string validate_build_request(const cvm::v1::BuildRequest& request);

}  // namespace cvm
