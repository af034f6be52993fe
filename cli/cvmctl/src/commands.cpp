#include "cvm/cli/commands.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>

#include <boost/asio/io_context.hpp>

#include "cvm/base/validate.h"
#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/cli/quantity.h"
#include "cvm/service/streams.h"
#include "cvm/v1/gpu.pb.h"
#include "cvm/v1/settings.pb.h"
#include "shared.h"

namespace cvm::cli {
namespace {

using namespace std::chrono_literals;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// What to try next when the bus says no: the words differ for "nobody there" and "not allowed".
std::string next_step(const Error& e, const GlobalOptions& g) {
  const auto& m = e.message;
  if (m.find("uthorization") != std::string::npos || m.find("ermission") != std::string::npos) {
    return "  NATS refused user '" + (g.nats_user.empty() ? std::string("(none)") : g.nats_user) +
           "': check --nats-user/--nats-password (or CVM_NATS_USER/CVM_NATS_PASSWORD) and the "
           "user's permissions in deploy/nats.";
  }
  return "  Is the stack running? Start it with scripts/demo.sh or systemctl start "
         "cvm-nats cvm-scheduler, or point --nats-url (CVM_NATS_URL) at it.";
}

}  // namespace

namespace detail {

int unavailable(std::ostream& err, const std::string& what, const Error& e,
                const GlobalOptions& g) {
  err << "cvmctl: " << what << ": " << e.message << "\n" << next_step(e, g) << "\n";
  return kExitUnavailable;
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

}  // namespace detail

namespace {

using detail::connect;
using detail::unavailable;

// Runs `command` on a fresh connection; every command says the same when NATS is not there.
template <class Command>
int with_connection(const GlobalOptions& g, std::ostream& err, Command&& command) {
  boost::asio::io_context io;
  auto conn = connect(g, io);
  if (!conn) return unavailable(err, "cannot reach NATS at " + g.nats_url, conn.error(), g);
  return command(**conn);
}

bool valid_build_id(const std::string& build_id, std::ostream& err) {
  if (wire::is_valid_id(build_id)) return true;
  err << "cvmctl: '" << build_id << "' is not a build id ([A-Za-z0-9_-], 1..128)\n";
  return false;
}

// Every decodable value of a bucket; undecodable ones are reported, not fatal.
template <class M>
Result<std::vector<M>> read_bucket(bus::Connection& conn, const bus::KvConfig& config,
                                   std::ostream& err) {
  auto kv = conn.ensure_kv(config);
  if (!kv) return kv.error();
  auto keys = kv->keys();
  if (!keys) return keys.error();
  std::vector<M> out;
  for (const auto& key : *keys) {
    auto entry = kv->get(key);
    if (!entry) return entry.error();
    if (!entry->has_value()) continue;  // deleted between keys() and get()
    M m;
    if (m.ParseFromString((*entry)->value)) {
      out.push_back(std::move(m));
    } else {
      err << "cvmctl: skipping " << config.bucket << "/" << key << ": not a valid "
          << M::descriptor()->name() << "\n";
    }
  }
  return out;
}

// Is a cvm-scheduler pulling from CVM_BUILDS right now? Unknown (no permission, say) counts as
// yes, so the hint never accuses a scheduler that may be fine.
bool scheduler_fetching(bus::Connection& conn) {
  auto consumers = conn.consumer_states(std::string(wire::kStreamBuilds));
  if (!consumers) return true;
  for (const auto& c : *consumers) {
    if (c.name == wire::kSchedulerDurable) return c.waiting > 0 || c.ack_pending > 0;
  }
  return false;
}

class LiveLine {
 public:
  LiveLine(std::ostream& out, bool enabled) : out_(out), enabled_(enabled) {}
  void show(const std::string& text) {
    if (!enabled_) return;
    static constexpr const char* kSpinner[] = {"|", "/", "-", "\\"};
    out_ << "\r\033[2K" << kSpinner[frame_++ % 4] << " " << text << std::flush;
    shown_ = true;
  }
  void clear() {
    if (enabled_ && shown_) out_ << "\r\033[2K" << std::flush;
    shown_ = false;
  }

