#include "cvm/agent/launcher.h"

#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cvm/agent/gpu_passthrough.h"
#include "cvm/agent/idmap_mount.h"
#include "cvm/agent/process.h"
#include "cvm/agent/seccomp.h"
#include "cvm/agent/supervisor_spec.h"
#include "file_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using Steady = std::chrono::steady_clock;

using detail::Fd;

double ms_between(Steady::time_point a, Steady::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string tail_of(const std::string& path, size_t bytes = 2000) {
  auto content = detail::read_file(path, 1 << 20);
  if (!content) return {};
  std::string text(detail::trim(*content));
  if (text.size() > bytes) text = "..." + text.substr(text.size() - bytes);
  return text;
}

Result<std::vector<std::string>> shared_libraries(const std::string& binary) {
  ProcessOptions options;
  options.timeout = std::chrono::seconds(10);
  auto r = run_process({"ldd", binary}, options);
  if (!r) return r.error();
  const std::string all = r->out + r->err;
  // A static binary needs nothing else (ldd then exits 1).
  if (all.find("not a dynamic executable") != std::string::npos ||
      all.find("statically linked") != std::string::npos) {
    return std::vector<std::string>{};
  }
  if (!r->success()) {
    return make_error(ErrorDomain::kTool, "ldd " + binary + ": " + tool_error_text(all));
  }
  return parse_ldd_output(r->out);
}

void make_dir(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  // The inner container's mapped root must traverse every directory above its rootfs.
  fs::permissions(path, fs::perms(0755), ec);
}

}  // namespace

Result<SupervisorStatus> parse_supervisor_status(std::string_view text) {
  const auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("state") || !j["state"].is_string()) {
    return make_error(ErrorDomain::kInvalid, "supervisor status is not a status object");
  }
  SupervisorStatus s;
  const std::string state = j["state"].get<std::string>();
  using S = SupervisorStatus::State;
  if (state == "running") {
    s.state = S::kRunning;
  } else if (state == "created") {
    s.state = S::kCreated;
  } else if (state == "failed") {
    s.state = S::kFailed;
  } else if (state == "exited") {
    s.state = S::kExited;
  } else if (state == "stopping") {
    s.state = S::kStopping;
  } else if (state == "stopped") {
    s.state = S::kStopped;
  } else {
    return make_error(ErrorDomain::kInvalid, "supervisor status: unknown state '" + state + "'");
  }
  if (j.contains("pid") && j["pid"].is_number_integer()) s.pid = j["pid"].get<int>();
  if (j.contains("code") && j["code"].is_number_integer()) s.code = j["code"].get<int>();
  if (j.contains("message") && j["message"].is_string()) s.message = j["message"];
  return s;
}

int find_inner_host_pid(const std::string& procfs, int supervisor_pid) {
  if (supervisor_pid <= 0) return 0;
  std::vector<int> children;
  const std::string sup = std::to_string(supervisor_pid);
  if (auto list = detail::read_file(procfs + "/" + sup + "/task/" + sup + "/children")) {
    std::istringstream in(*list);
    for (int pid = 0; in >> pid;) children.push_back(pid);
  } else {
    // Kernels without CONFIG_PROC_CHILDREN: scan for the parent in each stat.
    std::error_code ec;
    for (fs::directory_iterator it(procfs, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
      auto stat = detail::read_file(it->path().string() + "/stat", 4096);
      if (!stat) continue;
      const size_t close = stat->rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream in(stat->substr(close + 1));
      std::string state;
      int ppid = 0;
      in >> state >> ppid;
      if (ppid == supervisor_pid) children.push_back(std::stoi(name));
    }
  }
  for (int child : children) {
    auto status = detail::read_file(procfs + "/" + std::to_string(child) + "/status");
    if (!status) continue;
    const size_t at = status->find("NSpid:");
    if (at == std::string::npos) continue;
    std::istringstream line(status->substr(at + 6, status->find('\n', at) - at - 6));
    std::vector<int> ids;
    for (int id = 0; line >> id;) ids.push_back(id);
    if (ids.size() >= 2 && ids.back() == 1) return child;
  }
  return 0;
}

Result<std::string> find_executable(const std::string& name) {
  const auto usable = [](const std::string& p) { return ::access(p.c_str(), X_OK) == 0; };
  if (name.find('/') != std::string::npos) {
    if (!usable(name)) return make_error(ErrorDomain::kNotFound, name + " is not executable");
    std::error_code ec;
    return fs::absolute(name, ec).lexically_normal().string();
  }
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    if (dir.empty()) continue;
    const std::string candidate = detail::join_path(dir, name);
    if (usable(candidate)) return candidate;
  }
  return make_error(ErrorDomain::kNotFound, name + " not found on PATH");
}

Status remove_tree(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return {};
  // Never walk into a mounted overlay (it would whiteout its way through the shared lower layer's
  // view and fail on the mount point): detach whatever is mounted below first.
  if (auto st = unmount_under(path); !st) return st;
  for (int attempt = 0; attempt < 20; ++attempt) {
    fs::remove_all(path, ec);
    if (!ec && !fs::exists(path, ec)) return {};
    // ENOTEMPTY: an orphaned tool wrote a new entry while the tree was walked.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return make_error(ErrorDomain::kSystem,
                    "cannot remove " + path + (ec ? ": " + ec.message() : std::string()));
}

WorkspaceLauncher::WorkspaceLauncher(LauncherConfig config, OciRuntime& runtime, ImageTool& images)
    : config_(std::move(config)), runtime_(runtime), images_(images) {}

