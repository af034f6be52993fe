#include "cvm/base/wire.h"

#include <string>

namespace cvm::wire {

std::string node_work_subject(std::string_view node_id) {
  return "cvm.v1.node." + std::string(node_id) + ".work";
}

std::string node_console_subject(std::string_view node_id, std::string_view user) {
  return "cvm.v1.node." + std::string(node_id) + ".console." + std::string(user);
}

std::string node_console_wildcard(std::string_view node_id) {
  return "cvm.v1.node." + std::string(node_id) + ".console.*";
}

std::string gpu_release_subject(std::string_view node_id) {
  return std::string(kGpuRelease) + "." + std::string(node_id);
}

std::string session_open_subject(std::string_view node_id, std::string_view user) {
  return "cvm.v1.node." + std::string(node_id) + ".open." + std::string(user);
}

std::string session_in_subject(std::string_view node_id, std::string_view user,
                               std::string_view session_id) {
  return "cvm.v1.node." + std::string(node_id) + ".session." + std::string(user) + "." +
         std::string(session_id) + ".in";
}

std::string session_out_subject(std::string_view node_id, std::string_view user,
                                std::string_view session_id) {
  return "cvm.v1.node." + std::string(node_id) + ".session." + std::string(user) + "." +
         std::string(session_id) + ".out";
}

std::string session_open_wildcard(std::string_view node_id) {
  return "cvm.v1.node." + std::string(node_id) + ".open.*";
}

std::string session_in_wildcard(std::string_view node_id) {
  return "cvm.v1.node." + std::string(node_id) + ".session.*.*.in";
}

std::string build_events_subject(std::string_view build_id) {
  return "cvm.v1.builds." + std::string(build_id) + ".events";
}

std::string agent_durable(std::string_view node_id) { return "agent-" + std::string(node_id); }

bool is_valid_id(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

}  // namespace cvm::wire
