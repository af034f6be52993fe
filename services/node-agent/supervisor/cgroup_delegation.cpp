#include "cgroup_delegation.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

namespace cvm::supervisor {
namespace {

std::vector<std::string_view> fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && line[i] == ' ') ++i;
    const size_t start = i;
    while (i < line.size() && line[i] != ' ') ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      const std::string_view oct = s.substr(i + 1, 3);
      if (oct.find_first_not_of("01234567") == std::string_view::npos) {
        out += static_cast<char>((oct[0] - '0') * 64 + (oct[1] - '0') * 8 + (oct[2] - '0'));
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

std::string join(std::string_view a, std::string_view b) {
  std::string out(a);
  while (!out.empty() && out.back() == '/') out.pop_back();
  if (!b.empty() && b.front() != '/') out += '/';
  out += b;
  return out;
}

}  // namespace

std::vector<CgroupHierarchy> parse_cgroup_mounts(std::string_view mountinfo) {
  std::vector<CgroupHierarchy> out;
  size_t pos = 0;
  while (pos < mountinfo.size()) {
    size_t end = mountinfo.find('\n', pos);
    if (end == std::string_view::npos) end = mountinfo.size();
    const auto f = fields(mountinfo.substr(pos, end - pos));
    pos = end + 1;
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    size_t dash = 0;
    for (size_t i = 6; i < f.size(); ++i) {
      if (f[i] == "-") {
        dash = i;
        break;
      }
    }
    if (dash == 0 || dash + 1 >= f.size()) continue;
    const std::string_view type = f[dash + 1];
    if (type != "cgroup" && type != "cgroup2") continue;
    CgroupHierarchy h;
    h.kind = type == "cgroup2" ? CgroupHierarchy::Kind::kV2 : CgroupHierarchy::Kind::kV1;
    h.root = unescape(f[3]);
    h.mount_point = unescape(f[4]);
    out.push_back(std::move(h));
  }
  return out;
}

std::vector<std::string> delegation_paths(const std::vector<CgroupHierarchy>& hierarchies,
                                          std::string_view cgroup_path) {
  std::vector<std::string> out;
  if (cgroup_path.empty() || cgroup_path.find("..") != std::string_view::npos) return out;
  std::string path(cgroup_path);
  if (path.front() != '/') path.insert(path.begin(), '/');
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  if (path == "/") return out;  // the hierarchy's root is never handed over
  for (const auto& h : hierarchies) {
    // The path is relative to the hierarchy's root; a mount of a subtree (a cgroup namespace's
    // view has root "/") shows only what lies below its own root.
    std::string rel = path;
    if (h.root != "/" && !h.root.empty()) {
      if (path.rfind(h.root + "/", 0) != 0) continue;
      rel = path.substr(h.root.size());
    }
    const std::string dir = join(h.mount_point, rel);
    out.push_back(dir);
    const auto files =
        h.kind == CgroupHierarchy::Kind::kV2
            ? std::vector<std::string_view>{"cgroup.procs", "cgroup.threads",
                                            "cgroup.subtree_control"}
            : std::vector<std::string_view>{"cgroup.procs", "tasks", "cgroup.clone_children",
                                            "notify_on_release"};
    for (auto f : files) out.push_back(join(dir, f));
  }
  return out;
}

std::string apply_delegation(const std::vector<std::string>& paths, uid_t uid, gid_t gid) {
  for (const auto& p : paths) {
    if (::lchown(p.c_str(), uid, gid) != 0 && errno != ENOENT) {
      return "chown " + p + ": " + std::strerror(errno);
    }
  }
  return {};
}

}  // namespace cvm::supervisor