 private:
  std::ostream& out_;
  bool enabled_;
  bool shown_ = false;
  unsigned frame_ = 0;
};

// Reads the build's events from CVM_EVENTS (history, then live) until one ends it.
int follow(bus::Connection& conn, const GlobalOptions& g, const std::string& build_id,
           cvm::v1::Transition transition, std::chrono::seconds timeout, std::ostream& out,
           std::ostream& err) {
  auto reader =
      conn.read_stream(std::string(wire::kStreamEvents), wire::build_events_subject(build_id));
  if (!reader)
    return unavailable(err, "cannot read the events of build " + build_id, reader.error(), g);
  const int64_t started = now_ms();
  const int64_t deadline = started + std::chrono::milliseconds(timeout).count();
  BuildWatch watch(transition, started);
  LiveLine live(out, g.live);
  bool fetching = true;
  int64_t last_check = started;
  while (true) {
    const int64_t now = now_ms();
    if (now >= deadline) break;
    auto m = (*reader)->next(std::chrono::milliseconds(std::min<int64_t>(250, deadline - now)));
    if (!m) {
      live.clear();
      return unavailable(err, "lost the events of build " + build_id, m.error(), g);
    }
    if (!m->has_value()) {
      // Caught up with the history and the build had already ended (a duplicate, a re-watch).
      if (watch.done()) break;
      if (g.live && watch.events() == 0 && now_ms() - last_check >= 2000) {
        last_check = now_ms();
        fetching = scheduler_fetching(conn);
      }
      live.show(watch.status_line(now_ms(), fetching));
      continue;
    }
    cvm::v1::BuildEvent e;
    if (!e.ParseFromString((*m)->message.data)) {
      live.clear();
      err << "cvmctl: skipping event " << (*m)->stream_sequence << ": not a BuildEvent\n";
      continue;
    }
    live.clear();
    out << (g.output == "json" ? to_json(e) : format_event_line(e)) << "\n" << std::flush;
    watch.on_event(e, now_ms());
    // A build that ended long ago may have later notices (LOST): print its whole history.
    if (watch.done() && (*m)->pending == 0) break;
    if (!watch.done()) live.show(watch.status_line(now_ms(), fetching));
  }
  live.clear();
  if (watch.done()) return watch.exit_code();
  err << "cvmctl: build " << build_id << " reached no final phase within " << timeout.count()
      << "s (last: " << watch.status_line(now_ms(), fetching) << ").\n  It may still finish: "
      << "cvmctl build watch " << build_id << "\n";
  return kExitWatchTimeout;
}

Status parse_resources(const BuildOptions& o, cvm::v1::Resources* res) {
  if (!o.cpu.empty()) {
    auto cpu = parse_cpu(o.cpu);
    if (!cpu) return cpu.error();
    res->set_cpu_millicores(*cpu);
  }
  if (!o.memory.empty()) {
    auto mem = parse_bytes(o.memory);
    if (!mem) return mem.error();
    res->set_memory_bytes(*mem);
  }
  if (o.gpus > 0) {
    res->mutable_gpu()->set_count(o.gpus);
    res->mutable_gpu()->set_vendor(o.gpu_vendor == "amd" ? cvm::v1::AMD : cvm::v1::NVIDIA);
    if (!o.gpu_min_memory.empty()) {
      auto mem = parse_bytes(o.gpu_min_memory);
      if (!mem) return mem.error();
      res->mutable_gpu()->set_min_memory_bytes(*mem);
    }
  }
  return {};
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

std::optional<std::pair<std::string, std::string>> split_assignment(const std::string& text) {
  const auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0) return std::nullopt;
  return std::make_pair(text.substr(0, eq), text.substr(eq + 1));
}

int build_command(const GlobalOptions& global, const BuildOptions& o,
                  cvm::v1::Transition transition, std::ostream& out, std::ostream& err) {
  cvm::v1::BuildRequest req;
  req.set_build_id(o.build_id.empty() ? new_build_id() : o.build_id);
  req.set_workspace_id(o.workspace);
  req.set_owner(o.owner.empty() ? session_user(global) : o.owner);
  req.set_image(o.image);
  req.set_transition(transition);
  if (auto st = parse_resources(o, req.mutable_resources()); !st) {
    err << "cvmctl: " << st.error().message << "\n";
    return kExitUsage;
  }
  req.mutable_options()->set_tun(o.tun);
  req.mutable_options()->set_fuse(o.fuse);
  if (o.use_cvm) req.set_use_cvm(*o.use_cvm);
  // Refuse locally what the scheduler would refuse, with the same words.
  if (auto problem = validate_build_request(req); !problem.empty()) {
    err << "cvmctl: " << problem << "\n";
    return kExitUsage;
  }

  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto ack =
        conn.js_publish(std::string(wire::kBuildsSubmit), req.SerializeAsString(), req.build_id());
    if (!ack) {
      err << "cvmctl: the build request was not accepted: " << ack.error().message
          << "\n  Is cvm-scheduler running? It creates the CVM_BUILDS stream at start "
             "(systemctl status cvm-scheduler).\n";
      return kExitUnavailable;
    }
    if (global.output == "json") {
      out << "{\"build_id\":" << to_json_string(req.build_id())
          << ",\"workspace_id\":" << to_json_string(req.workspace_id())
          << ",\"stream_sequence\":" << ack->sequence
          << ",\"duplicate\":" << (ack->duplicate ? "true" : "false") << "}\n";
    } else {
      out << "build " << req.build_id() << " submitted for workspace " << req.workspace_id()
          << (ack->duplicate ? (o.watch ? " (duplicate: already submitted; showing its events)"
                                        : " (duplicate: already submitted)")
                             : "")
          << "\n";
    }
    out.flush();
    if (!o.watch) return kExitOk;
    // The events are read back from the stream, so nothing published before this point is missed.
    return follow(conn, global, req.build_id(), transition, o.timeout, out, err);
  });
}

int watch_command(const GlobalOptions& global, const std::string& build_id,
                  std::chrono::seconds timeout, std::ostream& out, std::ostream& err) {
  if (!valid_build_id(build_id, err)) return kExitUsage;
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    return follow(conn, global, build_id, cvm::v1::TRANSITION_UNSPECIFIED, timeout, out, err);
  });
}

