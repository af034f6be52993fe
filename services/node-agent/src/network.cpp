#include "cvm/agent/network.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cvm/agent/process.h"
#include "file_util.h"

namespace cvm::agent {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::string_view kCniVersion = "1.0.0";
constexpr std::string_view kIfName = "eth0";

std::string cni_container_id(const std::string& workspace_id) { return "cvm-" + workspace_id; }

Status write_atomically(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << content;
    if (!out.flush()) return make_error(ErrorDomain::kSystem, "cannot write " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return make_error(ErrorDomain::kSystem, "rename " + tmp + ": " + std::strerror(errno));
  }
  return {};
}

}  // namespace

json cni_conflist(const NetworkConfig& c) {
  json ipam = {{"type", "host-local"},
               {"ranges", json::array({json::array({{{"subnet", c.subnet}}})})},
               {"routes", json::array({{{"dst", "0.0.0.0/0"}}})}};
  if (!c.state_dir.empty()) ipam["dataDir"] = c.state_dir + "/ipam";
  return {{"cniVersion", kCniVersion},
          {"name", c.name},
          {"plugins", json::array({{{"type", "bridge"},
                                    {"bridge", c.bridge},
                                    {"isGateway", true},
                                    {"ipMasq", true},
                                    {"hairpinMode", false},
                                    {"ipam", ipam}},
                                   {{"type", "firewall"}, {"backend", "iptables"}}})}};
}

Result<json> plugin_config(const json& conflist, size_t index, const json& prev_result) {
  if (!conflist.is_object() || !conflist.contains("plugins") || !conflist["plugins"].is_array() ||
      index >= conflist["plugins"].size()) {
    return make_error(ErrorDomain::kInvalid, "no plugin " + std::to_string(index) + " in the list");
  }
  json p = conflist["plugins"][index];
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string()) {
    return make_error(ErrorDomain::kInvalid, "plugin " + std::to_string(index) + " has no type");
  }
  p["cniVersion"] = conflist.value("cniVersion", std::string(kCniVersion));
  p["name"] = conflist.value("name", std::string("cvm"));
  if (!prev_result.is_null()) p["prevResult"] = prev_result;
  return p;
}

Result<Attachment> parse_cni_result(const json& result, std::string_view bridge) {
  if (!result.is_object()) return make_error(ErrorDomain::kInvalid, "CNI result is not an object");
  Attachment a;
  a.result = result;
  const json interfaces = result.value("interfaces", json::array());
  std::optional<size_t> sandbox;
  for (size_t i = 0; i < interfaces.size(); ++i) {
    const auto& itf = interfaces[i];
    if (!itf.is_object()) continue;
    const std::string name = itf.value("name", "");
    if (!itf.value("sandbox", std::string()).empty()) {
      if (name == kIfName) sandbox = i;
    } else if (name != bridge && !name.empty()) {
      a.host_interface = name;
    }
  }
  for (const auto& ip : result.value("ips", json::array())) {
    if (!ip.is_object()) continue;
    const std::string address = ip.value("address", "");
    if (address.find(':') != std::string::npos || address.find('/') == std::string::npos) continue;
    if (sandbox && ip.contains("interface") && ip["interface"].is_number_integer() &&
        ip["interface"].get<int64_t>() != static_cast<int64_t>(*sandbox)) {
      continue;
    }
    a.address = address;
    a.ip = address.substr(0, address.find('/'));
    a.gateway = ip.value("gateway", "");
    break;
  }
  if (a.ip.empty()) {
    return make_error(ErrorDomain::kInvalid, "CNI result has no IPv4 address for " +
                                                 std::string(kIfName) + ": " + result.dump());
  }
  return a;
}

std::string cni_error_text(std::string_view output, std::string_view fallback) {
  const auto j = json::parse(output, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("msg") && j["msg"].is_string()) {
    std::string text = j["msg"];
    if (j.contains("details") && j["details"].is_string() &&
        !j["details"].get<std::string>().empty()) {
      text += " (" + j["details"].get<std::string>() + ")";
    }
    return text;
  }
  return std::string(fallback);
}

