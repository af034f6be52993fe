#include "cvm/agent/seccomp.h"

#include <algorithm>
#include <array>
#include <map>
#include <set>

#include "seccomp_default.h"

namespace cvm::agent {

namespace {

using nlohmann::json;

constexpr std::array kActions = {"SCMP_ACT_KILL",  "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                                 "SCMP_ACT_TRAP",  "SCMP_ACT_ERRNO",        "SCMP_ACT_TRACE",
                                 "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"};
// libseccomp's architecture names, as the OCI runtime spec lists them.
constexpr std::array kArchitectures = {
    "SCMP_ARCH_X86",     "SCMP_ARCH_X86_64",   "SCMP_ARCH_X32",         "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64", "SCMP_ARCH_MIPS",     "SCMP_ARCH_MIPS64",      "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",  "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",   "SCMP_ARCH_PPC64LE",  "SCMP_ARCH_S390",        "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",  "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64"};
constexpr std::array kOperators = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE",       "SCMP_CMP_EQ",
                                   "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"};
constexpr std::array kFlags = {"SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                               "SECCOMP_FILTER_FLAG_SPEC_ALLOW"};

template <size_t N>
bool one_of(const std::array<const char*, N>& set, const json& v) {
  return v.is_string() &&
         std::any_of(set.begin(), set.end(), [&](const char* s) { return v == s; });
}

Error invalid(const std::string& what) {
  return make_error(ErrorDomain::kInvalid, "seccomp profile: " + what);
}

bool syscall_name(const json& v) {
  if (!v.is_string()) return false;
  const auto& s = v.get_ref<const std::string&>();
  return !s.empty() && s.size() <= 64 && std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
}

bool errno_value(const json& v) {
  return v.is_number_unsigned() && v.get<uint64_t>() >= 1 && v.get<uint64_t>() <= 4095;
}

// Only the keys in `allowed`; "comment" is always allowed and dropped.
Result<json> known_keys(const json& object, std::initializer_list<const char*> allowed,
                        const std::string& where) {
  json out = json::object();
  for (auto it = object.begin(); it != object.end(); ++it) {
    const std::string& key = it.key();
    if (key == "comment") continue;
    if (std::find_if(allowed.begin(), allowed.end(), [&](const char* k) { return key == k; }) ==
        allowed.end()) {
      return invalid(where + ": unknown key \"" + key + "\"");
    }
    out[key] = it.value();
  }
  return out;
}

Status check_action(const json& rule, const std::string& where) {
  if (!rule.contains("action")) return invalid(where + ": no \"action\"");
  if (rule["action"] == "SCMP_ACT_NOTIFY") {
    return invalid(where + ": SCMP_ACT_NOTIFY needs a listener, and the agent runs none");
  }
  if (!one_of(kActions, rule["action"])) {
    return invalid(where + ": unknown action " + rule["action"].dump());
  }
  return {};
}

Result<json> check_rule(const json& raw, size_t index) {
  const std::string where = "syscalls[" + std::to_string(index) + "]";
  if (!raw.is_object()) return invalid(where + " is not an object");
  auto rule = known_keys(raw, {"names", "action", "errnoRet", "args"}, where);
  if (!rule) return rule.error();
  if (!rule->contains("names") || !(*rule)["names"].is_array() || (*rule)["names"].empty()) {
    return invalid(where + ": \"names\" must be a non-empty list of system call names");
  }
  for (const auto& n : (*rule)["names"]) {
    if (!syscall_name(n)) return invalid(where + ": " + n.dump() + " is not a system call name");
  }
  if (auto st = check_action(*rule, where); !st.ok()) return st.error();
  if (rule->contains("errnoRet") && !errno_value((*rule)["errnoRet"])) {
    return invalid(where + ": errnoRet must be an errno number, 1..4095");
  }
  if (rule->contains("args")) {
    const auto& args = (*rule)["args"];
    if (!args.is_array()) return invalid(where + ": \"args\" must be a list");
    for (const auto& a : args) {
      if (!a.is_object()) return invalid(where + ": an argument condition is not an object");
      auto arg = known_keys(a, {"index", "value", "valueTwo", "op"}, where + ".args");
      if (!arg) return arg.error();
      if (!arg->contains("index") || !(*arg)["index"].is_number_unsigned() ||
          (*arg)["index"].get<uint64_t>() > 5) {
        return invalid(where + ": an argument index must be 0..5");
      }
      if (!arg->contains("value") || !(*arg)["value"].is_number_unsigned() ||
          (arg->contains("valueTwo") && !(*arg)["valueTwo"].is_number_unsigned())) {
        return invalid(where + ": argument values must be unsigned numbers");
      }
      if (!arg->contains("op") || !one_of(kOperators, (*arg)["op"])) {
        return invalid(where + ": unknown argument operator " + arg->value("op", json()).dump());
      }
    }
  }
  return rule;
}

}  // namespace

std::string_view default_seccomp_profile() { return generated::kDefaultSeccompProfile; }

Result<json> parse_seccomp_profile(std::string_view profile_text) {
  const json doc = json::parse(profile_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return invalid("not JSON");
  if (!doc.is_object()) return invalid("not a JSON object");
  auto out =
      known_keys(doc, {"defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls"},
                 "the profile");
  if (!out) return out.error();
  if (!out->contains("defaultAction")) return invalid("no \"defaultAction\"");
  json head = {{"action", (*out)["defaultAction"]}};
  if (auto st = check_action(head, "defaultAction"); !st.ok()) return st.error();
  if (out->contains("defaultErrnoRet") && !errno_value((*out)["defaultErrnoRet"])) {
    return invalid("defaultErrnoRet must be an errno number, 1..4095");
  }
  if (out->contains("architectures")) {
    if (!(*out)["architectures"].is_array()) return invalid("\"architectures\" must be a list");
    for (const auto& a : (*out)["architectures"]) {
      if (!one_of(kArchitectures, a)) return invalid("unknown architecture " + a.dump());
    }
  }
  if (out->contains("flags")) {
    if (!(*out)["flags"].is_array()) return invalid("\"flags\" must be a list");
    for (const auto& f : (*out)["flags"]) {
      if (!one_of(kFlags, f)) return invalid("unknown flag " + f.dump());
    }
  }
  json rules = json::array();
  if (out->contains("syscalls")) {
    if (!(*out)["syscalls"].is_array()) return invalid("\"syscalls\" must be a list");
    std::map<std::string, size_t> unconditional;  // name -> the rule that names it without args
    size_t i = 0;
    for (const auto& raw : (*out)["syscalls"]) {
      auto rule = check_rule(raw, i);
      if (!rule) return rule.error();
      if (!rule->contains("args") || (*rule)["args"].empty()) {
        for (const auto& n : (*rule)["names"]) {
          auto [at, fresh] = unconditional.emplace(n.get<std::string>(), i);
          if (!fresh) {
            return invalid(n.get<std::string>() + " is in syscalls[" + std::to_string(at->second) +
                           "] and syscalls[" + std::to_string(i) + "]");
          }
        }
      }
      rules.push_back(std::move(*rule));
      ++i;
    }
  }
  (*out)["syscalls"] = std::move(rules);
  return out;
}

}  // namespace cvm::agent
