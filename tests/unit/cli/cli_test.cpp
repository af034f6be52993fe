#include <gtest/gtest.h>

#include "cvm/base/wire.h"
#include "cvm/cli/commands.h"
#include "cvm/cli/quantity.h"

namespace cvm::cli {
namespace {

TEST(Quantity, Bytes) {
  EXPECT_EQ(*parse_bytes("1024"), 1024u);
  EXPECT_EQ(*parse_bytes("512Mi"), 512ULL << 20);
  EXPECT_EQ(*parse_bytes("2Gi"), 2ULL << 30);
  EXPECT_EQ(*parse_bytes("1.5Gi"), 3ULL << 29);
  EXPECT_EQ(*parse_bytes("1G"), 1000000000u);
  EXPECT_EQ(*parse_bytes("100Ti"), 100ULL << 40);
  for (const char* bad : {"", "Mi", "-1", "1e9", "12MB", "1..2", "abc", "1 Gi"}) {
    EXPECT_FALSE(parse_bytes(bad).ok()) << bad;
  }
}

TEST(Quantity, Cpu) {
  EXPECT_EQ(*parse_cpu("1"), 1000u);
  EXPECT_EQ(*parse_cpu("1.5"), 1500u);
  EXPECT_EQ(*parse_cpu("250m"), 250u);
  for (const char* bad : {"", "m", "1.5m", "-1", "x"}) EXPECT_FALSE(parse_cpu(bad).ok()) << bad;
}

TEST(Watch, TerminalPhasesDependOnTheTransition) {
  EXPECT_TRUE(ends_build(cvm::v1::START, cvm::v1::RUNNING));
  EXPECT_FALSE(ends_build(cvm::v1::START, cvm::v1::STOPPED));
  EXPECT_TRUE(ends_build(cvm::v1::STOP, cvm::v1::STOPPED));
  EXPECT_FALSE(ends_build(cvm::v1::STOP, cvm::v1::RUNNING));
  EXPECT_TRUE(ends_build(cvm::v1::DELETE, cvm::v1::STOPPED));
  for (auto t : {cvm::v1::START, cvm::v1::STOP, cvm::v1::DELETE}) {
    EXPECT_TRUE(ends_build(t, cvm::v1::FAILED));
    EXPECT_FALSE(ends_build(t, cvm::v1::SCHEDULED));
  }
}

TEST(Watch, EventLinesShowPhaseNodeReasonAndWarnings) {
  cvm::v1::BuildEvent e;
  e.set_build_id("b1");
  e.set_phase(cvm::v1::FAILED);
  e.set_node_id("n1");
  e.set_reason(cvm::v1::NO_ELIGIBLE_NODE);
  e.set_message("0/1 nodes fit: 1 SELinux enforcing");
  e.add_warnings("files under /tmp");
  e.set_timestamp_unix_ms(3723004);  // 01:02:03.004 UTC
  EXPECT_EQ(format_event_line(e),
            "01:02:03.004  b1  FAILED  node=n1  reason=NO_ELIGIBLE_NODE  0/1 nodes fit: 1 SELinux "
            "enforcing\n    warning: files under /tmp");
}

TEST(BuildIds, AreValidAndDistinct) {
  const auto a = new_build_id();
  const auto b = new_build_id();
  EXPECT_TRUE(wire::is_valid_id(a)) << a;
  EXPECT_NE(a, b);
}

TEST(Nodes, TableListsEachNode) {
  cvm::v1::NodeStatus n;
  n.set_node_id("node-a");
  n.mutable_host()->set_kernel_version("6.1.0");
  n.mutable_runtime()->set_runtime("runc");
  n.mutable_runtime()->set_ready(true);
  n.mutable_capacity()->set_cpu_millicores(2000);
  n.mutable_capacity()->set_memory_bytes(4ULL << 30);
  n.set_heartbeat_unix_ms(1000);
  const auto table = format_nodes_table({n}, 3500);
  EXPECT_NE(table.find("node-a"), std::string::npos);
  EXPECT_NE(table.find("0/2000m"), std::string::npos);
  EXPECT_NE(table.find("2.5s ago"), std::string::npos);
}

}  // namespace
}  // namespace cvm::cli
