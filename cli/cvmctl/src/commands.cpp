#include "cvm/cli/commands.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <random>
#include <sstream>
#include <string>
#include <thread>

#include <google/protobuf/util/json_util.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "cvm/base/reasons.h"
#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/cli/quantity.h"

namespace cvm::cli {
namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string to_json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

Result<bus::ConnectionPtr> connect(const GlobalOptions& g, boost::asio::io_context& io) {
  bus::ConnectOptions co;
  co.url = g.nats_url;
  co.name = "cvmctl";
  co.user = g.nats_user;
  co.password = g.nats_password;
  // A CLI should fail fast and say so rather than wait for a server that is not there.
  co.retry_on_failed_connect = false;
  co.max_reconnect = 5;
  return bus::Connection::connect(co, io.get_executor());
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b >= (1ULL << 30)) {
    std::snprintf(buf, sizeof(buf), "%.1fGi", static_cast<double>(b) / (1ULL << 30));
  } else {
    std::snprintf(buf, sizeof(buf), "%lluMi", static_cast<unsigned long long>(b >> 20));
  }
  return buf;
}

}  // namespace

std::string new_build_id() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd());
  char buf[40];
  std::snprintf(buf, sizeof(buf), "b-%llx-%08llx", static_cast<unsigned long long>(now_ms()),
                static_cast<unsigned long long>(gen() & 0xffffffffULL));
  return buf;
}

bool ends_build(cvm::v1::Transition transition, cvm::v1::Phase phase) {
  if (phase == cvm::v1::FAILED) return true;
  if (transition == cvm::v1::STOP || transition == cvm::v1::DELETE) {
    return phase == cvm::v1::STOPPED;
  }
  return phase == cvm::v1::RUNNING;
}

std::string format_event_line(const cvm::v1::BuildEvent& e) {
  const std::time_t secs = e.timestamp_unix_ms() / 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char ts[32];
  std::snprintf(ts, sizeof(ts), "%02d:%02d:%02d.%03d", tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(e.timestamp_unix_ms() % 1000));
  std::string line =
      std::string(ts) + "  " + e.build_id() + "  " + std::string(phase_name(e.phase()));
  if (!e.node_id().empty()) line += "  node=" + e.node_id();
  if (e.reason() != cvm::v1::REASON_UNSPECIFIED) {
    line += "  reason=" + cvm::v1::Reason_Name(e.reason());
  }
  if (!e.message().empty()) line += "  " + e.message();
  for (const auto& w : e.warnings()) line += "\n    warning: " + w;
  return line;
}

std::string format_nodes_table(const std::vector<cvm::v1::NodeStatus>& nodes, int64_t now) {
  std::ostringstream out;
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%-20s %-8s %-10s %-12s %-9s %-17s %-4s %s\n", "NODE", "SELINUX",
                "RUNTIME", "CPU", "MEMORY", "KERNEL", "GPUS", "HEARTBEAT");
  out << buf;
  for (const auto& n : nodes) {
    const auto& h = n.host();
    const char* selinux =
        h.selinux_enforcing() ? "enforce" : (h.selinux_enabled() ? "permit" : "off");
    std::string runtime = n.runtime().runtime().empty() ? "-" : n.runtime().runtime();
    if (!n.runtime().ready()) runtime += "!";
    const std::string cpu = std::to_string(n.allocated().cpu_millicores()) + "/" +
                            std::to_string(n.capacity().cpu_millicores()) + "m";
    const std::string mem =
        human_bytes(n.allocated().memory_bytes()) + "/" + human_bytes(n.capacity().memory_bytes());
    const double age_s = static_cast<double>(now - n.heartbeat_unix_ms()) / 1000.0;
    char hb[32];
    std::snprintf(hb, sizeof(hb), "%.1fs ago", age_s < 0 ? 0.0 : age_s);
    std::snprintf(buf, sizeof(buf), "%-20s %-8s %-10s %-12s %-9s %-17s %-4d %s\n",
                  n.node_id().c_str(), selinux, runtime.c_str(), cpu.c_str(), mem.c_str(),
                  h.kernel_version().c_str(), n.gpus_size(), hb);
    out << buf;
  }
  return out.str();
}

