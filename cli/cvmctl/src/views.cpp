#include "cvm/cli/views.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <ctime>
#include <map>
#include <sstream>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "cvm/base/reasons.h"
#include "cvm/cli/watch.h"

namespace cvm::cli {
namespace {

using google::protobuf::FieldDescriptor;

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b >= (1ULL << 30)) {
    std::snprintf(buf, sizeof(buf), "%.1fGi", static_cast<double>(b) / (1ULL << 30));
  } else {
    std::snprintf(buf, sizeof(buf), "%lluMi", static_cast<unsigned long long>(b >> 20));
  }
  return buf;
}

std::string heartbeat_text(int64_t heartbeat_ms, int64_t now_ms) {
  if (heartbeat_ms <= 0) return "never";
  return format_duration(now_ms - heartbeat_ms) + " ago";
}

bool is_live(const cvm::v1::NodeStatus& n, int64_t now_ms) {
  return n.heartbeat_unix_ms() > 0 && now_ms - n.heartbeat_unix_ms() <= kNodeStaleAfterMs;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Column widths follow the widest cell, so long node ids and capability lists stay aligned.
std::string render_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - row[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

const FieldDescriptor* find_setting(std::string_view key) {
  std::string name(key);
  std::replace(name.begin(), name.end(), '-', '_');
  return cvm::v1::InfrastructureSettings::descriptor()->FindFieldByName(lower(name));
}

std::string setting_names() {
  const auto* d = cvm::v1::InfrastructureSettings::descriptor();
  std::string out;
  for (int i = 0; i < d->field_count(); ++i) out += (i ? ", " : "") + d->field(i)->name();
  return out;
}

std::string field_value(const cvm::v1::InfrastructureSettings& s, const FieldDescriptor* f) {
  const auto* r = s.GetReflection();
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_BOOL:
      return r->GetBool(s, f) ? "true" : "false";
    case FieldDescriptor::CPPTYPE_ENUM:
      return r->GetEnum(s, f)->name();
    case FieldDescriptor::CPPTYPE_STRING:
      return r->GetString(s, f);
    case FieldDescriptor::CPPTYPE_INT32:
      return std::to_string(r->GetInt32(s, f));
    case FieldDescriptor::CPPTYPE_INT64:
      return std::to_string(r->GetInt64(s, f));
    case FieldDescriptor::CPPTYPE_UINT32:
      return std::to_string(r->GetUInt32(s, f));
    case FieldDescriptor::CPPTYPE_UINT64:
      return std::to_string(r->GetUInt64(s, f));
    default:
      return "?";
  }
}

// Was the field stored, as opposed to shown with its default? Plain proto3 scalars cannot tell a
// stored default from an absent one; those count as stored when the key exists.
bool stored_field(const cvm::v1::InfrastructureSettings* stored, const FieldDescriptor* f) {
  if (stored == nullptr) return false;
  if (f->has_presence()) return stored->GetReflection()->HasField(*stored, f);
  return true;
}

}  // namespace

std::string to_json_string(std::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string to_json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
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
  if (e.gpu_uuids_size() > 0) {
    line += "  gpus=";
    for (int i = 0; i < e.gpu_uuids_size(); ++i) line += (i ? "," : "") + e.gpu_uuids(i);
  }
  for (const auto& w : e.warnings()) line += "\n    warning: " + w;
  return line;
}

std::string node_capabilities(const cvm::v1::NodeStatus& n) {
  const auto& h = n.host();
  std::vector<std::string> caps;
  if (n.runtime().sysbox()) caps.push_back("sysbox");
  // SELinux enforcing rules a node out for CVMs: it comes first so nobody misses it.
  if (h.selinux_enforcing()) {
    caps.insert(caps.begin(), "selinux-enforcing");
  } else if (h.selinux_enabled()) {
    caps.push_back("selinux-permissive");
  }
  if (h.shiftfs_loaded()) {
    caps.push_back("shiftfs");
  } else if (h.shiftfs_module_available()) {
    caps.push_back("shiftfs-module");
  }
  if (h.idmapped_mounts()) caps.push_back("idmap");
  if (h.kernel_headers()) caps.push_back("headers");
  if (h.bare_metal()) {
    caps.push_back("bare-metal");
  } else {
    caps.push_back(h.virtualization().empty() ? "vm" : "vm(" + h.virtualization() + ")");
  }
  std::string out;
  for (size_t i = 0; i < caps.size(); ++i) out += (i ? "," : "") + caps[i];
  return out;
}