WorkspaceLauncher::~WorkspaceLauncher() {
  if (watch_fd_ >= 0) ::close(watch_fd_);
}

std::string WorkspaceLauncher::container_id(const std::string& workspace_id) {
  return "cvm-" + workspace_id;
}

std::string WorkspaceLauncher::workspace_dir(const std::string& workspace_id) const {
  return detail::join_path(config_.workspaces_dir, workspace_id);
}

std::string WorkspaceLauncher::storage_dir(const std::string& workspace_id) const {
  const std::string root =
      !config_.storage_dir.empty()
          ? config_.storage_dir
          : (fs::path(config_.workspaces_dir).lexically_normal().parent_path() / "storage")
                .string();
  return detail::join_path(root, workspace_id);
}

Status WorkspaceLauncher::prepare_storage(const std::string& workspace_id, IdRange ids) {
  const std::string dir = storage_dir(workspace_id);
  const std::string docker = dir + "/docker";
  std::error_code ec;
  fs::create_directories(docker, ec);
  if (ec) return make_error(ErrorDomain::kSystem, "cannot create " + docker + ": " + ec.message());
  // The storage dir is the node's (the console log is written there by the supervisor); the
  // inner Docker's directory belongs to the workspace's root.
  fs::permissions(dir, fs::perms(0755), ec);
  struct stat st {};
  if (::lstat(docker.c_str(), &st) != 0) {
    return make_error(ErrorDomain::kSystem, docker + ": " + std::strerror(errno));
  }
  if (st.st_uid != ids.base) {
    // Made now, or kept from a life on another ID range: shift what is there onto this one.
    if (auto shifted = shift_tree_ownership(docker, st.st_uid, ids); !shifted) return shifted;
  }
  ::chmod(docker.c_str(), 0710);
  // /etc/hostname and /etc/hosts, the workspace root's to edit: kept when they exist already.
  const std::string etc = dir + "/etc";
  fs::create_directories(etc, ec);
  const std::pair<std::string, std::string> files[] = {{etc + "/hostname", workspace_id + "\n"},
                                                       {etc + "/hosts", etc_hosts(workspace_id)}};
  for (const auto& [path, content] : files) {
    if (fs::exists(path, ec)) continue;
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << content;
      if (!out.flush()) return make_error(ErrorDomain::kSystem, "cannot write " + path);
    }
    if (::chown(path.c_str(), ids.base, ids.base) != 0) {
      return make_error(ErrorDomain::kSystem, "chown " + path + ": " + std::strerror(errno));
    }
  }
  return {};
}

const std::vector<std::string>& lxcfs_files() {
  static const std::vector<std::string> files = {
      "proc/cpuinfo", "proc/diskstats", "proc/loadavg", "proc/meminfo",
      "proc/stat",    "proc/swaps",     "proc/uptime",  "sys/devices/system/cpu/online"};
  return files;
}

std::string unsearchable_ancestor(
    const std::string& path,
    const std::function<std::optional<unsigned>(const std::string&)>& mode_of) {
  fs::path dir = fs::path(path).lexically_normal();
  if (!dir.has_root_directory()) dir = fs::path("/") / dir;
  // From the root down: the highest directory that stops the walk is the one to fix first.
  fs::path walked = "/";
  for (const auto& part : dir.relative_path()) {
    if (part.empty()) continue;
    walked /= part;
    const auto mode = mode_of(walked.string());
    // Not made yet: what is made below here is made 0755.
    if (!mode) return "";
    if ((*mode & S_IXOTH) == 0) {
      char octal[8];
      std::snprintf(octal, sizeof octal, "%04o", *mode & 07777);
      return walked.string() + " is mode " + octal;
    }
  }
  return "";
}

std::string etc_hosts(std::string_view hostname) {
  std::string h(hostname);
  return "127.0.0.1\tlocalhost\n127.0.1.1\t" + h +
         "\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n"
         "ff02::2\tip6-allrouters\n";
}

std::string console_tail(std::string_view console, size_t max_lines, size_t max_bytes) {
  // Strip CSI escape sequences (ESC [ ... final byte) and other ESC pairs, and carriage returns.
  std::string clean;
  clean.reserve(console.size());
  for (size_t i = 0; i < console.size(); ++i) {
    const char c = console[i];
    if (c == '\x1b') {
      if (i + 1 < console.size() && console[i + 1] == '[') {
        i += 2;
        while (i < console.size() && !(console[i] >= 0x40 && console[i] <= 0x7e)) ++i;
      } else {
        ++i;
      }
      continue;
    }
    if (c == '\r') continue;
    clean += c;
  }
  std::vector<std::string_view> lines;
  for (std::string_view line : detail::trimmed_lines(clean)) {
    if (!line.empty()) lines.push_back(line);
  }
  const size_t first = lines.size() > max_lines ? lines.size() - max_lines : 0;
  std::string out;
  for (size_t i = first; i < lines.size(); ++i) {
    if (!out.empty()) out += '\n';
    out += lines[i];
  }
  if (out.size() > max_bytes) out = "..." + out.substr(out.size() - max_bytes);
  return out;
}

