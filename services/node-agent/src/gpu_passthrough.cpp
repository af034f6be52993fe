#include "cvm/agent/gpu_passthrough.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "file_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;

// KEY=value or KEY="value" from os-release text.
std::string os_release_value(std::string_view text, std::string_view key) {
  for (std::string_view line : detail::trimmed_lines(text)) {
    if (line.size() <= key.size() || line.substr(0, key.size()) != key || line[key.size()] != '=') {
      continue;
    }
    std::string_view value = line.substr(key.size() + 1);
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') &&
        value.back() == value.front()) {
      value = value.substr(1, value.size() - 2);
    }
    return std::string(value);
  }
  return {};
}

bool has_word(const std::string& words, std::string_view word) {
  size_t pos = 0;
  while (pos <= words.size()) {
    size_t end = words.find(' ', pos);
    if (end == std::string::npos) end = words.size();
    if (std::string_view(words).substr(pos, end - pos) == word) return true;
    pos = end + 1;
  }
  return false;
}

bool is_library_name(std::string_view name) {
  return name.rfind("lib", 0) == 0 && name.find(".so") != std::string_view::npos;
}

}  // namespace

std::string image_library_dir(std::string_view os_release, std::string_view machine) {
  const std::string id = os_release_value(os_release, "ID");
  const std::string like = os_release_value(os_release, "ID_LIKE");
  const auto is = [&](std::string_view distro) { return id == distro || has_word(like, distro); };
  if (is("debian") || is("ubuntu")) {
    const std::string arch = machine.empty() ? "x86_64" : std::string(machine);
    return "/usr/lib/" + arch + "-linux-gnu";
  }
  if (is("rhel") || is("fedora") || is("centos") || is("rocky") || is("almalinux") || is("amzn") ||
      is("ol") || is("suse") || is("opensuse")) {
    return "/usr/lib64";
  }
  return "/usr/lib";
}

Result<GpuPassthrough> plan_gpu_passthrough(const GpuPassthroughInput& in) {
  GpuPassthrough out;
  const auto find = [&](const std::string& path) -> const DeviceNode* {
    for (const auto& d : in.present_devices) {
      if (d.path == path) return &d;
    }
    return nullptr;
  };
  std::set<uint32_t> seen;
  for (uint32_t minor : in.minors) {
    if (!seen.insert(minor).second) continue;
    const std::string path = "/dev/nvidia" + std::to_string(minor);
    const DeviceNode* node = find(path);
    if (node == nullptr) {
      return make_error(ErrorDomain::kNotFound, "assigned GPU " + path + " is not on this node");
    }
    out.devices.push_back(*node);
  }
  if (out.devices.empty()) return out;
  for (const char* shared :
       {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"}) {
    if (const DeviceNode* node = find(shared)) out.devices.push_back(*node);
  }
  if (find("/dev/nvidiactl") == nullptr) {
    out.warnings.push_back("/dev/nvidiactl is missing on this node: CUDA will not see the GPUs");
  }
  for (const auto& lib : in.libraries) {
    out.libraries.push_back(BindMount{detail::join_path(in.library_source_dir, lib.target),
                                      detail::join_path(in.image_library_dir, lib.name), true});
  }
  if (in.libraries.empty()) {
    out.warnings.push_back("no NVIDIA driver libraries were found to hand to the workspace");
  }
  std::string visible;
  for (const auto& uuid : in.uuids) visible += (visible.empty() ? "" : ",") + uuid;
  out.env.push_back("NVIDIA_VISIBLE_DEVICES=" + (visible.empty() ? std::string("all") : visible));
  return out;
}

std::vector<DeviceNode> collect_nvidia_devices(const std::string& dev_root) {
  std::vector<DeviceNode> out;
  std::error_code ec;
  for (fs::directory_iterator it(dev_root, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("nvidia", 0) != 0) continue;
    const std::string_view rest = std::string_view(name).substr(6);
    const bool numbered = !rest.empty() && std::all_of(rest.begin(), rest.end(), ::isdigit);
    const bool shared = name == "nvidiactl" || name == "nvidia-uvm" || name == "nvidia-uvm-tools" ||
                        name == "nvidia-modeset";
    if (!numbered && !shared) continue;
    struct stat st {};
    if (::stat(it->path().c_str(), &st) != 0 || !S_ISCHR(st.st_mode)) continue;
    out.push_back(DeviceNode{"/dev/" + name, static_cast<int64_t>(major(st.st_rdev)),
                             static_cast<int64_t>(minor(st.st_rdev)), 0666});
  }
  std::sort(out.begin(), out.end(),
            [](const DeviceNode& a, const DeviceNode& b) { return a.path < b.path; });
  return out;
}

LibraryScan collect_library_files(const std::string& dir) {
  LibraryScan out;
  std::error_code ec;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (is_library_name(name)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    // Follow the link chain by hand: every hop must stay a plain name inside `dir`.
    std::string current = name;
    bool ok = false;
    for (int hop = 0; hop < 40; ++hop) {
      const std::string path = detail::join_path(dir, current);
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0) break;
      if (S_ISREG(st.st_mode)) {
        ok = true;
        break;
      }
      if (!S_ISLNK(st.st_mode)) break;
      std::string target(4096, '\0');
      const ssize_t n = ::readlink(path.c_str(), target.data(), target.size());
      if (n <= 0) break;
      target.resize(static_cast<size_t>(n));
      if (target.rfind("./", 0) == 0) target.erase(0, 2);
      const std::string dir_prefix = fs::path(dir).lexically_normal().string();
      if (target.front() == '/') {
        // An absolute link back into the folder is fine; anything else leaves it.
        const std::string normal = fs::path(target).lexically_normal().string();
        const std::string prefix = dir_prefix.back() == '/' ? dir_prefix : dir_prefix + "/";
        if (normal.rfind(prefix, 0) != 0) break;
        target = normal.substr(prefix.size());
      }
      if (target.empty() || target.find('/') != std::string::npos) break;
      current = target;
    }
    if (ok) {
      out.files.push_back(LibraryFile{name, current});
    } else {
      out.skipped.push_back(name);
    }
  }
  return out;
}

}  // namespace cvm::agent
