#include "cvm/agent/image.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <thread>

#include <nlohmann/json.hpp>

#include "cvm/agent/layer_unpack.h"
#include "cvm/agent/process.h"
#include "file_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

bool valid_tag(std::string_view tag) {
  if (tag.empty() || tag.size() > 128) return false;
  const auto ok = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
  };
  return std::all_of(tag.begin(), tag.end(), ok) && tag.front() != '.' && tag.front() != '-';
}

std::string temp_base(const std::string& configured) {
  if (!configured.empty()) return configured;
  const char* tmp = std::getenv("TMPDIR");
  return tmp && *tmp ? tmp : "/tmp";
}

Result<std::string> make_temp_dir(const std::string& parent, const std::string& prefix) {
  std::error_code ec;
  fs::create_directories(parent, ec);
  std::string templ = detail::join_path(parent, prefix + "XXXXXX");
  if (::mkdtemp(templ.data()) == nullptr) {
    return make_error(ErrorDomain::kSystem, "mkdtemp " + templ + ": " + std::strerror(errno),
                      errno);
  }
  return templ;
}

// The container's root is an unprivileged host UID (neither owner nor group of the agent's
// directories), so runc fails with a bare "permission denied" when any directory above the rootfs
// lacks the others-execute bit. Checking up front names the culprit.
Status check_traversable(const fs::path& dir) {
  std::error_code ec;
  const fs::path absolute = fs::absolute(dir, ec);
  if (ec) return {};
  for (fs::path p = absolute.parent_path(); !p.empty(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) == 0 && (st.st_mode & S_IXOTH) == 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      return make_error(ErrorDomain::kInvalid,
                        "bundle " + dir.string() + ": parent " + p.string() + " is mode " + mode +
                            "; the container's mapped root needs o+x on every parent");
    }
    if (p == p.root_path()) break;
  }
  return {};
}

}  // namespace

Result<LayoutImage> ImageTool::run_unpack(const std::string& layout, const std::string& tag,
                                          const std::string& rootfs, IdRange ids) {
  auto image = read_layout_image(layout, tag);
  if (!image) return image.error();
  std::string helper = options_.tools.unpack;
  if (helper.empty()) {
    std::error_code ec;
    const fs::path self = fs::read_symlink("/proc/self/exe", ec);
    const std::string next = (self.parent_path() / "cvm-unpack").string();
    helper = !ec && ::access(next.c_str(), X_OK) == 0 ? next : "cvm-unpack";
  }
  ProcessOptions popts;
  popts.timeout = options_.unpack_timeout;
  auto r = run_process({helper, "--layout", layout, "--tag", tag, "--rootfs", rootfs, "--id-base",
                        std::to_string(ids.base), "--id-count", std::to_string(ids.count)},
                       popts);
  if (!r) return r.error();
  if (!r->success()) {
    std::string why(detail::trim(r->err));
    if (why.empty()) why = helper + " exited with " + std::to_string(r->exit_code);
    return make_error(r->exit_code == 3 ? ErrorDomain::kNotFound : ErrorDomain::kInvalid, why);
  }
  return image;
}

Result<ImageRef> parse_image_ref(std::string_view ref) {
  ImageRef out;
  const auto invalid = [&](const std::string& why) {
    return make_error(ErrorDomain::kInvalid, "image '" + std::string(ref) + "': " + why);
  };
  if (ref.rfind("oci:", 0) == 0) {
    std::string_view rest = ref.substr(4);
    out.kind = ImageRef::Kind::kOciLayout;
    out.tag = "latest";
    // The tag follows the last ':' unless that part is a path (tags have no '/').
    const size_t colon = rest.rfind(':');
    if (colon != std::string_view::npos &&
        rest.substr(colon + 1).find('/') == std::string_view::npos) {
      out.tag = std::string(rest.substr(colon + 1));
      rest = rest.substr(0, colon);
    }
    if (rest.empty()) return invalid("no layout path");
    if (!valid_tag(out.tag)) return invalid("bad tag '" + out.tag + "'");
    out.layout = std::string(rest);
    return out;
  }
  if (ref.rfind("docker://", 0) == 0) {
    if (ref.size() == 9) return invalid("no image name");
    out.kind = ImageRef::Kind::kDocker;
    out.source = std::string(ref);
    return out;
  }
  if (ref.empty() || ref.find("://") != std::string_view::npos) {
    return invalid("expected oci:PATH[:TAG] or docker://NAME[:TAG]");
  }
  // In a bare reference a ':' before the first '/' can only be a registry port
  // ("localhost:5000/img"); anything else there is another transport ("dir:/x",
  // "containers-storage:x/y"), which is not ours to guess at.
  const size_t slash = ref.find('/');
  if (slash != std::string_view::npos) {
    const std::string_view host = ref.substr(0, slash);
    const size_t colon = host.find(':');
    if (colon != std::string_view::npos &&
        (colon + 1 == host.size() ||
         host.substr(colon + 1).find_first_not_of("0123456789") != std::string_view::npos)) {
      return invalid("unsupported transport; expected oci:PATH[:TAG] or docker://NAME[:TAG]");
    }
  }
  // A bare registry reference ("debian:12", "ghcr.io/x/y:tag") means docker://, as podman does.
  out.kind = ImageRef::Kind::kDocker;
  out.source = "docker://" + std::string(ref);
  return out;
}