InitExit classify_init_exit(const std::optional<SupervisorStatus>& status,
                            std::string_view console) {
  using S = SupervisorStatus::State;
  InitExit out;
  if (status && status->state == S::kExited && is_shutdown_exit(status->code)) {
    out.shutdown = true;
    return out;
  }
  if (status && status->state == S::kExited) {
    out.message = "the workspace's init exited with status " + std::to_string(status->code);
    if (status->code > 128 && status->code < 128 + 65) {
      out.message += " (signal " + std::to_string(status->code - 128) + ")";
    }
  } else if (status && status->state == S::kFailed) {
    out.message = "the supervisor failed: " + status->message;
  } else {
    out.message = "the workspace's container ended without a report";
  }
  if (auto tail = console_tail(console); !tail.empty()) out.message += "; console:\n" + tail;
  return out;
}

bool is_shutdown_exit(int code) {
  return code == 0 || code == 128 + SIGINT || code == 128 + SIGHUP;
}

std::string stop_signal_for_init(std::string_view init_path) {
  const size_t slash = init_path.rfind('/');
  const std::string_view name =
      slash == std::string_view::npos ? init_path : init_path.substr(slash + 1);
  return name == "systemd" ? "RTMIN+3" : "TERM";
}

Status shift_tree_ownership(const std::string& root, uid_t old_base, IdRange ids) {
  const auto shift = [&](uint32_t id) -> uint32_t {
    // IDs of the old range keep their offset; anything else (a fresh directory is the node's
    // root) becomes the range's root.
    if (id >= old_base && id - old_base < ids.count) return ids.base + (id - old_base);
    return ids.base;
  };
  std::vector<std::string> todo = {root};
  while (!todo.empty()) {
    const std::string path = std::move(todo.back());
    todo.pop_back();
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) continue;
    if (::lchown(path.c_str(), shift(st.st_uid), shift(st.st_gid)) != 0) {
      return make_error(ErrorDomain::kSystem, "chown " + path + ": " + std::strerror(errno));
    }
    // chown clears setuid/setgid bits: put them back (never on links).
    if (!S_ISLNK(st.st_mode) && (st.st_mode & (S_ISUID | S_ISGID)) != 0) {
      (void)::chmod(path.c_str(), st.st_mode & 07777);
    }
    if (S_ISDIR(st.st_mode)) {
      std::error_code ec;
      for (fs::directory_iterator it(path, ec); !ec && it != fs::directory_iterator();
           it.increment(ec)) {
        todo.push_back(it->path().string());
      }
    }
  }
  return {};
}

Status WorkspaceLauncher::prepare() {
  prepared_ = false;
  files_.clear();
  auto supervisor = find_executable(config_.supervisor_binary);
  if (!supervisor)
    return make_error(ErrorDomain::kNotFound, "cvm-supervisor: " + supervisor.error().message);
  auto runtime = find_executable(config_.inner_runtime);
  if (!runtime)
    return make_error(ErrorDomain::kNotFound, "inner runtime: " + runtime.error().message);
  config_.supervisor_binary = *supervisor;
  config_.inner_runtime = *runtime;
  // A user-namespaced container's root is an unprivileged host ID: it must be able to walk down
  // to its bundle and storage, or every launch would fail with EACCES inside runc.
  const auto mode_of = [](const std::string& p) -> std::optional<unsigned> {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return std::nullopt;
    return static_cast<unsigned>(st.st_mode);
  };
  for (const auto& dir : {config_.workspaces_dir, config_.storage_dir}) {
    if (dir.empty()) continue;
    if (auto why = unsearchable_ancestor(dir, mode_of); !why.empty()) {
      return make_error(ErrorDomain::kInvalid,
                        why + ": a workspace's mapped root cannot reach " + dir +
                            " (chmod o+x each directory above it, or use another --state-dir)");
    }
  }
  files_.push_back(*runtime);
  for (const auto& binary : {*runtime, *supervisor}) {
    auto libs = shared_libraries(binary);
    if (!libs) return libs.error();
    for (const auto& lib : *libs) {
      if (std::find(files_.begin(), files_.end(), lib) == files_.end()) files_.push_back(lib);
    }
  }
  prepared_ = true;
  (void)idmap_support();  // probed now, not on the first launch with Caching on
  return {};
}

LaunchOutcome WorkspaceLauncher::fail(const std::string& workspace_id, cvm::v1::Reason reason,
                                      std::string message, LaunchOutcome out) {
  // Leave no half-made container, no mount and no bundle behind.
  if (runtime_.maybe_exists(container_id(workspace_id))) {
    (void)runtime_.remove(container_id(workspace_id), true);
  }
  (void)remove_tree(workspace_dir(workspace_id));
  out.ok = false;
  out.reason = reason;
  out.message = std::move(message);
  return out;
}

const IdmapSupport& WorkspaceLauncher::idmap_support() {
  if (!idmap_) {
    const std::string scratch =
        images_.cache_dir().empty() ? config_.workspaces_dir : images_.cache_dir();
    idmap_ = probe_idmapped_overlay(scratch);
  }
  return *idmap_;
}

Result<UnpackedImage> WorkspaceLauncher::overlay_rootfs(const LaunchRequest& r,
                                                        const std::string& bundle) {
  auto cached = images_.cached_rootfs(r.image);
  if (!cached) return cached.error();
  make_dir(bundle);
  auto plan = plan_workspace_overlay(workspace_dir(r.workspace_id), cached->rootfs);
  if (!plan) return plan.error();
  if (auto st = mount_idmapped_overlay(*plan, r.ids); !st) {
    (void)unmount_under(workspace_dir(r.workspace_id));
    return st.error();
  }
  UnpackedImage image;
  image.bundle = bundle;
  image.rootfs = plan->target;
  image.has_sbin_init = cached->has_sbin_init;
  image.tmp_files = cached->tmp_files;
  image.env = cached->config.env;
  image.args = cached->config.args;
  image.cwd = cached->config.cwd;
  image.cache_hit = cached->cache_hit;
  return image;
}