int events_command(const GlobalOptions& global, const std::string& build_id, std::ostream& out,
                   std::ostream& err) {
  if (!valid_build_id(build_id, err)) return kExitUsage;
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    const std::string stream(wire::kStreamEvents);
    const std::string subject = wire::build_events_subject(build_id);
    // The last message tells whether there is anything at all (an empty subject only times out).
    auto last = conn.last_message(stream, subject);
    if (!last) return unavailable(err, "cannot read " + stream, last.error(), global);
    if (!last->has_value()) {
      err << "cvmctl: no events for build " << build_id
          << ". Check the id (cvmctl build start prints it); " << stream
          << " keeps events for 14 days.\n";
      return kExitNotFound;
    }
    auto reader = conn.read_stream(stream, subject);
    if (!reader) return unavailable(err, "cannot read " + stream, reader.error(), global);
    while (true) {
      auto m = (*reader)->next(5s);
      if (!m) return unavailable(err, "cannot read " + stream, m.error(), global);
      if (!m->has_value()) {
        err << "cvmctl: the events of build " << build_id << " stopped arriving; try again\n";
        return kExitUnavailable;
      }
      cvm::v1::BuildEvent e;
      if (e.ParseFromString((*m)->message.data)) {
        out << (global.output == "json" ? to_json(e) : format_event_line(e)) << "\n";
      } else {
        err << "cvmctl: skipping event " << (*m)->stream_sequence << ": not a BuildEvent\n";
      }
      if ((*m)->pending == 0) return kExitOk;
    }
  });
}

