#pragma once
// A CVM's network: one interface (eth0) in the inner container's network namespace, given by the
// standard CNI plugins (Debian's containernetworking-plugins), with NAT out through the node.
//
//   node bridge cvm0 (gateway, 10.88.0.1) --veth-- eth0 of the workspace (10.88.x.y/16)
//
// The chain is `bridge` (isGateway, ipMasq, host-local IPAM) then `firewall` (lets the bridge's
// traffic through a FORWARD policy of DROP). The agent runs it between the inner runtime's
// `create` and `start`, so the workspace's init never sees a machine without its network, and
// pins the namespace (a bind mount of its nsfs file) until DEL: the bridge plugin removes its NAT
// rules only while it can still look at the interface's addresses.
//
// Isolation, on top of what CNI does:
//   - each workspace's bridge port is `isolated`: frames between two isolated ports are dropped by
//     the bridge, so workspaces on one node do not reach each other (unless the admin allows it);
//   - chain CVM-ISOLATE, jumped to first from INPUT for packets arriving on the bridge, drops
//     every new connection from a workspace to the node itself (NATS, the agent, sshd, any address
//     of the node): only replies to connections the node opened pass.
//
// Pure parts (configs, result parsing, resolv.conf, rules) are free functions; WorkspaceNetwork
// runs the plugins and iptables.
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cvm/base/result.h"

namespace cvm::agent {

struct NetworkConfig {
  bool enabled = false;
  std::string name = "cvm";  // the CNI network name (host-local's store, NAT chain comments)
  std::string bridge = "cvm0";
  std::string subnet = "10.88.0.0/16";
  std::string cni_bin_dir = "/usr/lib/cni";
  // Attachments (one JSON file per workspace), pinned namespaces, host-local's address store.
  std::string state_dir;
  // Admin setting: let workspaces on this node reach each other (bridge ports not isolated).
  bool workspace_to_workspace = false;
  // The workspace's DNS servers; empty: the node's own, less loopback ones (a 127.0.0.53 stub
  // resolver is the node's, not reachable from a workspace).
  std::vector<std::string> nameservers;
  std::vector<std::string> search;
  std::string host_resolv_conf = "/etc/resolv.conf";
  std::string iptables = "iptables";
  std::string ip = "ip";
};

// The CNI network configuration list (cniVersion 1.0.0).
[[nodiscard]] nlohmann::json cni_conflist(const NetworkConfig& config);

// The stdin of plugin `index` of `conflist`: its own object plus the list's cniVersion and name,
// and `prev_result` (null for the first plugin of an ADD).
[[nodiscard]] Result<nlohmann::json> plugin_config(const nlohmann::json& conflist, size_t index,
                                                   const nlohmann::json& prev_result);

// What a workspace got: parsed from the chain's final result.
struct Attachment {
  std::string workspace_id;
  std::string address;         // CIDR, e.g. 10.88.0.5/16
  std::string ip;              // 10.88.0.5
  std::string gateway;         // 10.88.0.1
  std::string host_interface;  // the veth's node end
  std::string netns;           // the pinned namespace's path
  nlohmann::json result;       // the chain's result (prevResult for DEL)
};

// kInvalid when the result has no IPv4 address on the sandbox's interface. `bridge` tells the
// bridge's own entry from the veth's node end.
[[nodiscard]] Result<Attachment> parse_cni_result(const nlohmann::json& result,
                                                  std::string_view bridge);

// A CNI error object's text ({"code":N,"msg":...,"details":...}); `fallback` when it is not one.
[[nodiscard]] std::string cni_error_text(std::string_view output, std::string_view fallback);

// The workspace's /etc/resolv.conf: `nameservers` (or the host's non-loopback ones), `search`
// (or the host's), the host's options. `dropped` gets the loopback servers left out.
[[nodiscard]] std::string resolv_conf(std::string_view host_resolv,
                                      const std::vector<std::string>& nameservers,
                                      const std::vector<std::string>& search,
                                      std::vector<std::string>* dropped = nullptr);

// Whether `address` is an IPv4 or IPv6 loopback address.
[[nodiscard]] bool is_loopback_address(std::string_view address);

inline constexpr std::string_view kIsolateChain = "CVM-ISOLATE";

// iptables argument lists (after the table) that make chain CVM-ISOLATE: accept replies, drop the
// rest; `-C` forms are checked first, so applying them twice adds nothing.
struct GuardRule {
  std::vector<std::string> check;   // iptables -C ... (exit 0: present)
  std::vector<std::string> insert;  // what adds it
};
[[nodiscard]] std::vector<GuardRule> host_guard_rules(std::string_view bridge);

class WorkspaceNetwork {
 public:
  explicit WorkspaceNetwork(NetworkConfig config);

  // Checks the plugins and tools, creates the state dir, installs the guard rules. Until it has
  // succeeded, attach fails with its error.
  Status prepare();
  [[nodiscard]] const Status& ready() const { return ready_; }
  [[nodiscard]] const NetworkConfig& config() const { return config_; }

  // Gives the namespace of `netns_path` (e.g. /proc/<pid>/ns/net) its interface. On failure
  // nothing is left (the chain is undone).
  Result<Attachment> attach(const std::string& workspace_id, const std::string& netns_path);
  // Undoes attach: the chain's DEL, the pin. Idempotent; a workspace never attached is success.
  Status detach(const std::string& workspace_id);
  // Workspaces with an attachment on record (for a restarted agent's cleanup).
  [[nodiscard]] std::vector<std::string> attached() const;
  [[nodiscard]] std::optional<Attachment> find(const std::string& workspace_id) const;

  // The workspace's /etc/resolv.conf content, from the config and the node's file.
  [[nodiscard]] std::string workspace_resolv_conf() const;

 private:
  Result<nlohmann::json> run_plugin(const std::string& command, const std::string& workspace_id,
                                    const std::string& netns, const nlohmann::json& config) const;
  Status run_del(const std::string& workspace_id, const std::string& netns,
                 const nlohmann::json& prev_result) const;
  [[nodiscard]] std::string record_path(const std::string& workspace_id) const;
  [[nodiscard]] std::string pin_path(const std::string& workspace_id) const;

  NetworkConfig config_;
  nlohmann::json conflist_;
  Status ready_;
};

}  // namespace cvm::agent
