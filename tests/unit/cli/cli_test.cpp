#include <gtest/gtest.h>

#include <sstream>

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

TEST(Watch, UnknownTransitionEndsOnAnyFinalPhase) {
  for (auto p : {cvm::v1::RUNNING, cvm::v1::STOPPED, cvm::v1::FAILED}) {
    EXPECT_TRUE(ends_build(cvm::v1::TRANSITION_UNSPECIFIED, p));
  }
  for (auto p : {cvm::v1::PENDING, cvm::v1::SCHEDULED, cvm::v1::PREPARING, cvm::v1::STARTING,
                 cvm::v1::STOPPING, cvm::v1::PHASE_UNSPECIFIED}) {
    EXPECT_FALSE(ends_build(cvm::v1::TRANSITION_UNSPECIFIED, p));
  }
}

cvm::v1::BuildEvent event(cvm::v1::Phase phase, const std::string& node = "n1") {
  cvm::v1::BuildEvent e;
  e.set_build_id("b1");
  e.set_phase(phase);
  e.set_node_id(node);
  return e;
}

TEST(Watch, FollowsPhasesAndEndsWithTheRightExitCode) {
  BuildWatch w(cvm::v1::START, 1000);
  EXPECT_EQ(w.status_line(1500, true),
            "SUBMITTED  0.5s in phase, 0.5s total  waiting for cvm-scheduler to take the request");
  EXPECT_NE(w.status_line(1500, false).find("none is fetching"), std::string::npos);
  EXPECT_FALSE(w.on_event(event(cvm::v1::SCHEDULED), 2000));
  EXPECT_FALSE(w.on_event(event(cvm::v1::PREPARING), 3000));
  EXPECT_EQ(w.status_line(4500, true),
            "PREPARING  1.5s in phase, 3.5s total  node n1 is preparing the image and the "
            "workspace's files");
  EXPECT_FALSE(w.done());
  EXPECT_TRUE(w.on_event(event(cvm::v1::RUNNING), 5000));
  EXPECT_TRUE(w.done());
  EXPECT_EQ(w.exit_code(), 0);
  EXPECT_EQ(w.events(), 3);
  // A later notice (the node was lost) updates the view but cannot end the watch twice.
  EXPECT_FALSE(w.on_event(event(cvm::v1::FAILED), 6000));
  EXPECT_EQ(w.exit_code(), 0);

  BuildWatch f(cvm::v1::STOP, 0);
  EXPECT_TRUE(f.on_event(event(cvm::v1::FAILED, ""), 10));
  EXPECT_EQ(f.exit_code(), 1);
}

TEST(Watch, SaysWhatEachPhaseWaitsOn) {
  EXPECT_NE(waiting_on(cvm::v1::SCHEDULED, "n7", true).find("node agent on node n7"),
            std::string::npos);
  EXPECT_NE(waiting_on(cvm::v1::STARTING, "", true).find("the node"), std::string::npos);
  EXPECT_NE(waiting_on(cvm::v1::STOPPING, "n1", true).find("stopping"), std::string::npos);
  EXPECT_NE(waiting_on(cvm::v1::PENDING, "", true).find("room"), std::string::npos);
  // Every phase has words.
  for (int p = cvm::v1::Phase_MIN; p <= cvm::v1::Phase_MAX; ++p) {
    if (!cvm::v1::Phase_IsValid(p)) continue;
    EXPECT_FALSE(waiting_on(static_cast<cvm::v1::Phase>(p), "n", true).empty()) << p;
  }
}

TEST(Watch, DurationsReadWell) {
  EXPECT_EQ(format_duration(-5), "0.0s");
  EXPECT_EQ(format_duration(1234), "1.2s");
  EXPECT_EQ(format_duration(123'000), "2m03s");
  EXPECT_EQ(format_duration(3'720'000), "1h02m");
}

// The line of `text` that starts with `key`, blanks squeezed to one.
std::string line_of(const std::string& text, const std::string& key) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + " ", 0) != 0) continue;
    std::string out;
    for (char c : line) {
      if (c != ' ' || out.empty() || out.back() != ' ') out += c;
    }
    return out;
  }
  return "";
}