std::string format_nodes_table(const std::vector<cvm::v1::NodeStatus>& nodes, int64_t now) {
  std::vector<std::vector<std::string>> rows = {{"NODE", "LIVE", "CAPABILITIES", "RUNTIME", "CPU",
                                                 "MEMORY", "GPUS", "WORKSPACES", "KERNEL",
                                                 "HEARTBEAT"}};
  for (const auto& n : nodes) {
    std::string runtime = n.runtime().runtime().empty() ? "-" : n.runtime().runtime();
    if (!n.runtime().runc_version().empty()) runtime += " " + n.runtime().runc_version();
    if (!n.runtime().ready()) runtime += " (not ready)";
    int healthy = 0;
    for (const auto& g : n.gpus()) healthy += g.healthy() ? 1 : 0;
    const std::string gpus = n.gpus_size() == 0 ? "0"
                                                : std::to_string(healthy) + "/" +
                                                      std::to_string(n.gpus_size()) + " healthy";
    rows.push_back(
        {n.node_id(), is_live(n, now) ? "yes" : "NO", node_capabilities(n), runtime,
         std::to_string(n.allocated().cpu_millicores()) + "/" +
             std::to_string(n.capacity().cpu_millicores()) + "m",
         human_bytes(n.allocated().memory_bytes()) + "/" + human_bytes(n.capacity().memory_bytes()),
         gpus, std::to_string(n.workspaces()),
         n.host().kernel_version().empty() ? "-" : n.host().kernel_version(),
         heartbeat_text(n.heartbeat_unix_ms(), now)});
  }
  return render_table(rows);
}

std::vector<cvm::v1::WorkspaceRecord> select_workspaces(std::vector<cvm::v1::WorkspaceRecord> all,
                                                        const std::string& node,
                                                        const std::string& owner) {
  std::erase_if(all, [&](const cvm::v1::WorkspaceRecord& w) {
    return (!node.empty() && w.node_id() != node) || (!owner.empty() && w.owner() != owner);
  });
  std::sort(all.begin(), all.end(),
            [](const auto& a, const auto& b) { return a.workspace_id() < b.workspace_id(); });
  return all;
}

std::string format_workspaces_table(const std::vector<cvm::v1::WorkspaceRecord>& workspaces,
                                    int64_t now_ms) {
  std::vector<std::vector<std::string>> rows = {
      {"WORKSPACE", "PHASE", "NODE", "OWNER", "IMAGE", "CPU", "MEMORY", "GPUS", "AGE"}};
  for (const auto& w : workspaces) {
    const auto& res = w.resources();
    // The defaults a request without them gets (build.proto): 1 CPU counted, 512 MiB.
    const std::string cpu = res.cpu_millicores() == 0
                                ? "-"
                                : std::to_string(res.cpu_millicores()) + "m" +
                                      (w.cpuset().empty() ? "" : " (cpus " + w.cpuset() + ")");
    const uint64_t memory = res.memory_bytes() == 0 ? (512ULL << 20) : res.memory_bytes();
    const int64_t since =
        w.phase_times_size() > 0 ? w.phase_times(0).unix_ms() : w.updated_unix_ms();
    std::string phase = cvm::v1::Phase_Name(w.phase());
    if (phase.rfind("PHASE_", 0) == 0) phase = "-";
    rows.push_back({w.workspace_id(), phase, w.node_id().empty() ? "-" : w.node_id(),
                    w.owner().empty() ? "-" : w.owner(), w.image().empty() ? "-" : w.image(), cpu,
                    human_bytes(memory), std::to_string(w.gpu_uuids_size()),
                    since > 0 ? format_duration(now_ms - since) : "-"});
  }
  return render_table(rows);
}

std::vector<GpuRow> gpu_rows(const std::vector<cvm::v1::NodeStatus>& nodes,
                             const std::vector<cvm::v1::GpuLease>& leases, int64_t now_ms) {
  // Leases by (node, gpu): the broker's ledger key is the same pair.
  std::map<std::pair<std::string, std::string>, const cvm::v1::GpuLease*> by_gpu;
  for (const auto& l : leases) by_gpu[{l.node_id(), l.gpu_uuid()}] = &l;
  std::vector<GpuRow> rows;
  for (const auto& n : nodes) {
    for (const auto& g : n.gpus()) {
      GpuRow row;
      row.node_id = n.node_id();
      row.node_live = is_live(n, now_ms);
      row.device = g;
      if (auto it = by_gpu.find({n.node_id(), g.uuid()}); it != by_gpu.end()) {
        row.lease = *it->second;
        by_gpu.erase(it);
      }
      rows.push_back(std::move(row));
    }
  }
  for (const auto& [key, lease] : by_gpu) {
    GpuRow row;
    row.node_id = key.first;
    row.device.set_uuid(key.second);
    row.reported = false;
    row.lease = *lease;
    for (const auto& n : nodes) {
      if (n.node_id() == key.first) row.node_live = is_live(n, now_ms);
    }
    rows.push_back(std::move(row));
  }
  std::sort(rows.begin(), rows.end(), [](const GpuRow& a, const GpuRow& b) {
    return std::tie(a.node_id, a.device.uuid()) < std::tie(b.node_id, b.device.uuid());
  });
  return rows;
}