LaunchOutcome WorkspaceLauncher::launch(const LaunchRequest& r,
                                        const StartingCallback& on_starting) {
  LaunchOutcome out;
  const auto t0 = Steady::now();
  const std::string dir = workspace_dir(r.workspace_id);
  const std::string bundle = dir + "/bundle";
  // A container or files from an earlier life of this workspace would make runc refuse; this
  // START replaces them. (No runtime call when there is certainly no container: it costs a runc.)
  if (runtime_.maybe_exists(container_id(r.workspace_id))) {
    (void)runtime_.remove(container_id(r.workspace_id), true);
  }
  if (auto st = remove_tree(dir); !st) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
  }
  make_dir(dir);
  // Before anything starts (the supervisor, the STARTING event): a workspace never runs without
  // the filter it was meant to have.
  auto seccomp = workspace_seccomp(config_.seccomp_profile);
  if (!seccomp) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, seccomp.error().message, std::move(out));
  }
  if (r.cvm && !prepared_) {
    if (auto st = prepare(); !st) {
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR,
                  "cannot run a supervising container: " + st.error().message, std::move(out));
    }
  }

  const auto t_rootfs = Steady::now();
  IdmapSupport support{false, "no node image cache is configured"};
  if (r.caching && !images_.cache_dir().empty()) support = idmap_support();
  RootfsChoice choice = choose_rootfs_path(r.caching, support);
  PendingRootfs rootfs;
  if (choice.path == RootfsPath::kIdmappedOverlay) {
    auto overlay = overlay_rootfs(r, bundle);
    if (overlay) {
      rootfs = ready_rootfs(std::move(*overlay));
    } else if (overlay.error().is_not_found() || overlay.error().domain == ErrorDomain::kInvalid ||
               overlay.error().domain == ErrorDomain::kTool) {
      // The image itself is missing or unusable: unpacking it would fail the same way.
      return fail(r.workspace_id, cvm::v1::IMAGE_UNAVAILABLE,
                  "image " + r.image + ": " + overlay.error().message, std::move(out));
    } else {
      // The mount failed on this workspace: the per-workspace unpack still works.
      choice = choose_rootfs_path(true, IdmapSupport{false, overlay.error().message});
      if (auto st = remove_tree(bundle); !st) {
        return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
      }
    }
  }
  if (!rootfs.valid()) {
    // Resolving reads the manifest and config: a missing image fails here, before any runtime.
    auto resolved = images_.resolve(r.image, bundle, r.caching);
    if (!resolved) {
      return fail(r.workspace_id, cvm::v1::IMAGE_UNAVAILABLE,
                  "image " + r.image + ": " + resolved.error().message, std::move(out));
    }
    if (r.cvm && r.gpus.empty()) {
      // The layers are applied while the supervising container starts: it needs nothing of the
      // image until its runtime creates the inner container, and waits for config.json, which
      // is written once they are.
      rootfs = std::async(std::launch::async, [this, resolved = std::move(*resolved), ids = r.ids] {
        return images_.extract(resolved, ids);
      });
    } else {
      rootfs = ready_rootfs(images_.extract(*resolved, r.ids));
    }
  }
  out.rootfs_note = choice.note;
  if (r.caching && choice.path == RootfsPath::kUnpack) out.warnings.push_back(choice.note);
  spdlog::debug("launch {}: cleanup {:.1f} ms, rootfs {} {:.1f} ms ({})", r.workspace_id,
                ms_between(t0, t_rootfs),
                rootfs.wait_for(std::chrono::seconds(0)) == std::future_status::ready
                    ? "ready in"
                    : "unpacking in the background, started in",
                ms_between(t_rootfs, Steady::now()),
                choice.path == RootfsPath::kIdmappedOverlay ? "ID-mapped overlay" : "unpack");
  if (!r.cvm) {
    auto image = rootfs.get();
    if (!image) {
      return fail(r.workspace_id, cvm::v1::IMAGE_UNAVAILABLE,
                  "image " + r.image + ": " + image.error().message, std::move(out));
    }
    note_image(*image, out);
    return launch_plain(r, *image, *seccomp, on_starting, std::move(out));
  }
  return launch_cvm(r, rootfs, *seccomp, on_starting, std::move(out));
}

WorkspaceLauncher::PendingRootfs WorkspaceLauncher::ready_rootfs(Result<UnpackedImage> image) {
  std::promise<Result<UnpackedImage>> p;
  p.set_value(std::move(image));
  return p.get_future();
}

void WorkspaceLauncher::note_image(const UnpackedImage& image, LaunchOutcome& out) {
  if (!image.tmp_files.empty()) {
    out.warnings.push_back("the image has " + std::to_string(image.tmp_files.size()) +
                           " file(s) under /tmp (e.g. " + image.tmp_files.front() +
                           "): they are gone once the CVM is built");
  }
}

namespace {}  // namespace