int build_command(const GlobalOptions& global, const BuildOptions& o,
                  cvm::v1::Transition transition, std::ostream& out, std::ostream& err) {
  cvm::v1::BuildRequest req;
  req.set_build_id(o.build_id.empty() ? new_build_id() : o.build_id);
  req.set_workspace_id(o.workspace);
  req.set_owner(o.owner);
  req.set_image(o.image);
  req.set_transition(transition);
  auto* res = req.mutable_resources();
  if (!o.cpu.empty()) {
    auto cpu = parse_cpu(o.cpu);
    if (!cpu) {
      err << "cvmctl: " << cpu.error().message << "\n";
      return kExitUsage;
    }
    res->set_cpu_millicores(*cpu);
  }
  if (!o.memory.empty()) {
    auto mem = parse_bytes(o.memory);
    if (!mem) {
      err << "cvmctl: " << mem.error().message << "\n";
      return kExitUsage;
    }
    res->set_memory_bytes(*mem);
  }
  if (o.gpus > 0) {
    res->mutable_gpu()->set_count(o.gpus);
    res->mutable_gpu()->set_vendor(o.gpu_vendor == "amd" ? cvm::v1::AMD : cvm::v1::NVIDIA);
    if (!o.gpu_min_memory.empty()) {
      auto mem = parse_bytes(o.gpu_min_memory);
      if (!mem) {
        err << "cvmctl: " << mem.error().message << "\n";
        return kExitUsage;
      }
      res->mutable_gpu()->set_min_memory_bytes(*mem);
    }
  }
  req.mutable_options()->set_tun(o.tun);
  req.mutable_options()->set_fuse(o.fuse);
  if (o.use_cvm) req.set_use_cvm(*o.use_cvm);
  // Refuse locally what the scheduler would refuse, with the same words.
  if (auto problem = validate_build_request(req); !problem.empty()) {
    err << "cvmctl: " << problem << "\n";
    return kExitUsage;
  }

  boost::asio::io_context io;
  auto conn = connect(global, io);
  if (!conn) {
    err << "cvmctl: cannot reach NATS at " << global.nats_url << ": " << conn.error().message
        << "\n  Is the stack running? Start it with scripts/demo.sh, or pass --nats-url.\n";
    return kExitUnavailable;
  }

  int exit_code = kExitOk;
  bool done = false;
  std::optional<bus::Subscription> sub;
  if (o.watch) {
    // Subscribe before publishing so that no event can slip past.
    auto s =
        (*conn)->subscribe(wire::build_events_subject(req.build_id()), "", [&](bus::Message m) {
          cvm::v1::BuildEvent e;
          if (done || !e.ParseFromString(m.data)) return;
          if (global.output == "json") {
            out << to_json(e) << "\n";
          } else {
            out << format_event_line(e) << "\n";
          }
          out.flush();
          if (ends_build(transition, e.phase())) {
            done = true;
            exit_code = e.phase() == cvm::v1::FAILED ? kExitBuildFailed : kExitOk;
            io.stop();
          }
        });
    if (!s) {
      err << "cvmctl: cannot watch events: " << s.error().message << "\n";
      return kExitUnavailable;
    }
    sub = std::move(*s);
    (void)(*conn)->flush();
  }

  auto ack = (*conn)->js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(),
                                 req.build_id());
  if (!ack) {
    err << "cvmctl: the build request was not accepted: " << ack.error().message
        << "\n  Is cvm-scheduler running? It creates the CVM_BUILDS stream at start.\n";
    return kExitUnavailable;
  }
  if (global.output == "json") {
    out << "{\"build_id\":\"" << req.build_id() << "\",\"workspace_id\":\"" << req.workspace_id()
        << "\",\"stream_sequence\":" << ack->sequence
        << ",\"duplicate\":" << (ack->duplicate ? "true" : "false") << "}\n";
  } else {
    out << "build " << req.build_id() << " submitted for workspace " << req.workspace_id()
        << (ack->duplicate ? " (duplicate: already submitted)" : "") << "\n";
  }
  if (!o.watch) return kExitOk;

  boost::asio::steady_timer timer(io, o.timeout);
  timer.async_wait([&](const boost::system::error_code& ec) {
    if (ec || done) return;
    done = true;
    exit_code = kExitWatchTimeout;
    io.stop();
  });
  auto guard = boost::asio::make_work_guard(io);
  io.run();
  if (exit_code == kExitWatchTimeout) {
    err << "cvmctl: no terminal phase for build " << req.build_id() << " within "
        << o.timeout.count() << "s; it may still finish (see the CVM_EVENTS stream)\n";
  }
  return exit_code;
}

int nodes_command(const GlobalOptions& global, std::ostream& out, std::ostream& err) {
  boost::asio::io_context io;
  auto conn = connect(global, io);
  if (!conn) {
    err << "cvmctl: cannot reach NATS at " << global.nats_url << ": " << conn.error().message
        << "\n";
    return kExitUnavailable;
  }
  auto kv = (*conn)->ensure_kv({.bucket = std::string(wire::kBucketNodes)});
  if (!kv) {
    err << "cvmctl: cannot open KV " << wire::kBucketNodes << ": " << kv.error().message << "\n";
    return kExitUnavailable;
  }
  auto keys = kv->keys();
  if (!keys) {
    err << "cvmctl: cannot list nodes: " << keys.error().message << "\n";
    return kExitUnavailable;
  }
  std::vector<cvm::v1::NodeStatus> nodes;
  for (const auto& key : *keys) {
    auto entry = kv->get(key);
    if (!entry || !entry->has_value()) continue;
    cvm::v1::NodeStatus n;
    if (n.ParseFromString((*entry)->value)) nodes.push_back(std::move(n));
  }
  std::sort(nodes.begin(), nodes.end(),
            [](const auto& a, const auto& b) { return a.node_id() < b.node_id(); });
  if (global.output == "json") {
    out << "[";
    for (size_t i = 0; i < nodes.size(); ++i) out << (i ? "," : "") << to_json(nodes[i]);
    out << "]\n";
  } else {
    out << format_nodes_table(nodes, now_ms());
    if (nodes.empty()) out << "(no nodes registered: is a cvm-node-agent running?)\n";
  }
  return kExitOk;
}

}  // namespace cvm::cli