std::string format_gpus_table(const std::vector<GpuRow>& rows, int64_t now_ms) {
  std::vector<std::vector<std::string>> table = {
      {"NODE", "GPU", "NAME", "MEMORY", "HEALTH", "LEASED TO", "SINCE"}};
  for (const auto& r : rows) {
    std::string health;
    if (!r.reported) {
      health = "not reported";
    } else if (!r.node_live) {
      health = "node not live";
    } else if (r.device.healthy()) {
      health = "healthy";
    } else {
      health = "UNHEALTHY";
      if (!r.device.health_reason().empty()) health += " (" + r.device.health_reason() + ")";
    }
    std::string to = "-";
    std::string since = "-";
    if (r.lease) {
      to = r.lease->workspace_id() + " (build " + r.lease->build_id() + ")";
      since = format_duration(now_ms - r.lease->leased_unix_ms()) + " ago";
    }
    table.push_back({r.node_id, r.device.uuid(), r.device.name().empty() ? "-" : r.device.name(),
                     r.device.memory_bytes() ? human_bytes(r.device.memory_bytes()) : "-", health,
                     to, since});
  }
  return render_table(table);
}

std::string gpus_json(const std::vector<GpuRow>& rows) {
  std::string out = "[";
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    out += (i ? "," : "");
    out += "{\"node_id\":" + to_json_string(r.node_id) +
           ",\"node_live\":" + (r.node_live ? "true" : "false") +
           ",\"reported\":" + (r.reported ? "true" : "false") + ",\"device\":" + to_json(r.device) +
           ",\"lease\":" + (r.lease ? to_json(*r.lease) : "null") + "}";
  }
  return out + "]";
}

cvm::v1::InfrastructureSettings effective_settings(const cvm::v1::InfrastructureSettings* stored) {
  cvm::v1::InfrastructureSettings out;
  if (stored != nullptr) out = *stored;
  if (!out.has_cvm_enabled()) out.set_cvm_enabled(true);
  if (!out.has_default_to_cvm()) out.set_default_to_cvm(true);
  return out;
}

Status apply_setting(cvm::v1::InfrastructureSettings& s, std::string_view key,
                     std::string_view value) {
  const FieldDescriptor* f = find_setting(key);
  if (f == nullptr || f->is_repeated()) {
    return make_error(ErrorDomain::kInvalid,
                      "unknown setting '" + std::string(key) + "'; settings: " + setting_names());
  }
  const auto* r = s.GetReflection();
  const std::string v = lower(value);
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_BOOL: {
      if (v == "true" || v == "on" || v == "yes" || v == "1") {
        r->SetBool(&s, f, true);
      } else if (v == "false" || v == "off" || v == "no" || v == "0") {
        r->SetBool(&s, f, false);
      } else {
        return make_error(
            ErrorDomain::kInvalid,
            "setting " + f->name() + " takes true or false, not '" + std::string(value) + "'");
      }
      return {};
    }
    case FieldDescriptor::CPPTYPE_ENUM: {
      const auto* e = f->enum_type();
      std::string accepted;
      for (int i = 0; i < e->value_count(); ++i) {
        const std::string name = lower(e->value(i)->name());
        // GPU_PLACEMENT_SPREAD may be written "spread": strip the prefix the values share.
        std::string short_name = name;
        std::string snake;
        for (char c : e->name()) {
          if (std::isupper(static_cast<unsigned char>(c)) && !snake.empty()) snake += '_';
          snake += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        }
        if (name.rfind(snake + "_", 0) == 0) short_name = name.substr(snake.size() + 1);
        if (v == name || v == short_name) {
          r->SetEnum(&s, f, e->value(i));
          return {};
        }
        accepted += (i ? ", " : "") + short_name;
      }
      return make_error(ErrorDomain::kInvalid, "setting " + f->name() +
                                                   " takes one of: " + accepted + " (not '" +
                                                   std::string(value) + "')");
    }
    default:
      return make_error(ErrorDomain::kInvalid,
                        "setting " + f->name() + " cannot be set from the command line");
  }
}

