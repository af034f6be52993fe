#pragma once
// A workspace's seccomp profile: the OCI runtime spec's linux.seccomp object, with "comment" keys
// that say why each rule is there (deploy/seccomp/workspace.json is the built-in one). The agent
// checks a profile before it hands it to the runtime, so that a workspace with a profile that
// cannot be loaded fails with the reason instead of starting unfiltered or failing inside runc.
// Pure; unit-tested.
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "cvm/base/result.h"

namespace cvm::agent {

// deploy/seccomp/workspace.json as it was when the agent was built.
[[nodiscard]] std::string_view default_seccomp_profile();

// The linux.seccomp object of `profile_text` (comments dropped), or kInvalid naming the first
// thing wrong: not JSON, an unknown key, action, architecture, operator or syscall-name shape, an
// errno outside 1..4095, an argument index outside 0..5, a rule without names, or one syscall in
// two rules without arguments (libseccomp refuses a second action for the same call). Actions that
// need a listener the agent does not run (SCMP_ACT_NOTIFY) are refused.
[[nodiscard]] Result<nlohmann::json> parse_seccomp_profile(std::string_view profile_text);

}  // namespace cvm::agent