Result<std::optional<nlohmann::json>> workspace_seccomp(const std::string& setting) {
  if (setting == kUnconfined) return std::optional<nlohmann::json>();
  if (setting.empty()) {
    auto built_in = parse_seccomp_profile(default_seccomp_profile());
    if (!built_in) return built_in.error();
    return std::optional<nlohmann::json>(std::move(*built_in));
  }
  auto text = detail::read_file(setting, 4 << 20);
  if (!text) {
    return make_error(ErrorDomain::kInvalid, "seccomp profile " + setting +
                                                 ": cannot read it (missing, unreadable or over "
                                                 "4 MiB)");
  }
  auto parsed = parse_seccomp_profile(*text);
  if (!parsed) {
    return make_error(ErrorDomain::kInvalid, setting + ": " + parsed.error().message);
  }
  return std::optional<nlohmann::json>(std::move(*parsed));
}

namespace {

// The inner (or plain) container's spec, GPUs included.
Result<SpecInput> workspace_spec(const LauncherConfig& config, const LaunchRequest& r,
                                 const UnpackedImage& image,
                                 const std::optional<nlohmann::json>& seccomp,
                                 std::vector<std::string>& warnings, bool lxcfs = false) {
  SpecInput in;
  in.hostname = r.workspace_id;
  in.has_sbin_init = image.has_sbin_init;
  in.env = image.env;
  in.cwd = image.cwd.empty() ? "/" : image.cwd;
  in.ids = r.ids;
  in.capability_profile = r.cvm ? CapabilityProfile::kSystemContainer : CapabilityProfile::kDocker;
  in.host_cap_bounding = config.host_cap_bounding;
  in.host_nofile_hard = config.host_nofile_hard;
  in.cgroups_path = r.cvm ? std::string(kInnerCgroupsPath)
                          : "/cvm/" + WorkspaceLauncher::container_id(r.workspace_id);
  in.memory_limit_bytes = r.memory_bytes;
  in.cpu_millicores = r.cpu_millicores;
  in.cpuset = r.cpuset;
  in.tun = r.tun;
  in.fuse = r.fuse;
  in.seccomp = seccomp;
  if (r.cvm) {
    // A machine: systemd as PID 1 with its console, setuid programs (sudo, su) allowed, and the
    // inner Docker's storage on the workspace's own storage (overlay2 cannot stack on the
    // overlay rootfs, and images must outlive a STOP).
    in.machine = true;
    in.console = true;
    in.no_new_privileges = false;
    in.binds.push_back(BindMount{std::string(kSupervisorStorageDir) + "/docker", "/var/lib/docker",
                                 /*read_only=*/false, /*nosuid=*/false});
    // The machine's name and its resolution are the workspace's, whatever the image says.
    for (const char* f : {"hostname", "hosts", "resolv.conf"}) {
      in.binds.push_back(BindMount{std::string(kSupervisorStorageDir) + "/etc/" + f,
                                   std::string("/etc/") + f, /*read_only=*/false});
    }
    // The workspace's own memory, CPU and uptime in /proc (lxcfs, through the supervisor).
    if (lxcfs) {
      for (const auto& f : lxcfs_files()) {
        if (::access((config.lxcfs_dir + "/" + f).c_str(), R_OK) != 0) continue;
        in.binds.push_back(
            BindMount{std::string(kSupervisorLxcfsDir) + "/" + f, "/" + f, /*read_only=*/true});
      }
    }
    // How the supervisor stops this init (it reads the inner spec; runc ignores annotations).
    std::string init;
    if (image.has_sbin_init) {
      if (auto resolved = resolve_in_rootfs(image.rootfs, "/sbin/init")) init = *resolved;
    }
    in.annotations[std::string(kStopSignalAnnotation)] = stop_signal_for_init(init);
  }
  in.annotations["io.cvm.workspace"] = r.workspace_id;
  in.annotations["io.cvm.build"] = r.build_id;
  if (!r.gpus.empty()) {
    GpuPassthroughInput g;
    for (const auto& gpu : r.gpus) {
      g.minors.push_back(gpu.minor);
      g.uuids.push_back(gpu.uuid);
    }
    g.present_devices = collect_nvidia_devices(config.dev_root);
    if (!config.gpu_library_dir.empty()) {
      LibraryScan scan = collect_library_files(config.gpu_library_dir);
      g.libraries = std::move(scan.files);
      for (const auto& s : scan.skipped) {
        warnings.push_back("GPU library " + s + " skipped: its link leaves " +
                           config.gpu_library_dir + " or dangles");
      }
    }
    g.library_source_dir = r.cvm ? std::string(kSupervisorGpuLibDir) : config.gpu_library_dir;
    std::string os_release;
    if (auto p = resolve_in_rootfs(image.rootfs, "/etc/os-release")) {
      os_release = detail::read_file(*p, 64 * 1024).value_or("");
    } else if (auto q = resolve_in_rootfs(image.rootfs, "/usr/lib/os-release")) {
      os_release = detail::read_file(*q, 64 * 1024).value_or("");
    }
    g.image_library_dir = image_library_dir(os_release, config.machine);
    auto plan = plan_gpu_passthrough(g);
    if (!plan) return plan.error();
    in.devices = plan->devices;
    in.binds.insert(in.binds.end(), plan->libraries.begin(), plan->libraries.end());
    in.env.insert(in.env.end(), plan->env.begin(), plan->env.end());
    warnings.insert(warnings.end(), plan->warnings.begin(), plan->warnings.end());
  }
  return in;
}

}  // namespace