std::string last_lines(const std::string& text, int64_t n) {
  if (n < 0) return text;
  size_t end = text.size();
  // A trailing newline ends the last line; it does not start another.
  size_t pos = end > 0 && text[end - 1] == '\n' ? end - 1 : end;
  for (int64_t i = 0; i < n; ++i) {
    if (pos == 0) return text;
    const size_t nl = text.rfind('\n', pos - 1);
    if (nl == std::string::npos) return text;
    pos = nl;
  }
  return n == 0 ? std::string() : text.substr(pos + 1);
}

namespace detail {

// Where a workspace lives now: its record in cvm_workspaces. nullopt when there is none.
Result<std::optional<cvm::v1::WorkspaceRecord>> workspace_record(bus::KeyValue& kv,
                                                                 const std::string& workspace) {
  auto entry = kv.get(workspace);
  if (!entry) return entry.error();
  if (!entry->has_value()) return std::optional<cvm::v1::WorkspaceRecord>();
  cvm::v1::WorkspaceRecord record;
  if (!record.ParseFromString((*entry)->value)) {
    return make_error(ErrorDomain::kInvalid,
                      "the record of " + workspace + " is not a valid cvm.v1.WorkspaceRecord");
  }
  return std::optional<cvm::v1::WorkspaceRecord>(std::move(record));
}

}  // namespace detail

using detail::workspace_record;

int logs_command(const GlobalOptions& global, const LogsOptions& o, std::ostream& out,
                 std::ostream& err) {
  if (!wire::is_valid_id(o.workspace)) {
    err << "cvmctl: '" << o.workspace << "' is not a workspace id ([A-Za-z0-9_-], 1..128)\n";
    return kExitUsage;
  }
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto kv = conn.ensure_kv(service::workspaces_bucket());
    if (!kv) return unavailable(err, "cannot read the workspaces", kv.error(), global);
    auto record = workspace_record(*kv, o.workspace);
    if (!record) return unavailable(err, "cannot read the workspaces", record.error(), global);
    if (!record->has_value() || (*record)->node_id().empty()) {
      err << "cvmctl: no workspace " << o.workspace << " (cvmctl build start makes one)\n";
      return kExitNotFound;
    }
    std::string node = (*record)->node_id();
    cvm::v1::ConsoleLogRequest req;
    req.set_workspace_id(o.workspace);
    // Until the first read reaches the end, output is held back when only the tail is wanted.
    bool caught_up = false;
    std::string held;
    for (;;) {
      auto answer = conn.request(wire::node_console_subject(node, session_user(global)),
                                 req.SerializeAsString(), 5s);
      if (!answer) {
        return unavailable(err, "the agent of node " + node + " does not answer", answer.error(),
                           global);
      }
      cvm::v1::ConsoleLogReply reply;
      if (!reply.ParseFromString(answer->data)) {
        err << "cvmctl: node " << node << " answered with something that is not a "
            << "cvm.v1.ConsoleLogReply\n";
        return kExitUnavailable;
      }
      if (!reply.error().empty() && !(reply.not_found() && o.follow)) {
        err << "cvmctl: " << reply.error() << "\n";
        return reply.not_found() ? kExitNotFound : kExitUnavailable;
      }
      if (reply.lost()) err << "cvmctl: some console output was rotated away before it was read\n";
      if (!reply.data().empty()) {
        *req.mutable_from() = reply.next();
        if (caught_up || o.tail_lines < 0) {
          out << reply.data() << std::flush;
        } else {
          held += reply.data();
        }
        continue;
      }
      if (!caught_up) {
        caught_up = true;
        out << last_lines(held, o.tail_lines) << std::flush;
        held.clear();
      }
      if (!o.follow) return kExitOk;
      std::this_thread::sleep_for(o.poll);
      // Deleted: nothing more will come. Rebuilt elsewhere: its new node has the log from now on.
      auto now = workspace_record(*kv, o.workspace);
      if (!now) return unavailable(err, "cannot read the workspaces", now.error(), global);
      if (!now->has_value()) return kExitOk;
      if (!(*now)->node_id().empty() && (*now)->node_id() != node) {
        node = (*now)->node_id();
        req.clear_from();
      }
    }
  });
}