bool is_loopback_address(std::string_view address) {
  std::string a(address);
  if (auto pct = a.find('%'); pct != std::string::npos) a.resize(pct);  // fe80::1%eth0
  in_addr v4{};
  if (::inet_pton(AF_INET, a.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (::inet_pton(AF_INET6, a.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    if (IN6_IS_ADDR_V4MAPPED(&v6)) return v6.s6_addr[12] == 127;
  }
  return false;
}

std::string resolv_conf(std::string_view host_resolv, const std::vector<std::string>& nameservers,
                        const std::vector<std::string>& search, std::vector<std::string>* dropped) {
  std::vector<std::string> servers;
  std::vector<std::string> domains;
  std::vector<std::string> options;
  for (std::string_view line : detail::trimmed_lines(host_resolv)) {
    if (line.empty() || line[0] == '#' || line[0] == ';') continue;
    std::istringstream in{std::string(line)};
    std::string key;
    in >> key;
    std::vector<std::string> words;
    for (std::string w; in >> w;) words.push_back(w);
    if (key == "nameserver" && !words.empty()) {
      if (is_loopback_address(words[0])) {
        if (dropped) dropped->push_back(words[0]);
      } else {
        servers.push_back(words[0]);
      }
    } else if (key == "search" || key == "domain") {
      domains = words;  // the last one wins, as in resolv.conf(5)
    } else if (key == "options") {
      options.insert(options.end(), words.begin(), words.end());
    }
  }
  if (!nameservers.empty()) servers = nameservers;
  if (!search.empty()) domains = search;
  std::string out = "# The workspace's resolver, written by cvm-node-agent at each start.\n";
  for (const auto& s : servers) out += "nameserver " + s + "\n";
  if (!domains.empty()) {
    out += "search";
    for (const auto& d : domains) out += " " + d;
    out += "\n";
  }
  if (!options.empty()) {
    out += "options";
    for (const auto& o : options) out += " " + o;
    out += "\n";
  }
  return out;
}

std::vector<GuardRule> host_guard_rules(std::string_view bridge) {
  const std::string chain(kIsolateChain);
  const std::string br(bridge);
  const auto rule = [&](std::vector<std::string> spec) {
    GuardRule r;
    r.check = {"-C"};
    r.insert = {"-A"};
    r.check.insert(r.check.end(), spec.begin(), spec.end());
    r.insert.insert(r.insert.end(), spec.begin(), spec.end());
    return r;
  };
  std::vector<GuardRule> rules;
  // Replies to connections the node opened (the agent probing, a user's port forward) pass.
  rules.push_back(
      rule({chain, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"}));
  rules.push_back(rule({chain, "-j", "DROP"}));
  // First in INPUT, ahead of any ACCEPT the node's own firewall has.
  GuardRule jump;
  jump.check = {"-C", "INPUT", "-i", br, "-j", chain};
  jump.insert = {"-I", "INPUT", "1", "-i", br, "-j", chain};
  rules.push_back(jump);
  return rules;
}

WorkspaceNetwork::WorkspaceNetwork(NetworkConfig config)
    : config_(std::move(config)),
      conflist_(cni_conflist(config_)),
      ready_(make_error(ErrorDomain::kInvalid, "the workspace network is not prepared")) {}

Status WorkspaceNetwork::prepare() {
  ready_ = [&]() -> Status {
    if (!config_.enabled) return make_error(ErrorDomain::kInvalid, "the workspace network is off");
    for (const auto& p : conflist_["plugins"]) {
      const std::string bin = config_.cni_bin_dir + "/" + p["type"].get<std::string>();
      if (::access(bin.c_str(), X_OK) != 0) {
        return make_error(
            ErrorDomain::kNotFound,
            "CNI plugin " + bin + " is missing (install containernetworking-plugins)");
      }
    }
    std::error_code ec;
    fs::create_directories(config_.state_dir + "/netns", ec);
    if (ec) {
      return make_error(ErrorDomain::kSystem,
                        "cannot create " + config_.state_dir + "/netns: " + ec.message());
    }
    // The chain: made if missing, its rules added if missing (-C first), so a restarted agent or
    // a second agent on the node adds nothing twice.
    if (auto r =
            run_process({config_.iptables, "-w", "-t", "filter", "-S", std::string(kIsolateChain)});
        !r) {
      return make_error(r.error().domain, config_.iptables + ": " + r.error().message);
    } else if (!r->success()) {
      if (auto made =
              run_tool({config_.iptables, "-w", "-t", "filter", "-N", std::string(kIsolateChain)});
          !made) {
        return made.error();
      }
    }
    for (const auto& rule : host_guard_rules(config_.bridge)) {
      std::vector<std::string> check = {config_.iptables, "-w", "-t", "filter"};
      check.insert(check.end(), rule.check.begin(), rule.check.end());
      auto present = run_process(check);
      if (present && present->success()) continue;
      std::vector<std::string> add = {config_.iptables, "-w", "-t", "filter"};
      add.insert(add.end(), rule.insert.begin(), rule.insert.end());
      if (auto st = run_tool(add); !st) return st.error();
    }
    return {};
  }();
  return ready_;
}

std::string WorkspaceNetwork::record_path(const std::string& workspace_id) const {
  return config_.state_dir + "/" + workspace_id + ".json";
}

std::string WorkspaceNetwork::pin_path(const std::string& workspace_id) const {
  return config_.state_dir + "/netns/" + workspace_id;
}

Result<json> WorkspaceNetwork::run_plugin(const std::string& command,
                                          const std::string& workspace_id, const std::string& netns,
                                          const json& config) const {
  const std::string type = config.value("type", "");
  const std::string stdin_path = config_.state_dir + "/" + workspace_id + "." + type + ".in";
  if (auto st = write_atomically(stdin_path, config.dump()); !st) return st.error();
  ProcessOptions options;
  options.stdin_file = stdin_path;
  options.timeout = std::chrono::seconds(30);
  options.env = {"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + cni_container_id(workspace_id),
                 "CNI_NETNS=" + netns, "CNI_IFNAME=" + std::string(kIfName),
                 "CNI_PATH=" + config_.cni_bin_dir};
  auto r = run_process({config_.cni_bin_dir + "/" + type}, options);
  ::unlink(stdin_path.c_str());
  if (!r)
    return make_error(r.error().domain, "CNI " + type + " " + command + ": " + r.error().message);
  if (!r->success()) {
    return make_error(ErrorDomain::kTool,
                      "CNI " + type + " " + command + ": " +
                          cni_error_text(r->out, tool_error_text(r->err.empty() ? r->out : r->err)),
                      r->exit_code);
  }
  if (command == "DEL") return json();
  auto j = json::parse(r->out, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    return make_error(ErrorDomain::kTool, "CNI " + type + " " + command + ": output is not JSON");
  }
  return j;
}

Status WorkspaceNetwork::run_del(const std::string& workspace_id, const std::string& netns,
                                 const json& prev_result) const {
  // Every plugin's DEL runs, last first, even when one fails: each removes what it can.
  Status first_error;
  for (size_t i = conflist_["plugins"].size(); i-- > 0;) {
    auto config = plugin_config(conflist_, i, prev_result);
    if (!config) return config.error();
    if (auto r = run_plugin("DEL", workspace_id, netns, *config); !r && first_error) {
      first_error = r.error();
    }
  }
  return first_error;
}

Result<Attachment> WorkspaceNetwork::attach(const std::string& workspace_id,
                                            const std::string& netns_path) {
  if (!ready_) return ready_.error();
  if (auto st = detach(workspace_id); !st) return st.error();  // a leftover of an earlier life
  // Pinned: the namespace lives until detach, whatever the container does meanwhile.
  const std::string pin = pin_path(workspace_id);
  {
    detail::Fd f(::open(pin.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0444));
    if (f.get() < 0)
      return make_error(ErrorDomain::kSystem, "create " + pin + ": " + std::strerror(errno));
  }
  if (::mount(netns_path.c_str(), pin.c_str(), nullptr, MS_BIND, nullptr) != 0) {
    const int e = errno;
    ::unlink(pin.c_str());
    return make_error(ErrorDomain::kSystem,
                      "bind " + netns_path + " to " + pin + ": " + std::strerror(e));
  }
  // The record first (no result yet): a crash mid-chain still leaves something to undo.
  json record = {{"workspace", workspace_id}, {"netns", pin}, {"result", nullptr}};
  if (auto st = write_atomically(record_path(workspace_id), record.dump()); !st) {
    ::umount2(pin.c_str(), MNT_DETACH);
    ::unlink(pin.c_str());
    return st.error();
  }
  json prev;
  for (size_t i = 0; i < conflist_["plugins"].size(); ++i) {
    auto config = plugin_config(conflist_, i, prev);
    Result<json> r =
        config ? run_plugin("ADD", workspace_id, pin, *config) : Result<json>(config.error());
    if (!r) {
      (void)detach(workspace_id);
      return r.error();
    }
    prev = std::move(*r);
  }
  auto a = parse_cni_result(prev, config_.bridge);
  if (!a) {
    (void)detach(workspace_id);
    return a.error();
  }
  a->workspace_id = workspace_id;
  a->netns = pin;
  record["result"] = prev;
  if (auto st = write_atomically(record_path(workspace_id), record.dump()); !st) {
    (void)detach(workspace_id);
    return st.error();
  }
  if (!config_.workspace_to_workspace && !a->host_interface.empty()) {
    // The bridge forwards nothing between two isolated ports.
    if (auto r = run_tool({config_.ip, "link", "set", "dev", a->host_interface, "type",
                           "bridge_slave", "isolated", "on"});
        !r) {
      (void)detach(workspace_id);
      return make_error(r.error().domain,
                        "isolating the workspace's bridge port: " + r.error().message);
    }
  }
  return a;
}

std::optional<Attachment> WorkspaceNetwork::find(const std::string& workspace_id) const {
  auto text = detail::read_file(record_path(workspace_id), 1 << 20);
  if (!text) return std::nullopt;
  const auto record = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!record.is_object()) return std::nullopt;
  Attachment a;
  if (record.contains("result") && record["result"].is_object()) {
    if (auto parsed = parse_cni_result(record["result"], config_.bridge)) a = std::move(*parsed);
  }
  a.workspace_id = workspace_id;
  a.netns = record.value("netns", "");
  return a;
}

Status WorkspaceNetwork::detach(const std::string& workspace_id) {
  const std::string record_file = record_path(workspace_id);
  const std::string pin = pin_path(workspace_id);
  std::error_code ec;
  const bool recorded = fs::exists(record_file, ec);
  const bool pinned = fs::exists(pin, ec);
  if (!recorded && !pinned) return {};
  json prev;
  if (auto text = detail::read_file(record_file, 1 << 20)) {
    const auto record = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (record.is_object() && record.contains("result")) prev = record["result"];
  }
  // The pin is a namespace only while mounted (not after a node reboot): DEL then runs without
  // one, which still releases the address.
  struct stat pin_st {};
  struct stat dir_st {};
  const bool mounted = pinned && ::stat(pin.c_str(), &pin_st) == 0 &&
                       ::stat((config_.state_dir + "/netns").c_str(), &dir_st) == 0 &&
                       pin_st.st_dev != dir_st.st_dev;
  Status st = run_del(workspace_id, mounted ? pin : std::string(), prev);
  if (!st) return st;  // kept on record: the next detach tries again
  if (pinned) {
    if (mounted && ::umount2(pin.c_str(), MNT_DETACH) != 0 && errno != EINVAL) {
      return make_error(ErrorDomain::kSystem, "umount " + pin + ": " + std::strerror(errno));
    }
    ::unlink(pin.c_str());
  }
  ::unlink(record_file.c_str());
  return {};
}

std::vector<std::string> WorkspaceNetwork::attached() const {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(config_.state_dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    const auto p = it->path();
    if (p.extension() == ".json") out.push_back(p.stem().string());
  }
  for (fs::directory_iterator it(config_.state_dir + "/netns", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string ws = it->path().filename().string();
    if (std::find(out.begin(), out.end(), ws) == out.end()) out.push_back(ws);
  }
  return out;
}

std::string WorkspaceNetwork::workspace_resolv_conf() const {
  const std::string host = detail::read_file(config_.host_resolv_conf, 64 * 1024).value_or("");
  return resolv_conf(host, config_.nameservers, config_.search);
}

}  // namespace cvm::agent