LaunchOutcome WorkspaceLauncher::launch_plain(const LaunchRequest& r, const UnpackedImage& image,
                                              const Seccomp& seccomp,
                                              const StartingCallback& on_starting,
                                              LaunchOutcome out) {
  const std::string dir = workspace_dir(r.workspace_id);
  const std::string id = container_id(r.workspace_id);
  auto in = workspace_spec(config_, r, image, seccomp, out.warnings);
  if (!in) return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, in.error().message, std::move(out));
  if (auto st = write_runtime_spec(image.bundle, build_runtime_spec(*in)); !st) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
  }
  if (on_starting) on_starting(out.rootfs_note);
  if (r.may_start && !r.may_start()) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, "launch withdrawn", std::move(out));
  }
  const std::string log = dir + "/runc.log";
  Status started = runtime_.run_detached(id, image.bundle, log);
  if (!started) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, started.error().message, std::move(out));
  }
  auto state = runtime_.state(id);
  if (!state || state->status != ContainerStatus::kRunning) {
    std::string why = state ? "the container exited right after it started: " + tail_of(log)
                            : state.error().message;
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, std::move(why), std::move(out));
  }
  out.ok = true;
  out.pid = state->pid;
  return out;
}

LaunchOutcome WorkspaceLauncher::launch_cvm(const LaunchRequest& r, PendingRootfs& rootfs,
                                            const Seccomp& seccomp,
                                            const StartingCallback& on_starting,
                                            LaunchOutcome out) {
  const auto t_specs0 = Steady::now();
  const std::string dir = workspace_dir(r.workspace_id);
  // lxcfs: bound into the supervisor, its files onto the inner /proc and /sys (added to the inner
  // spec below, or by workspace_spec when the spec is written later).
  bool lxcfs = false;
  if (!config_.lxcfs_dir.empty()) {
    lxcfs = ::access((config_.lxcfs_dir + "/proc/meminfo").c_str(), R_OK) == 0;
    if (!lxcfs) {
      out.warnings.push_back("lxcfs is not mounted at " + config_.lxcfs_dir +
                             ": free, top and uptime in the workspace show the node's figures");
    }
  }
  const std::string id = container_id(r.workspace_id);
  // Waits for the rootfs (every path out of here must: a background unpack writes into `dir`).
  std::optional<UnpackedImage> image;
  std::optional<SpecInput> in;
  const auto take_image = [&]() -> std::optional<Error> {
    if (image) return std::nullopt;
    auto got = rootfs.get();
    if (!got) return got.error();
    image = std::move(*got);
    note_image(*image, out);
    auto spec = workspace_spec(config_, r, *image, seccomp, out.warnings, lxcfs);
    if (!spec) return spec.error();
    in = std::move(*spec);
    return std::nullopt;
  };
  const auto write_inner = [&]() -> Status {
    return write_runtime_spec(image->bundle, build_runtime_spec(*in));
  };
  // GPUs: the devices of the plan depend on the image (its library folder); and a rootfs that is
  // already there (the overlay) is written out before the runtime starts.
  if (!r.gpus.empty() || rootfs.wait_for(std::chrono::seconds(0)) == std::future_status::ready) {
    if (auto e = take_image()) {
      const auto reason = in || !image ? cvm::v1::IMAGE_UNAVAILABLE : cvm::v1::RUNTIME_ERROR;
      return fail(
          r.workspace_id, reason,
          (reason == cvm::v1::IMAGE_UNAVAILABLE ? "image " + r.image + ": " : "") + e->message,
          std::move(out));
    }
    if (auto st = write_inner(); !st) {
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
    }
  }

  const std::string sup_bundle = dir + "/supervisor";
  const std::string run_dir = dir + "/run";
  make_dir(sup_bundle + "/rootfs");
  make_dir(run_dir);
  SupervisorSpecInput s;
  s.hostname = r.workspace_id;
  s.files = files_;
  s.supervisor_binary = config_.supervisor_binary;
  s.runtime_binary = config_.inner_runtime;
  s.inner_bundle = dir + "/bundle";
  s.run_dir = run_dir;
  if (auto st = prepare_storage(r.workspace_id, r.ids); !st) {
    (void)take_image();
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
  }
  s.storage_dir = storage_dir(r.workspace_id);
  if (lxcfs) s.lxcfs_dir = config_.lxcfs_dir;
  WorkspaceNetwork* network =
      config_.network != nullptr && config_.network->ready() ? config_.network : nullptr;
  if (network != nullptr) {
    s.network_wait = config_.ready_timeout;
  } else if (config_.network != nullptr) {
    // Turned off by the admin (no network configured), the node status says so; broken, each
    // build says so too.
    out.warnings.push_back("no network: the workspace has only lo (" +
                           config_.network->ready().error().message + ")");
  }
  {
    // Rewritten at each start: the node's resolvers may have changed since the last one.
    const std::string resolv = s.storage_dir + "/etc/resolv.conf";
    const std::string text =
        network != nullptr
            ? network->workspace_resolv_conf()
            : resolv_conf(detail::read_file("/etc/resolv.conf", 65536).value_or(""), {}, {});
    std::ofstream f(resolv, std::ios::binary | std::ios::trunc);
    f << text;
    if (!f.flush() || ::chown(resolv.c_str(), r.ids.base, r.ids.base) != 0) {
      (void)take_image();
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, "cannot write " + resolv, std::move(out));
    }
  }
  s.console_log_max_bytes = config_.console_log_max_bytes;
  if (!r.gpus.empty()) s.gpu_library_dir = config_.gpu_library_dir;
  for (const auto& row : supervisor_host_paths(r.caching, r.auto_load_shiftfs)) {
    const std::string source = detail::join_path(config_.host_paths_root, row.path);
    std::error_code ec;
    if (!fs::exists(source, ec)) {
      out.warnings.push_back("this node has no " + row.path +
                             ": the supervising container runs without it");
      continue;
    }
    s.host_paths.push_back({source, row});
  }
  s.extra_binds = config_.supervisor_extra_binds;
  s.stop_grace = config_.stop_grace;
  s.bundle_wait = config_.ready_timeout;
  s.cgroups_path = "/cvm/" + id;
  s.memory_limit_bytes = r.memory_bytes;
  s.cpu_millicores = r.cpu_millicores;
  s.cpuset = r.cpuset;
  if (r.tun) s.devices.push_back(tun_device());
  if (r.fuse) s.devices.push_back(fuse_device());
  if (in) s.devices.insert(s.devices.end(), in->devices.begin(), in->devices.end());
  s.host_cap_bounding = config_.host_cap_bounding;
  s.host_nofile_hard = config_.host_nofile_hard;
  s.annotations["io.cvm.workspace"] = r.workspace_id;
  s.annotations["io.cvm.build"] = r.build_id;
  s.annotations["io.cvm.role"] = "supervisor";
  if (auto st = write_runtime_spec(sup_bundle, build_supervisor_spec(s)); !st) {
    (void)take_image();
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
  }

  const auto t_specs = Steady::now();
  if (on_starting) on_starting(out.rootfs_note);
  if (r.may_start && !r.may_start()) {
    (void)take_image();
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, "launch withdrawn", std::move(out));
  }
  const auto t_run = Steady::now();
  const std::string log = dir + "/runc.log";
  // The supervisor's pid from runc's --pid-file: no `runc state` on the launch path. Whether it
  // keeps running is what wait_ready watches (a pidfd), so nothing else is asked of runc.
  auto supervisor_pid = runtime_.run_detached_pid(id, sup_bundle, log);
  const auto t_ran = Steady::now();
  if (!image) {
    // The background unpack: join it whatever happened to the runtime.
    const bool started = supervisor_pid.ok();
    if (auto e = take_image()) {
      return fail(r.workspace_id, image ? cvm::v1::RUNTIME_ERROR : cvm::v1::IMAGE_UNAVAILABLE,
                  (image ? "" : "image " + r.image + ": ") + e->message, std::move(out));
    }
    if (started) {
      if (auto st = write_inner(); !st) {
        return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, st.error().message, std::move(out));
      }
    }
  }
  if (!supervisor_pid) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, supervisor_pid.error().message,
                std::move(out));
  }
  const auto t_ready = Steady::now();
  auto status = wait_ready(r.workspace_id, *supervisor_pid, config_.ready_timeout,
                           /*until_created=*/network != nullptr);
  if (status && status->state == SupervisorStatus::State::kCreated) {
    // The inner container exists, its init waits: give its namespace the interface, then let
    // it go on.
    const int inner = find_inner_host_pid("/proc", *supervisor_pid);
    Result<Attachment> attached =
        inner > 0 ? network->attach(r.workspace_id, "/proc/" + std::to_string(inner) + "/ns/net")
                  : Result<Attachment>(make_error(ErrorDomain::kNotFound,
                                                  "the inner container's init was not found"));
    if (!attached) {
      (void)stop(r.workspace_id);
      (void)network->detach(r.workspace_id);
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, "network: " + attached.error().message,
                  std::move(out));
    }
    out.address = attached->address;
    spdlog::info("launch {}: eth0 {} via {} ({})", r.workspace_id, attached->address,
                 attached->gateway, attached->host_interface);
    const std::string ready = run_dir + "/network-ready";
    if (std::ofstream f(ready); !f) {
      (void)stop(r.workspace_id);
      (void)network->detach(r.workspace_id);
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, "cannot write " + ready, std::move(out));
    }
    status = wait_ready(r.workspace_id, *supervisor_pid, config_.ready_timeout);
  }
  spdlog::debug(
      "launch {}: specs {:.1f} ms, on_starting {:.1f} ms, runc run {:.1f} ms, rootfs "
      "wait {:.1f} ms, supervisor report {:.1f} ms",
      r.workspace_id, ms_between(t_specs0, t_specs), ms_between(t_specs, t_run),
      ms_between(t_run, t_ran), ms_between(t_ran, t_ready), ms_between(t_ready, Steady::now()));
  if (!status) {
    return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, status.error().message, std::move(out));
  }
  using S = SupervisorStatus::State;
  switch (status->state) {
    case S::kRunning:
      out.ok = true;
      out.pid = *supervisor_pid;
      return out;
    case S::kFailed:
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, status->message, std::move(out));
    default: {
      std::string why = "the workspace's init exited (status " + std::to_string(status->code) +
                        ") right after it started";
      if (auto t = tail_of(run_dir + "/inner.log"); !t.empty()) why += ": " + t;
      if (auto t = tail_of(console_log(r.workspace_id)); !t.empty()) why += "; console: " + t;
      return fail(r.workspace_id, cvm::v1::RUNTIME_ERROR, std::move(why), std::move(out));
    }
  }
}