int workspaces_command(const GlobalOptions& global, const std::string& node,
                       const std::string& owner, std::ostream& out, std::ostream& err) {
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto all = read_bucket<cvm::v1::WorkspaceRecord>(conn, service::workspaces_bucket(), err);
    if (!all) return unavailable(err, "cannot list workspaces", all.error(), global);
    const auto shown = select_workspaces(std::move(*all), node, owner);
    if (global.output == "json") {
      out << "[";
      for (size_t i = 0; i < shown.size(); ++i) out << (i ? "," : "") << to_json(shown[i]);
      out << "]\n";
    } else {
      out << format_workspaces_table(shown, now_ms());
      if (shown.empty())
        out << "(no workspaces" << (node.empty() && owner.empty() ? "" : " match")
            << ": cvmctl build start makes one)\n";
    }
    return kExitOk;
  });
}

int nodes_command(const GlobalOptions& global, std::ostream& out, std::ostream& err) {
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto nodes = read_bucket<cvm::v1::NodeStatus>(conn, service::nodes_bucket(), err);
    if (!nodes) return unavailable(err, "cannot list nodes", nodes.error(), global);
    std::sort(nodes->begin(), nodes->end(),
              [](const auto& a, const auto& b) { return a.node_id() < b.node_id(); });
    if (global.output == "json") {
      out << "[";
      for (size_t i = 0; i < nodes->size(); ++i) out << (i ? "," : "") << to_json((*nodes)[i]);
      out << "]\n";
    } else {
      out << format_nodes_table(*nodes, now_ms());
      if (nodes->empty()) {
        out << "(no nodes registered: start cvm-node-agent on each node; it registers within "
               "seconds)\n";
      }
    }
    return kExitOk;
  });
}

int gpus_command(const GlobalOptions& global, std::ostream& out, std::ostream& err) {
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto nodes = read_bucket<cvm::v1::NodeStatus>(conn, service::nodes_bucket(), err);
    if (!nodes) return unavailable(err, "cannot list nodes", nodes.error(), global);
    auto leases = read_bucket<cvm::v1::GpuLease>(conn, service::gpu_leases_bucket(), err);
    if (!leases) return unavailable(err, "cannot list GPU leases", leases.error(), global);
    const auto rows = gpu_rows(*nodes, *leases, now_ms());
    if (global.output == "json") {
      out << gpus_json(rows) << "\n";
    } else {
      out << format_gpus_table(rows, now_ms());
      if (rows.empty()) out << "(no GPUs: no node reports one and no lease is held)\n";
    }
    return kExitOk;
  });
}

int dead_letters_command(const GlobalOptions& global, uint64_t limit, std::ostream& out,
                         std::ostream& err) {
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    const std::string stream(service::kStreamDeadLetters);
    auto state = conn.stream_state(stream);
    if (!state && state.error().is_not_found()) {
      err << "cvmctl: there is no " << stream
          << " stream: cvm-scheduler creates it when it starts (systemctl status "
             "cvm-scheduler).\n";
      return kExitUnavailable;
    }
    if (!state) return unavailable(err, "cannot read " + stream, state.error(), global);
    // The newest `limit` (0: all), read by sequence: the stream is small and only appended to.
    uint64_t first = state->first_sequence;
    if (limit > 0 && state->last_sequence >= limit && state->last_sequence - limit + 1 > first) {
      first = state->last_sequence - limit + 1;
    }
    std::vector<DeadLetter> letters;
    for (uint64_t seq = first; state->messages > 0 && seq <= state->last_sequence; ++seq) {
      auto m = conn.message_at(stream, seq);
      if (!m) return unavailable(err, "cannot read " + stream, m.error(), global);
      if (!m->has_value()) continue;  // expired between the state and the read
      auto letter = parse_dead_letter((*m)->data, seq);
      if (!letter) {
        err << "cvmctl: skipping " << stream << " " << seq << ": " << letter.error().message
            << "\n";
        continue;
      }
      // The request itself, while its stream still holds it.
      if (!letter->stream.empty()) {
        auto request = conn.message_at(letter->stream, letter->stream_sequence);
        cvm::v1::BuildRequest r;
        if (request && request->has_value() && r.ParseFromString((*request)->data)) {
          letter->request = std::move(r);
        }
      }
      letters.push_back(std::move(*letter));
    }
    if (global.output == "json") {
      out << dead_letters_json(letters) << "\n";
    } else if (letters.empty()) {
      out << "(no dead letters: no request of " << wire::kStreamBuilds
          << " was given up on in the last 14 days)\n";
    } else {
      out << format_dead_letters_table(letters);
    }
    return kExitOk;
  });
}