TEST(Settings, DefaultsWhenNothingIsStored) {
  const auto eff = effective_settings(nullptr);
  EXPECT_TRUE(eff.cvm_enabled());
  EXPECT_TRUE(eff.default_to_cvm());
  EXPECT_FALSE(eff.caching());
  EXPECT_FALSE(eff.auto_load_shiftfs());
  const auto text = format_settings(nullptr);
  EXPECT_EQ(line_of(text, "cvm_enabled"), "cvm_enabled = true (default)") << text;
  EXPECT_EQ(line_of(text, "caching"), "caching = false (default)") << text;
  const auto json = settings_json(nullptr);
  EXPECT_NE(json.find("\"stored\":false"), std::string::npos) << json;
  EXPECT_NE(json.find("\"cvm_enabled\":true"), std::string::npos) << json;
  EXPECT_NE(json.find("\"caching\":false"), std::string::npos) << json;
}

TEST(Settings, StoredValuesWinAndAreNotMarkedDefault) {
  cvm::v1::InfrastructureSettings s;
  s.set_cvm_enabled(false);
  s.set_caching(true);
  const auto eff = effective_settings(&s);
  EXPECT_FALSE(eff.cvm_enabled());
  EXPECT_TRUE(eff.default_to_cvm());
  const auto text = format_settings(&s);
  EXPECT_EQ(line_of(text, "cvm_enabled"), "cvm_enabled = false") << text;
  EXPECT_EQ(line_of(text, "default_to_cvm"), "default_to_cvm = true (default)") << text;
  EXPECT_EQ(line_of(text, "caching"), "caching = true") << text;
}

TEST(Settings, ApplyTakesNamesValuesAndSpellingsAdminsUse) {
  cvm::v1::InfrastructureSettings s;
  EXPECT_TRUE(apply_setting(s, "caching", "on").ok());
  EXPECT_TRUE(s.caching());
  EXPECT_TRUE(apply_setting(s, "auto-load-shiftfs", "YES").ok());
  EXPECT_TRUE(s.auto_load_shiftfs());
  EXPECT_TRUE(apply_setting(s, "cvm_enabled", "false").ok());
  ASSERT_TRUE(s.has_cvm_enabled()) << "an explicit false must be stored, not read as default";
  EXPECT_FALSE(s.cvm_enabled());
  EXPECT_TRUE(apply_setting(s, "Default_To_CVM", "0").ok());
  EXPECT_FALSE(s.default_to_cvm());
  EXPECT_TRUE(apply_setting(s, "scoring", "spread").ok());
  EXPECT_EQ(s.scoring(), cvm::v1::SPREAD);
  EXPECT_TRUE(apply_setting(s, "scoring", "BINPACK").ok());
  EXPECT_EQ(s.scoring(), cvm::v1::BINPACK);

  auto unknown = apply_setting(s, "cachingg", "true");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message.find("caching"), std::string::npos) << "lists the names";
  auto bad_bool = apply_setting(s, "caching", "maybe");
  ASSERT_FALSE(bad_bool.ok());
  EXPECT_NE(bad_bool.error().message.find("true or false"), std::string::npos);
  auto bad_enum = apply_setting(s, "scoring", "random");
  ASSERT_FALSE(bad_enum.ok());
  EXPECT_NE(bad_enum.error().message.find("spread"), std::string::npos);
  EXPECT_FALSE(apply_setting(s, "", "x").ok());
}

TEST(Settings, AssignmentsSplitAtTheFirstEquals) {
  EXPECT_EQ(split_assignment("caching=true"),
            std::make_pair(std::string("caching"), std::string("true")));
  EXPECT_EQ(split_assignment("a=b=c")->second, "b=c");
  EXPECT_EQ(split_assignment("caching=")->second, "");
  EXPECT_FALSE(split_assignment("caching"));
  EXPECT_FALSE(split_assignment("=true"));
}

