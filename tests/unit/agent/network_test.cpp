#include "cvm/agent/network.h"

#include <gtest/gtest.h>

namespace cvm::agent {
namespace {

using nlohmann::json;

NetworkConfig config() {
  NetworkConfig c;
  c.enabled = true;
  c.state_dir = "/var/lib/cvm/network";
  return c;
}

TEST(CniConflist, BridgeWithNatAndHostLocalThenFirewall) {
  const json l = cni_conflist(config());
  EXPECT_EQ(l["cniVersion"], "1.0.0");
  EXPECT_EQ(l["name"], "cvm");
  ASSERT_EQ(l["plugins"].size(), 2u);
  const json& b = l["plugins"][0];
  EXPECT_EQ(b["type"], "bridge");
  EXPECT_EQ(b["bridge"], "cvm0");
  EXPECT_EQ(b["isGateway"], true);
  EXPECT_EQ(b["ipMasq"], true);
  EXPECT_EQ(b["ipam"]["type"], "host-local");
  EXPECT_EQ(b["ipam"]["ranges"][0][0]["subnet"], "10.88.0.0/16");
  EXPECT_EQ(b["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
  EXPECT_EQ(b["ipam"]["dataDir"], "/var/lib/cvm/network/ipam");
  EXPECT_EQ(l["plugins"][1]["type"], "firewall");
  EXPECT_EQ(l["plugins"][1]["backend"], "iptables");
}

TEST(CniConflist, FollowsTheConfig) {
  NetworkConfig c = config();
  c.name = "lab";
  c.bridge = "lab0";
  c.subnet = "172.30.0.0/20";
  const json l = cni_conflist(c);
  EXPECT_EQ(l["name"], "lab");
  EXPECT_EQ(l["plugins"][0]["bridge"], "lab0");
  EXPECT_EQ(l["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "172.30.0.0/20");
}

TEST(PluginConfig, AddsVersionNameAndPrevResult) {
  const json l = cni_conflist(config());
  auto first = plugin_config(l, 0, json());
  ASSERT_TRUE(first.ok());
  EXPECT_EQ((*first)["cniVersion"], "1.0.0");
  EXPECT_EQ((*first)["name"], "cvm");
  EXPECT_FALSE(first->contains("prevResult"));
  const json prev = {{"cniVersion", "1.0.0"}, {"ips", json::array()}};
  auto second = plugin_config(l, 1, prev);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ((*second)["type"], "firewall");
  EXPECT_EQ((*second)["prevResult"], prev);
}

TEST(PluginConfig, OutOfRangeOrTypelessIsInvalid) {
  const json l = cni_conflist(config());
  EXPECT_FALSE(plugin_config(l, 2, json()).ok());
  EXPECT_FALSE(plugin_config(json::object(), 0, json()).ok());
  EXPECT_FALSE(plugin_config({{"plugins", json::array({json::object()})}}, 0, json()).ok());
}

// The bridge plugin's output as containernetworking-plugins 1.1.1 prints it.
const char* kBridgeResult = R"({
  "cniVersion": "1.0.0",
  "interfaces": [
    {"name": "cvm0", "mac": "5a:13:11:eb:86:d5"},
    {"name": "veth06d24586", "mac": "9a:30:24:78:89:7f"},
    {"name": "eth0", "mac": "8e:a9:43:44:47:c7", "sandbox": "/var/lib/cvm/network/netns/w1"}
  ],
  "ips": [{"interface": 2, "address": "10.88.0.2/16", "gateway": "10.88.0.1"}],
  "routes": [{"dst": "0.0.0.0/0"}],
  "dns": {}
})";

TEST(ParseCniResult, AddressGatewayAndHostEnd) {
  auto a = parse_cni_result(json::parse(kBridgeResult), "cvm0");
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_EQ(a->address, "10.88.0.2/16");
  EXPECT_EQ(a->ip, "10.88.0.2");
  EXPECT_EQ(a->gateway, "10.88.0.1");
  EXPECT_EQ(a->host_interface, "veth06d24586");
  EXPECT_EQ(a->result, json::parse(kBridgeResult));
}

TEST(ParseCniResult, SkipsIpv6AndOtherInterfaces) {
  json r = json::parse(kBridgeResult);
  r["ips"] = json::array({{{"interface", 2}, {"address", "fd00::2/64"}},
                          {{"interface", 0}, {"address", "10.88.0.1/16"}},
                          {{"interface", 2}, {"address", "10.88.0.9/16"}, {"gateway", "10.88.0.1"}}});
  auto a = parse_cni_result(r, "cvm0");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->ip, "10.88.0.9");
}

TEST(ParseCniResult, NoAddressIsInvalid) {
  json r = json::parse(kBridgeResult);
  r["ips"] = json::array();
  auto a = parse_cni_result(r, "cvm0");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().domain, ErrorDomain::kInvalid);
  EXPECT_FALSE(parse_cni_result(json::array(), "cvm0").ok());
  EXPECT_FALSE(parse_cni_result(json::parse(R"({"ips":[{"address":"10.0.0.1"}]})"), "b").ok());
}

TEST(CniErrorText, MessageAndDetails) {
  EXPECT_EQ(cni_error_text(R"({"code":7,"msg":"failed to allocate","details":"range full"})", "x"),
            "failed to allocate (range full)");
  EXPECT_EQ(cni_error_text(R"({"code":7,"msg":"no netns"})", "x"), "no netns");
  EXPECT_EQ(cni_error_text("not json", "fallback"), "fallback");
  EXPECT_EQ(cni_error_text("", "fallback"), "fallback");
}

TEST(Loopback, V4V6AndMapped) {
  EXPECT_TRUE(is_loopback_address("127.0.0.1"));
  EXPECT_TRUE(is_loopback_address("127.0.0.53"));
  EXPECT_TRUE(is_loopback_address("::1"));
  EXPECT_TRUE(is_loopback_address("::ffff:127.0.0.1"));
  EXPECT_FALSE(is_loopback_address("10.255.255.53"));
  EXPECT_FALSE(is_loopback_address("fe80::1%eth0"));
  EXPECT_FALSE(is_loopback_address("not-an-address"));
}

TEST(ResolvConf, DropsLoopbackKeepsSearchAndOptions) {
  std::vector<std::string> dropped;
  const std::string host =
      "# comment\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nsearch a.example b.example\n"
      "options edns0 trust-ad\n";
  const std::string out = resolv_conf(host, {}, {}, &dropped);
  EXPECT_NE(out.find("nameserver 10.1.2.3\n"), std::string::npos) << out;
  EXPECT_EQ(out.find("127.0.0.53"), std::string::npos) << out;
  EXPECT_NE(out.find("search a.example b.example\n"), std::string::npos);
  EXPECT_NE(out.find("options edns0 trust-ad\n"), std::string::npos);
  EXPECT_EQ(dropped, std::vector<std::string>{"127.0.0.53"});
}

TEST(ResolvConf, ConfiguredServersAndSearchReplaceTheHosts) {
  const std::string out =
      resolv_conf("nameserver 10.1.2.3\nsearch corp\n", {"10.250.0.2", "10.250.0.3"}, {"test"});
  EXPECT_EQ(out.find("10.1.2.3"), std::string::npos);
  EXPECT_NE(out.find("nameserver 10.250.0.2\nnameserver 10.250.0.3\n"), std::string::npos);
  EXPECT_NE(out.find("search test\n"), std::string::npos);
  EXPECT_EQ(out.find("corp"), std::string::npos);
}

TEST(ResolvConf, OnlyLoopbackOnTheHostLeavesNoServer) {
  const std::string out = resolv_conf("nameserver 127.0.0.53\n", {}, {});
  EXPECT_EQ(out.find("nameserver"), std::string::npos) << out;
}

TEST(GuardRules, RepliesPassNewConnectionsToTheNodeDrop) {
  const auto rules = host_guard_rules("cvm0");
  ASSERT_EQ(rules.size(), 3u);
  EXPECT_EQ(rules[0].insert, (std::vector<std::string>{"-A", "CVM-ISOLATE", "-m", "conntrack",
                                                       "--ctstate", "ESTABLISHED,RELATED", "-j",
                                                       "ACCEPT"}));
  EXPECT_EQ(rules[1].insert, (std::vector<std::string>{"-A", "CVM-ISOLATE", "-j", "DROP"}));
  EXPECT_EQ(rules[1].check, (std::vector<std::string>{"-C", "CVM-ISOLATE", "-j", "DROP"}));
  // The jump is first in INPUT, for the bridge only.
  EXPECT_EQ(rules[2].insert,
            (std::vector<std::string>{"-I", "INPUT", "1", "-i", "cvm0", "-j", "CVM-ISOLATE"}));
  EXPECT_EQ(rules[2].check,
            (std::vector<std::string>{"-C", "INPUT", "-i", "cvm0", "-j", "CVM-ISOLATE"}));
}

TEST(WorkspaceNetwork, MissingPluginsSayWhatToInstallAndAttachRefuses) {
  NetworkConfig c = config();
  c.cni_bin_dir = "/nonexistent/cni";
  c.state_dir = "/nonexistent/state";
  WorkspaceNetwork network(c);
  EXPECT_FALSE(network.ready().ok());
  const Status st = network.prepare();
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(st.error().is_not_found());
  EXPECT_NE(st.error().message.find("containernetworking-plugins"), std::string::npos);
  auto a = network.attach("w1", "/proc/self/ns/net");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().message, st.error().message);
  // Nothing attached: detach is success, nothing listed.
  EXPECT_TRUE(network.detach("w1").ok());
  EXPECT_TRUE(network.attached().empty());
}

TEST(WorkspaceNetwork, TurnedOffIsNotReady) {
  NetworkConfig c = config();
  c.enabled = false;
  WorkspaceNetwork network(c);
  EXPECT_FALSE(network.prepare().ok());
}

}  // namespace
}  // namespace cvm::agent
