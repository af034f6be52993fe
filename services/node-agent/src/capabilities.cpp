#include "cvm/agent/capabilities.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>

#include "file_util.h"

namespace cvm::agent {
namespace {

// Index = capability number (linux/capability.h).
constexpr std::array<std::string_view, kLastCapability + 1> kNames = {
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
};

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::toupper(static_cast<unsigned char>(x)) ==
                  std::toupper(static_cast<unsigned char>(y));
         });
}

}  // namespace

std::string_view capability_name(int number) {
  if (number < 0 || number > kLastCapability) return {};
  return kNames[static_cast<size_t>(number)];
}

std::optional<int> capability_number(std::string_view name) {
  if (name.size() > 4 && iequals(name.substr(0, 4), "CAP_")) name.remove_prefix(4);
  for (int i = 0; i <= kLastCapability; ++i) {
    if (iequals(kNames[static_cast<size_t>(i)].substr(4), name)) return i;
  }
  return std::nullopt;
}

Result<uint64_t> parse_status_cap_mask(std::string_view proc_status, std::string_view field) {
  size_t pos = 0;
  while (pos < proc_status.size()) {
    size_t end = proc_status.find('\n', pos);
    if (end == std::string_view::npos) end = proc_status.size();
    const std::string_view line = proc_status.substr(pos, end - pos);
    pos = end + 1;
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || line.substr(0, colon) != field) continue;
    const std::string_view hex = detail::trim(line.substr(colon + 1));
    uint64_t mask = 0;
    const auto [ptr, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), mask, 16);
    if (ec != std::errc() || ptr != hex.data() + hex.size() || hex.empty()) {
      return make_error(ErrorDomain::kInvalid,
                        std::string(field) + ": not a hex mask: '" + std::string(hex) + "'");
    }
    return mask;
  }
  return make_error(ErrorDomain::kNotFound, std::string(field) + " not in process status");
}

std::vector<std::string> capability_names_from_mask(uint64_t mask) {
  std::vector<std::string> out;
  for (int i = 0; i <= kLastCapability; ++i) {
    if ((mask >> i) & 1U) out.emplace_back(kNames[static_cast<size_t>(i)]);
  }
  return out;
}

std::vector<std::string> intersect_capabilities(const std::vector<std::string>& names,
                                                uint64_t mask) {
  std::vector<std::string> out;
  uint64_t seen = 0;
  for (const auto& name : names) {
    const auto number = capability_number(name);
    if (!number) continue;
    const uint64_t bit = uint64_t{1} << *number;
    if ((mask & bit) == 0 || (seen & bit) != 0) continue;
    seen |= bit;
    out.emplace_back(kNames[static_cast<size_t>(*number)]);
  }
  return out;
}

std::vector<std::string> docker_default_capabilities() {
  return {"CAP_CHOWN",   "CAP_DAC_OVERRIDE", "CAP_FSETID",           "CAP_FOWNER",
          "CAP_MKNOD",   "CAP_NET_RAW",      "CAP_SETGID",           "CAP_SETUID",
          "CAP_SETFCAP", "CAP_SETPCAP",      "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
          "CAP_KILL",    "CAP_AUDIT_WRITE"};
}

std::vector<std::string> never_in_a_workspace() {
  return {
      "CAP_SYS_MODULE",                          // the node's kernel (init_module is filtered too)
      "CAP_SYS_RAWIO",                           // I/O ports and raw devices (iopl is filtered too)
      "CAP_SYS_TIME",                            // the node's clock (timesyncd then skips itself)
      "CAP_SYS_PACCT",                           // process accounting (acct is filtered too)
      "CAP_WAKE_ALARM",    "CAP_BLOCK_SUSPEND",  // the node's power management
      "CAP_MAC_ADMIN",     "CAP_MAC_OVERRIDE",   // the node's LSM policy
      "CAP_SYSLOG",                              // the kernel log (syslog is filtered too)
      "CAP_AUDIT_CONTROL",                       // the node's audit rules
      "CAP_BPF",           "CAP_PERFMON",        // bpf and perf_event_open are filtered
  };
}

std::vector<std::string> system_container_capabilities() {
  uint64_t mask = ~uint64_t{0};
  for (const auto& name : never_in_a_workspace())
    mask &= ~(uint64_t{1} << *capability_number(name));
  return capability_names_from_mask(mask);
}

}  // namespace cvm::agent