int settings_get_command(const GlobalOptions& global, std::ostream& out, std::ostream& err) {
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto kv = conn.ensure_kv(service::settings_bucket());
    if (!kv) return unavailable(err, "cannot open the settings", kv.error(), global);
    auto entry = kv->get(std::string(wire::kSettingsKey));
    if (!entry) return unavailable(err, "cannot read the settings", entry.error(), global);
    std::optional<cvm::v1::InfrastructureSettings> stored;
    if (entry->has_value()) {
      stored.emplace();
      if (!stored->ParseFromString((*entry)->value)) {
        err << "cvmctl: the stored settings do not decode; the services use the defaults until "
               "they are set again (cvmctl settings set ...)\n";
        stored.reset();
      }
    }
    const auto* s = stored ? &*stored : nullptr;
    out << (global.output == "json" ? settings_json(s) + "\n" : format_settings(s));
    return kExitOk;
  });
}

int settings_set_command(const GlobalOptions& global, const std::vector<std::string>& assignments,
                         std::ostream& out, std::ostream& err) {
  // Check every assignment before touching the store: all or nothing.
  std::vector<std::pair<std::string, std::string>> edits;
  cvm::v1::InfrastructureSettings probe;
  for (const auto& a : assignments) {
    auto kv = split_assignment(a);
    if (!kv) {
      err << "cvmctl: '" << a << "' is not KEY=VALUE (e.g. caching=true)\n";
      return kExitUsage;
    }
    if (auto st = apply_setting(probe, kv->first, kv->second); !st) {
      err << "cvmctl: " << st.error().message << "\n";
      return kExitUsage;
    }
    edits.push_back(*kv);
  }
  return with_connection(global, err, [&](bus::Connection& conn) -> int {
    auto kv = conn.ensure_kv(service::settings_bucket());
    if (!kv) return unavailable(err, "cannot open the settings", kv.error(), global);
    const std::string key(wire::kSettingsKey);
    // Compare-and-set, so two admins editing at once do not lose each other's change.
    for (int attempt = 0; attempt < 5; ++attempt) {
      auto entry = kv->get(key);
      if (!entry) return unavailable(err, "cannot read the settings", entry.error(), global);
      cvm::v1::InfrastructureSettings s;
      if (entry->has_value() && !s.ParseFromString((*entry)->value)) s.Clear();
      for (const auto& [k, v] : edits) (void)apply_setting(s, k, v);
      auto rev = entry->has_value() ? kv->update(key, s.SerializeAsString(), (*entry)->revision)
                                    : kv->create(key, s.SerializeAsString());
      if (rev) {
        out << (global.output == "json" ? settings_json(&s) + "\n" : format_settings(&s));
        if (global.output != "json") out << "(applies to the next build)\n";
        return kExitOk;
      }
      if (!rev.error().is_conflict()) {
        return unavailable(err, "cannot write the settings", rev.error(), global);
      }
    }
    err << "cvmctl: the settings kept changing under us; try again\n";
    return kExitUnavailable;
  });
}

}  // namespace cvm::cli