std::string cache_tag(std::string_view source) {
  if (source.rfind("docker://", 0) == 0) source.remove_prefix(9);
  std::string tag;
  for (char c : source) {
    tag +=
        std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ? c : '_';
  }
  // FNV-1a: "a/b:c" and "a_b_c" sanitize alike; the hash of the exact text tells them apart.
  uint64_t h = 1469598103934665603ULL;
  for (char c : source) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ULL;
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  if (tag.size() > 110) tag.resize(110);
  while (!tag.empty() && (tag.front() == '.' || tag.front() == '-')) tag.erase(0, 1);
  return (tag.empty() ? std::string("image") : tag) + "-" + hex;
}

bool layout_index_has_tag(std::string_view index_json, std::string_view tag) {
  const json index = json::parse(index_json, nullptr, /*allow_exceptions=*/false);
  if (!index.is_object() || !index.contains("manifests") || !index["manifests"].is_array()) {
    return false;
  }
  for (const auto& m : index["manifests"]) {
    if (!m.is_object() || !m.contains("annotations") || !m["annotations"].is_object()) continue;
    const auto& a = m["annotations"];
    const auto name = a.find("org.opencontainers.image.ref.name");
    if (name != a.end() && name->is_string() && name->get<std::string>() == tag) return true;
  }
  return false;
}

Result<ImageTool::LocalImage> ImageTool::fetch(const ImageRef& ref, bool cache) {
  if (ref.kind == ImageRef::Kind::kOciLayout) return LocalImage{ref.layout, ref.tag, "", false};

  if (cache && !options_.cache_dir.empty()) {
    const std::string layout = detail::join_path(options_.cache_dir, "layout");
    const std::string tag = cache_tag(ref.source);
    if (const auto index = detail::read_file(detail::join_path(layout, "index.json"))) {
      if (layout_index_has_tag(*index, tag)) return LocalImage{layout, tag, "", true};
    }
    std::error_code ec;
    fs::create_directories(options_.cache_dir, ec);
    std::vector<std::string> argv = {options_.tools.skopeo, "copy", "--quiet"};
    argv.insert(argv.end(), options_.skopeo_copy_args.begin(), options_.skopeo_copy_args.end());
    argv.push_back(ref.source);
    argv.push_back("oci:" + layout + ":" + tag);
    ProcessOptions popts;
    popts.timeout = options_.pull_timeout;
    auto pulled = run_tool(argv, popts);
    if (!pulled) return pulled.error();
    return LocalImage{layout, tag, "", false};
  }

  auto staging = make_temp_dir(temp_base(options_.staging_dir), "cvm-pull.");
  if (!staging) return staging.error();
  const std::string layout = detail::join_path(*staging, "layout");
  std::vector<std::string> argv = {options_.tools.skopeo, "copy", "--quiet"};
  argv.insert(argv.end(), options_.skopeo_copy_args.begin(), options_.skopeo_copy_args.end());
  argv.push_back(ref.source);
  argv.push_back("oci:" + layout + ":image");
  ProcessOptions popts;
  popts.timeout = options_.pull_timeout;
  auto pulled = run_tool(argv, popts);
  if (!pulled) {
    std::error_code ec;
    fs::remove_all(*staging, ec);
    return pulled.error();
  }
  return LocalImage{layout, "image", *staging, false};
}

