#pragma once
// Linux capability names and masks. The OCI spec names capabilities ("CAP_SYS_ADMIN"); the kernel
// reports sets as hex masks (/proc/<pid>/status CapBnd). runc fails to start a container that asks
// for a capability outside its own bounding set, so requested sets are intersected with the host's.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/base/result.h"

namespace cvm::agent {

// Highest capability number this code knows (CAP_CHECKPOINT_RESTORE, Linux 5.9).
inline constexpr int kLastCapability = 40;

// "CAP_CHOWN" for 0 ...; empty for numbers this code does not know.
[[nodiscard]] std::string_view capability_name(int number);
// The number of "CAP_SYS_ADMIN" (the "CAP_" prefix is optional, case-insensitive); nullopt if
// unknown.
[[nodiscard]] std::optional<int> capability_number(std::string_view name);

// The "CapBnd:" (or another field's) hex mask from /proc/<pid>/status text.
[[nodiscard]] Result<uint64_t> parse_status_cap_mask(std::string_view proc_status,
                                                     std::string_view field = "CapBnd");

// Names of the bits set in `mask`, in capability-number order (unknown bits are skipped).
[[nodiscard]] std::vector<std::string> capability_names_from_mask(uint64_t mask);

// Keeps the names whose bit is set in `mask`, dropping unknown names; order and duplicates as given
// minus repeats.
[[nodiscard]] std::vector<std::string> intersect_capabilities(const std::vector<std::string>& names,
                                                              uint64_t mask);

// Docker's default set: what a plain (non-CVM) workspace container gets.
[[nodiscard]] std::vector<std::string> docker_default_capabilities();
// Capabilities a workspace never needs: they act on the node (its kernel, clock, power, LSM and
// audit policy, kernel log) or on calls the seccomp profile denies anyway. Dropped even though a
// user namespace's capabilities reach only what it owns: one less thing a kernel bug can use.
[[nodiscard]] std::vector<std::string> never_in_a_workspace();
// What root of a CVM's inner container holds: every known capability (as Sysbox gives a system
// container) less never_in_a_workspace(). Held inside the container's own user namespace, so
// they reach only what that namespace owns.
[[nodiscard]] std::vector<std::string> system_container_capabilities();

}  // namespace cvm::agent