Result<SupervisorStatus> WorkspaceLauncher::wait_ready(const std::string& workspace_id,
                                                       int supervisor_pid,
                                                       std::chrono::milliseconds timeout,
                                                       bool until_created) {
  const std::string run_dir = workspace_dir(workspace_id) + "/run";
  const std::string path = run_dir + "/status.json";
  std::error_code ec;
  if (!fs::exists(path, ec) &&
      !fs::exists(workspace_dir(workspace_id) + "/bundle/config.json", ec)) {
    // The supervisor waits for the inner bundle, which the launch writes once the rootfs is
    // complete: a launch that never got there (an agent killed while unpacking) will not run.
    return make_error(ErrorDomain::kTool, "the launch had not finished preparing the rootfs");
  }
  const auto read_status = [&]() -> std::optional<SupervisorStatus> {
    auto text = detail::read_file(path, 64 * 1024);
    if (!text) return std::nullopt;
    auto s = parse_supervisor_status(*text);
    if (!s) return std::nullopt;
    return *s;
  };
  // inotify wakes us when the supervisor renames its status into place; the pidfd when the
  // supervisor dies without a word. No polling loop. The instance is the launcher's (see
  // watch_fd_); events left from an earlier wait only cause one more look at the status.
  std::lock_guard watch_lock(watch_mu_);
  if (watch_fd_ < 0) watch_fd_ = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  const int wd = watch_fd_ >= 0
                     ? ::inotify_add_watch(watch_fd_, run_dir.c_str(), IN_MOVED_TO | IN_CLOSE_WRITE)
                     : -1;
  struct Unwatch {
    int fd;
    int wd;
    ~Unwatch() {
      if (wd >= 0) (void)::inotify_rm_watch(fd, wd);
    }
  } unwatch{watch_fd_, wd};
  const int watch = wd >= 0 ? watch_fd_ : -1;
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, supervisor_pid, 0)));
  const bool gone_at_start = pidfd.get() < 0 && errno == ESRCH;
  const auto deadline = Steady::now() + timeout;
  for (;;) {
    if (auto s = read_status(); s && s->state != SupervisorStatus::State::kStarting &&
                                (until_created || s->state != SupervisorStatus::State::kCreated)) {
      // How long the report waited to be read (its mtime is the supervisor's rename): the
      // wake-up latency of this thread, which the raw baseline has too.
      struct stat st {};
      if (::stat(path.c_str(), &st) == 0) {
        timespec now{};
        ::clock_gettime(CLOCK_REALTIME, &now);
        spdlog::debug("launch {}: supervisor report read {:.2f} ms after it was written",
                      workspace_id,
                      static_cast<double>(now.tv_sec - st.st_mtim.tv_sec) * 1e3 +
                          static_cast<double>(now.tv_nsec - st.st_mtim.tv_nsec) / 1e6);
      }
      return *s;
    }
    pollfd fds[2] = {{watch, POLLIN, 0}, {pidfd.get(), POLLIN, 0}};
    if (gone_at_start || (pidfd.get() >= 0 && ::poll(&fds[1], 1, 0) > 0)) {
      if (auto s = read_status(); s) return *s;
      std::string why = "the supervising container exited without a report";
      if (auto t = tail_of(workspace_dir(workspace_id) + "/runc.log"); !t.empty()) {
        why += ": " + t;
      }
      return make_error(ErrorDomain::kTool, why);
    }
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count();
    if (left <= 0) {
      return make_error(ErrorDomain::kTimeout, "the supervisor did not report within " +
                                                   std::to_string(timeout.count() / 1000) + " s");
    }
    // Without inotify (or a pidfd), wake up now and then to look again.
    const int wait_ms = watch >= 0 && pidfd.get() >= 0
                            ? static_cast<int>(left)
                            : static_cast<int>(std::min<int64_t>(left, 100));
    (void)::poll(fds, 2, wait_ms);
    char buf[4096];
    while (watch >= 0 && ::read(watch, buf, sizeof buf) > 0) {
    }
  }
}