std::string format_settings(const cvm::v1::InfrastructureSettings* stored) {
  const auto effective = effective_settings(stored);
  const auto* d = cvm::v1::InfrastructureSettings::descriptor();
  std::vector<std::vector<std::string>> rows;
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    rows.push_back(
        {f->name(), "=", field_value(effective, f), stored_field(stored, f) ? "" : "(default)"});
  }
  std::string out = render_table(rows);
  // Trailing blanks of the last column are noise.
  std::string trimmed;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    while (!line.empty() && line.back() == ' ') line.pop_back();
    trimmed += line + "\n";
  }
  return trimmed;
}

std::string settings_json(const cvm::v1::InfrastructureSettings* stored) {
  return "{\"stored\":" + std::string(stored != nullptr ? "true" : "false") +
         ",\"settings\":" + to_json(effective_settings(stored)) + "}";
}

Result<DeadLetter> parse_dead_letter(std::string_view json, uint64_t sequence) {
  const auto j = nlohmann::json::parse(json, nullptr, false);
  auto invalid = [sequence](const std::string& why) {
    return make_error(ErrorDomain::kInvalid,
                      "dead letter " + std::to_string(sequence) + " is not an advisory: " + why);
  };
  if (j.is_discarded() || !j.is_object()) return invalid("not a JSON object");
  // json::value() throws on a field of another type: a wrong type is bad input, not a crash.
  auto text = [&j](const char* key) {
    const auto it = j.find(key);
    return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  DeadLetter d;
  d.sequence = sequence;
  const auto type = text("type");
  if (type == "io.nats.jetstream.advisory.v1.terminated") {
    d.kind = "terminated";
  } else if (type == "io.nats.jetstream.advisory.v1.max_deliver") {
    d.kind = "max_deliveries";
  } else {
    return invalid("type '" + type + "'");
  }
  auto number = [&j](const char* key) -> std::optional<uint64_t> {
    const auto it = j.find(key);
    if (it == j.end() || !it->is_number_unsigned()) return std::nullopt;
    return it->get<uint64_t>();
  };
  const auto seq = number("stream_seq");
  if (!seq) return invalid("no stream_seq");
  d.stream_sequence = *seq;
  d.deliveries = number("deliveries").value_or(0);
  d.time = text("timestamp");
  d.stream = text("stream");
  d.consumer = text("consumer");
  d.reason = text("reason");
  return d;
}

std::string format_dead_letters_table(const std::vector<DeadLetter>& letters) {
  std::vector<std::vector<std::string>> rows = {
      {"TIME", "KIND", "STREAM", "SEQ", "DELIVERIES", "BUILD"}};
  bool removed = false;
  for (const auto& d : letters) {
    std::string build;
    if (d.request) {
      build = d.request->build_id() + " (workspace " + d.request->workspace_id() + ")";
    } else {
      build = "(request removed)";
      removed = true;
    }
    rows.push_back({d.time.empty() ? "-" : d.time, d.kind, d.stream.empty() ? "-" : d.stream,
                    std::to_string(d.stream_sequence), std::to_string(d.deliveries), build});
  }
  std::string out = render_table(rows);
  if (removed) {
    out +=
        "(request removed): the scheduler terminated the request on its last delivery, which "
        "takes it out of the work queue. Its FAILED event says why (\"gave up after N "
        "deliveries: ...\"); the scheduler's log names the SEQ (\"giving up on stream seq N\").\n";
  }
  return out;
}

std::string dead_letters_json(const std::vector<DeadLetter>& letters) {
  auto array = nlohmann::json::array();
  for (const auto& d : letters) {
    nlohmann::json o = {{"sequence", d.sequence},
                        {"kind", d.kind},
                        {"time", d.time},
                        {"stream", d.stream},
                        {"consumer", d.consumer},
                        {"stream_sequence", d.stream_sequence},
                        {"deliveries", d.deliveries},
                        {"reason", d.reason},
                        {"request_readable", d.request.has_value()}};
    if (d.request) {
      o["build_id"] = d.request->build_id();
      o["workspace_id"] = d.request->workspace_id();
    }
    array.push_back(std::move(o));
  }
  // Invalid UTF-8 from a foreign advisory is replaced, never thrown.
  return array.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace cvm::cli