TEST(PortForward, PortPairsAreLocalColonRemoteOrOnePortForBoth) {
  using P = std::pair<uint16_t, uint16_t>;
  EXPECT_EQ(parse_port_pair("8080:80"), P(8080, 80));
  EXPECT_EQ(parse_port_pair("22"), P(22, 22));
  EXPECT_EQ(parse_port_pair("0:22"), P(0, 22)) << "local 0: any free port";
  EXPECT_EQ(parse_port_pair("65535:1"), P(65535, 1));
  for (const char* bad : {"", "0", "22:0", "65536:1", "1:65536", "a:1", "1:", ":1", "1:2:3", "-1:2",
                          " 1:2", "123456:1"}) {
    EXPECT_FALSE(parse_port_pair(bad).has_value()) << bad;
  }
}

TEST(Logs, LastLinesCountsALastLineWithoutItsNewline) {
  EXPECT_EQ(last_lines("a\nb\nc\n", 2), "b\nc\n");
  EXPECT_EQ(last_lines("a\nb\nc", 2), "b\nc");
  EXPECT_EQ(last_lines("a\nb\nc\n", 3), "a\nb\nc\n");
  EXPECT_EQ(last_lines("a\nb\nc\n", 10), "a\nb\nc\n");
  EXPECT_EQ(last_lines("a\nb\nc\n", 1), "c\n");
  EXPECT_EQ(last_lines("a\nb\nc\n", 0), "");
  EXPECT_EQ(last_lines("a\nb\nc\n", -1), "a\nb\nc\n");
  EXPECT_EQ(last_lines("", 3), "");
  EXPECT_EQ(last_lines("\n\n\n", 2), "\n\n");
  EXPECT_EQ(last_lines("only", 1), "only");
}

cvm::v1::NodeStatus gpu_node(const std::string& id, int64_t heartbeat) {
  cvm::v1::NodeStatus n;
  n.set_node_id(id);
  n.set_heartbeat_unix_ms(heartbeat);
  n.mutable_host()->set_bare_metal(true);
  auto* g0 = n.add_gpus();
  g0->set_uuid("GPU-b");
  g0->set_name("A100");
  g0->set_memory_bytes(40ULL << 30);
  g0->set_healthy(true);
  auto* g1 = n.add_gpus();
  g1->set_uuid("GPU-a");
  g1->set_healthy(false);
  g1->set_health_reason("XID 79");
  return n;
}