InitExit WorkspaceLauncher::exit_report(const std::string& workspace_id) const {
  std::optional<SupervisorStatus> status;
  if (auto text = detail::read_file(workspace_dir(workspace_id) + "/run/status.json", 64 * 1024)) {
    if (auto parsed = parse_supervisor_status(*text)) status = *parsed;
  }
  // The end of the log is what matters: read at most its last 64 KiB.
  std::string console;
  if (auto text = detail::read_file(console_log(workspace_id), 1 << 20)) {
    console = text->size() > 65536 ? text->substr(text->size() - 65536) : *text;
  }
  return classify_init_exit(status, console);
}

Status WorkspaceLauncher::stop(const std::string& workspace_id) {
  // A CVM's supervisor spends up to stop_grace on the inner container before it exits.
  const auto grace = config_.stop_grace + std::chrono::seconds(5);
  Status st = stop_container(runtime_, container_id(workspace_id), grace);
  if (!st && st.error().is_not_found()) return {};
  return st;
}

Status WorkspaceLauncher::remove(const std::string& workspace_id, bool remove_files) {
  Status st = runtime_.remove(container_id(workspace_id), true);
  if (!st && !st.error().is_not_found()) return st;
  if (config_.network != nullptr) {
    // Kept on record when it fails (a plugin gone, iptables locked): the next remove or the
    // agent's reconcile tries again. The workspace's own stop does not wait on it.
    if (auto released = config_.network->detach(workspace_id); !released) {
      spdlog::warn("workspace {}: releasing its network: {}", workspace_id,
                   released.error().message);
    }
  }
  if (remove_files) {
    if (auto removed = remove_tree(workspace_dir(workspace_id)); !removed) return removed;
    // Deleted: the workspace's own storage (its Docker images, its console log) goes with it.
    return remove_tree(storage_dir(workspace_id));
  }
  // Stopped: the files (the overlay's upper dir) stay, nothing stays mounted.
  return unmount_under(workspace_dir(workspace_id));
}

}  // namespace cvm::agent