Result<ImageTool::Resolved> ImageTool::resolve(const std::string& image_ref,
                                               const std::string& bundle_dir, bool cache) {
  auto ref = parse_image_ref(image_ref);
  if (!ref) return ref.error();
  std::error_code ec;
  if (fs::exists(bundle_dir, ec) && !fs::is_empty(bundle_dir, ec)) {
    return make_error(ErrorDomain::kConflict, "bundle " + bundle_dir + " exists and is not empty");
  }
  if (const fs::path parent = fs::path(bundle_dir).parent_path(); !parent.empty()) {
    fs::create_directories(parent, ec);
  }
  if (auto st = check_traversable(bundle_dir); !st) return st.error();

  auto local = fetch(*ref, cache);
  if (!local) return local.error();
  Resolved out;
  out.local = *local;
  out.bundle = bundle_dir;
  // The manifest and config now: a missing tag or a broken image fails before anything starts.
  auto image = read_layout_image(local->layout, local->tag);
  if (!image) {
    if (!local->cleanup.empty()) fs::remove_all(local->cleanup, ec);
    return image.error();
  }
  out.config = image->config;
  fs::create_directories(bundle_dir, ec);
  // The container's root (a mapped, unprivileged host ID) must be able to traverse the bundle.
  if (::chmod(bundle_dir.c_str(), 0755) != 0) {
    const int e = errno;
    if (!local->cleanup.empty()) fs::remove_all(local->cleanup, ec);
    return make_error(ErrorDomain::kSystem, "chmod " + bundle_dir + ": " + std::strerror(e), e);
  }
  return out;
}

Result<UnpackedImage> ImageTool::extract(const Resolved& image, IdRange ids) {
  if (ids.count == 0) return make_error(ErrorDomain::kInvalid, "unpack: empty ID range");
  const std::string rootfs = detail::join_path(image.bundle, "rootfs");
  auto unpacked = run_unpack(image.local.layout, image.local.tag, rootfs, ids);
  // Staged pulls go once the layers are applied, whatever the outcome.
  std::error_code ec;
  if (!image.local.cleanup.empty()) fs::remove_all(image.local.cleanup, ec);
  if (!unpacked) return unpacked.error();
  UnpackedImage out;
  out.bundle = image.bundle;
  out.rootfs = rootfs;
  out.has_sbin_init = rootfs_has_sbin_init(out.rootfs);
  out.cache_hit = image.local.cache_hit;
  out.tmp_files = rootfs_tmp_files(out.rootfs);
  out.env = unpacked->config.env;
  out.args = unpacked->config.args;
  out.cwd = unpacked->config.cwd;
  return out;
}

Result<UnpackedImage> ImageTool::unpack(const std::string& image_ref, const std::string& bundle_dir,
                                        IdRange ids, bool cache) {
  if (ids.count == 0) return make_error(ErrorDomain::kInvalid, "unpack: empty ID range");
  auto resolved = resolve(image_ref, bundle_dir, cache);
  if (!resolved) return resolved.error();
  return extract(*resolved, ids);
}

Result<CachedRootfs> ImageTool::cached_rootfs(const std::string& image_ref) {
  auto ref = parse_image_ref(image_ref);
  if (!ref) return ref.error();
  if (options_.cache_dir.empty()) {
    return make_error(ErrorDomain::kInvalid, "no node image cache is configured");
  }
  auto local = fetch(*ref, /*cache=*/true);
  if (!local) return local.error();
  const auto cleanup = [&] {
    std::error_code ec;
    if (!local->cleanup.empty()) fs::remove_all(local->cleanup, ec);
  };
  // Keyed by the manifest digest: a retagged image is a new entry, the same image under two names
  // one entry.
  auto image = read_layout_image(local->layout, local->tag);
  if (!image) {
    cleanup();
    return image.error();
  }
  const std::string hex = image->manifest_digest.substr(image->manifest_digest.find(':') + 1);
  const std::string root = detail::join_path(options_.cache_dir, "rootfs");
  const std::string entry = detail::join_path(root, hex);
  CachedRootfs out;
  out.rootfs = detail::join_path(entry, "rootfs");
  out.digest = image->manifest_digest;
  out.config = image->config;
  std::error_code ec;
  if (fs::is_directory(out.rootfs, ec)) {
    out.cache_hit = true;
  } else {
    // Unpacked aside and renamed into place: a killed agent never leaves a half rootfs that a
    // later build would take for the image. The cache root is 0700: the rootfs keeps the image's
    // real owners (setuid root binaries too), which no host user may reach.
    fs::create_directories(root, ec);
    ::chmod(options_.cache_dir.c_str(), 0700);
    ::chmod(root.c_str(), 0700);
    auto tmp = make_temp_dir(root, ".tmp-" + hex.substr(0, 12) + ".");
    if (!tmp) {
      cleanup();
      return tmp.error();
    }
    auto unpacked =
        run_unpack(local->layout, local->tag, *tmp + "/rootfs", IdRange{0, kDefaultIdRangeWidth});
    cleanup();
    if (!unpacked) {
      fs::remove_all(*tmp, ec);
      return unpacked.error();
    }
    fs::rename(*tmp, entry, ec);
    if (ec) {
      fs::remove_all(*tmp, ec);
      if (!fs::is_directory(out.rootfs, ec)) {
        return make_error(ErrorDomain::kSystem, "cannot place " + entry + " in the image cache");
      }
    }
  }
  cleanup();
  out.has_sbin_init = rootfs_has_sbin_init(out.rootfs);
  out.tmp_files = rootfs_tmp_files(out.rootfs);
  return out;
}