TEST(Gpus, RowsJoinDevicesWithLeasesAndKeepOrphanLeases) {
  cvm::v1::GpuLease lease;
  lease.set_node_id("n1");
  lease.set_gpu_uuid("GPU-b");
  lease.set_workspace_id("alice");
  lease.set_build_id("b9");
  lease.set_leased_unix_ms(40'000);
  cvm::v1::GpuLease orphan;
  orphan.set_node_id("gone");
  orphan.set_gpu_uuid("GPU-z");
  orphan.set_workspace_id("bob");
  const auto rows = gpu_rows({gpu_node("n1", 99'000)}, {lease, orphan}, 100'000);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].node_id, "gone");
  EXPECT_FALSE(rows[0].reported);
  EXPECT_EQ(rows[1].device.uuid(), "GPU-a");
  EXPECT_FALSE(rows[1].lease);
  EXPECT_EQ(rows[2].device.uuid(), "GPU-b");
  ASSERT_TRUE(rows[2].lease);
  EXPECT_EQ(rows[2].lease->workspace_id(), "alice");
  EXPECT_TRUE(rows[2].node_live);

  const auto table = format_gpus_table(rows, 100'000);
  EXPECT_NE(table.find("UNHEALTHY (XID 79)"), std::string::npos) << table;
  EXPECT_NE(table.find("alice (build b9)"), std::string::npos) << table;
  EXPECT_NE(table.find("1m00s ago"), std::string::npos) << table;
  EXPECT_NE(table.find("not reported"), std::string::npos) << table;
  const auto json = gpus_json(rows);
  EXPECT_EQ(json.front(), '[');
  EXPECT_NE(json.find("\"workspace_id\":\"alice\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"lease\":null"), std::string::npos) << json;

  // A node that stopped heartbeating: its GPUs are not shown as healthy.
  const auto stale = gpu_rows({gpu_node("n1", 0)}, {}, 100'000);
  EXPECT_NE(format_gpus_table(stale, 100'000).find("node not live"), std::string::npos);
}

TEST(Json, StringsAreEscaped) {
  EXPECT_EQ(to_json_string("a\"b\\c\nd\x01"), "\"a\\\"b\\\\c\\nd\\u0001\"");
}

TEST(Nodes, CapabilitiesPutSelinuxFirstAndNameTheCloud) {
  cvm::v1::NodeStatus n;
  n.mutable_host()->set_selinux_enabled(true);
  n.mutable_host()->set_selinux_enforcing(true);
  n.mutable_host()->set_idmapped_mounts(true);
  n.mutable_host()->set_virtualization("Google Compute Engine");
  n.mutable_runtime()->set_sysbox(true);
  EXPECT_EQ(node_capabilities(n), "selinux-enforcing,sysbox,idmap,vm(Google Compute Engine)");
  cvm::v1::NodeStatus m;
  m.mutable_host()->set_shiftfs_module_available(true);
  m.mutable_host()->set_kernel_headers(true);
  m.mutable_host()->set_bare_metal(true);
  EXPECT_EQ(node_capabilities(m), "shiftfs-module,headers,bare-metal");
}

cvm::v1::WorkspaceRecord workspace(const std::string& id, const std::string& node,
                                   const std::string& owner) {
  cvm::v1::WorkspaceRecord w;
  w.set_workspace_id(id);
  w.set_node_id(node);
  w.set_owner(owner);
  w.set_phase(cvm::v1::RUNNING);
  w.set_image("oci:/images/debian:12");
  return w;
}

TEST(Workspaces, SelectedByNodeAndOwnerAndSortedById) {
  const std::vector<cvm::v1::WorkspaceRecord> all = {
      workspace("c", "n1", "alice"), workspace("a", "n2", "bob"), workspace("b", "n1", "bob")};
  auto ids = [](const std::vector<cvm::v1::WorkspaceRecord>& v) {
    std::string out;
    for (const auto& w : v) out += w.workspace_id();
    return out;
  };
  EXPECT_EQ(ids(select_workspaces(all, "", "")), "abc");
  EXPECT_EQ(ids(select_workspaces(all, "n1", "")), "bc");
  EXPECT_EQ(ids(select_workspaces(all, "", "bob")), "ab");
  EXPECT_EQ(ids(select_workspaces(all, "n1", "bob")), "b");
  EXPECT_EQ(ids(select_workspaces(all, "n3", "")), "");
}

TEST(Workspaces, TableShowsPhaseNodeOwnerResourcesAndAge) {
  auto w = workspace("alice-dev", "n1", "alice");
  w.mutable_resources()->set_cpu_millicores(2000);
  w.mutable_resources()->set_memory_bytes(4ULL << 30);
  w.set_cpuset("0-1");
  w.add_gpu_uuids("GPU-1");
  auto* t = w.add_phase_times();
  t->set_phase(cvm::v1::PREPARING);
  t->set_unix_ms(1'000'000);
  cvm::v1::WorkspaceRecord lost;
  lost.set_workspace_id("old");
  lost.set_phase(cvm::v1::LOST);
  const std::string table = format_workspaces_table({w, lost}, 1'000'000 + 125'000);
  std::istringstream lines(table);
  std::string header, first, second;
  std::getline(lines, header);
  std::getline(lines, first);
  std::getline(lines, second);
  for (const char* col :
       {"WORKSPACE", "PHASE", "NODE", "OWNER", "IMAGE", "CPU", "MEMORY", "GPUS", "AGE"}) {
    EXPECT_NE(header.find(col), std::string::npos) << col;
  }
  for (const char* cell : {"alice-dev", "RUNNING", "n1", "alice", "oci:/images/debian:12",
                           "2000m (cpus 0-1)", "4.0Gi", " 1 ", "2m05s"}) {
    EXPECT_NE(first.find(cell), std::string::npos) << cell << " in: " << first;
  }
  // A record with nothing but its phase (the scheduler's LOST mark) still makes a row.
  for (const char* cell : {"old", "LOST", "512Mi"}) {
    EXPECT_NE(second.find(cell), std::string::npos) << cell << " in: " << second;
  }
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
  EXPECT_NE(table.find("yes"), std::string::npos) << "live";
  EXPECT_NE(table.find("CAPABILITIES"), std::string::npos);
  // Heartbeats older than the stale limit show as not live.
  EXPECT_NE(format_nodes_table({n}, 1000 + kNodeStaleAfterMs + 1).find("NO"), std::string::npos);
}

// What nats-server 2.10 publishes on $JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.CVM_BUILDS.*.
constexpr const char* kTerminated =
    R"({"type":"io.nats.jetstream.advisory.v1.terminated","id":"x1","timestamp":)"
    R"("2026-11-27T23:50:01.5Z","stream":"CVM_BUILDS","consumer":"scheduler","consumer_seq":7,)"
    R"("stream_seq":42,"deliveries":3,"reason":"gave up"})";

TEST(DeadLetters, AdvisoriesOfBothKindsAreRead) {
  auto d = parse_dead_letter(kTerminated, 5);
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->sequence, 5u);
  EXPECT_EQ(d->kind, "terminated");
  EXPECT_EQ(d->time, "2026-11-27T23:50:01.5Z");
  EXPECT_EQ(d->stream, "CVM_BUILDS");
  EXPECT_EQ(d->consumer, "scheduler");
  EXPECT_EQ(d->stream_sequence, 42u);
  EXPECT_EQ(d->deliveries, 3u);
  EXPECT_EQ(d->reason, "gave up");
  EXPECT_FALSE(d->request.has_value());
  auto m = parse_dead_letter(
      R"({"type":"io.nats.jetstream.advisory.v1.max_deliver","stream":"CVM_BUILDS",)"
      R"("consumer":"scheduler","stream_seq":9,"deliveries":5})",
      6);
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_EQ(m->kind, "max_deliveries");
  EXPECT_EQ(m->stream_sequence, 9u);
  EXPECT_EQ(m->deliveries, 5u);
}

TEST(DeadLetters, AnythingElseIsRefusedNotFatal) {
  for (const char* bad :
       {"", "not json", "[]", R"({"type":"io.nats.jetstream.advisory.v1.nak"})",
        R"({"type":"io.nats.jetstream.advisory.v1.terminated"})",
        R"({"type":"io.nats.jetstream.advisory.v1.terminated","stream_seq":"42"})",
        R"({"type":"io.nats.jetstream.advisory.v1.terminated","stream_seq":-1})",
        R"({"type":7,"stream_seq":1})"}) {
    auto d = parse_dead_letter(bad, 1);
    EXPECT_FALSE(d.ok()) << bad;
  }
  // Fields of the wrong type are left empty, not thrown on.
  auto d = parse_dead_letter(
      R"({"type":"io.nats.jetstream.advisory.v1.terminated","stream_seq":1,"deliveries":"x",)"
      R"("stream":5,"timestamp":null})",
      1);
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->deliveries, 0u);
  EXPECT_EQ(d->stream, "");
}

TEST(DeadLetters, TableNamesTheBuildOrSaysTheRequestIsGone) {
  auto gone = parse_dead_letter(kTerminated, 1);
  ASSERT_TRUE(gone.ok());
  auto kept = *gone;
  kept.kind = "max_deliveries";
  kept.stream_sequence = 43;
  kept.request.emplace();
  kept.request->set_build_id("b-7");
  kept.request->set_workspace_id("ws-7");
  const auto table = format_dead_letters_table({*gone, kept});
  EXPECT_NE(table.find("DELIVERIES"), std::string::npos);
  EXPECT_NE(table.find("2026-11-27T23:50:01.5Z"), std::string::npos);
  EXPECT_NE(table.find("b-7 (workspace ws-7)"), std::string::npos);
  EXPECT_NE(table.find("(request removed)"), std::string::npos);
  EXPECT_NE(table.find("giving up on stream seq"), std::string::npos) << "says where to look";
  EXPECT_EQ(format_dead_letters_table({kept}).find("(request removed)"), std::string::npos);

  const auto json = dead_letters_json({*gone, kept});
  EXPECT_NE(json.find(R"("stream_sequence":42)"), std::string::npos) << json;
  EXPECT_NE(json.find(R"("request_readable":false)"), std::string::npos) << json;
  EXPECT_NE(json.find(R"("build_id":"b-7")"), std::string::npos) << json;
  EXPECT_EQ(dead_letters_json({}), "[]");
}

}  // namespace
}  // namespace cvm::cli