void ImageTool::remove_unfinished_cache_entries() {
  std::error_code ec;
  const std::string root = detail::join_path(options_.cache_dir, "rootfs");
  for (fs::directory_iterator it(root, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    if (it->path().filename().string().rfind(".tmp-", 0) == 0) {
      // The cvm-unpack of a killed agent dies with it (PR_SET_PDEATHSIG), but may still be
      // finishing a syscall while this walk runs: an entry it creates meanwhile makes the last
      // rmdir fail (ENOTEMPTY). Walk again until the tree is gone (1 s at most).
      for (int attempt = 0; attempt < 20; ++attempt) {
        std::error_code rm;
        fs::remove_all(it->path(), rm);
        if (!fs::exists(it->path(), rm)) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  }
}

Status write_runtime_spec(const std::string& bundle_dir, const nlohmann::json& spec) {
  // Write-then-rename: a crash never leaves runc a half-written config.json.
  const std::string path = detail::join_path(bundle_dir, "config.json");
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return make_error(ErrorDomain::kSystem, "cannot write " + tmp);
    out << spec.dump(2) << '\n';
    if (!out.flush()) return make_error(ErrorDomain::kSystem, "cannot write " + tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return make_error(ErrorDomain::kSystem, "rename " + tmp + ": " + ec.message());
  return {};
}

Result<std::string> resolve_in_rootfs(const std::string& rootfs, const std::string& path) {
  constexpr int kMaxLinks = 40;      // as the kernel's ELOOP limit
  std::vector<std::string> pending;  // components still to walk, in reverse order
  const auto push_path = [&](std::string_view p) {
    std::vector<std::string> parts;
    size_t pos = 0;
    while (pos <= p.size()) {
      size_t end = p.find('/', pos);
      if (end == std::string_view::npos) end = p.size();
      if (end > pos) parts.emplace_back(p.substr(pos, end - pos));
      pos = end + 1;
    }
    pending.insert(pending.end(), parts.rbegin(), parts.rend());
  };
  push_path(path);
  std::vector<std::string> resolved;  // components below rootfs, all existing, no links
  int links = 0;
  while (!pending.empty()) {
    std::string part = std::move(pending.back());
    pending.pop_back();
    if (part == ".") continue;
    if (part == "..") {
      if (!resolved.empty()) resolved.pop_back();  // ".." at the root stays at the root
      continue;
    }
    std::string host = rootfs;
    for (const auto& r : resolved) host = detail::join_path(host, r);
    host = detail::join_path(host, part);
    struct stat st {};
    if (::lstat(host.c_str(), &st) != 0) {
      return make_error(ErrorDomain::kNotFound, path + ": " + std::strerror(errno));
    }
    if (!S_ISLNK(st.st_mode)) {
      resolved.push_back(std::move(part));
      continue;
    }
    if (++links > kMaxLinks) return make_error(ErrorDomain::kInvalid, path + ": symlink loop");
    std::string target(static_cast<size_t>(std::max<off_t>(st.st_size, 255)) + 1, '\0');
    const ssize_t n = ::readlink(host.c_str(), target.data(), target.size());
    if (n < 0) return make_error(ErrorDomain::kSystem, host + ": " + std::strerror(errno));
    target.resize(static_cast<size_t>(n));
    if (!target.empty() && target.front() == '/') resolved.clear();
    push_path(target);
  }
  std::string out = rootfs;
  for (const auto& r : resolved) out = detail::join_path(out, r);
  return out;
}

bool rootfs_has_sbin_init(const std::string& rootfs) {
  const auto init = resolve_in_rootfs(rootfs, "/sbin/init");
  if (!init) return false;
  struct stat st {};
  return ::stat(init->c_str(), &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111) != 0;
}

std::vector<std::string> rootfs_tmp_files(const std::string& rootfs, size_t limit) {
  std::vector<std::string> out;
  const auto tmp = resolve_in_rootfs(rootfs, "/tmp");
  if (!tmp) return out;
  std::error_code ec;
  fs::directory_iterator it(*tmp, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
    out.push_back("/tmp/" + it->path().filename().string());
  }
  std::sort(out.begin(), out.end());
  if (out.size() > limit) out.resize(limit);
  return out;
}

}  // namespace cvm::agent
