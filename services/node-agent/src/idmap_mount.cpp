#include "cvm/agent/idmap_mount.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "file_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;

std::string errno_text(int e) { return std::strerror(e); }

Error sys_error(const std::string& what, int e) {
  return make_error(ErrorDomain::kSystem, what + ": " + errno_text(e), e);
}

// mountinfo escapes ' ', '\t', '\n' and '\' as \ooo.
std::string unescape_mountinfo(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() &&
        std::all_of(s.begin() + static_cast<long>(i) + 1, s.begin() + static_cast<long>(i) + 4,
                    [](char c) { return c >= '0' && c <= '7'; })) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

Status write_text(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return sys_error("open " + path, errno);
  const ssize_t n = ::write(fd, text.data(), text.size());
  const int e = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) return sys_error("write " + path, n < 0 ? e : EIO);
  return {};
}

std::string canonical_dir(const std::string& dir) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(dir, ec), ec);
  std::string s = p.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

}  // namespace

Result<OverlayPlan> plan_workspace_overlay(const std::string& workspace_dir,
                                           const std::string& cached_rootfs) {
  OverlayPlan p;
  const std::string overlay = detail::join_path(workspace_dir, "overlay");
  p.lower = detail::join_path(overlay, "lower");
  p.upper = detail::join_path(overlay, "upper");
  p.work = detail::join_path(overlay, "work");
  p.target = detail::join_path(workspace_dir, "bundle/rootfs");
  p.source = cached_rootfs;
  for (const std::string* path : {&p.lower, &p.upper, &p.work}) {
    if (path->find_first_of(",:\\") != std::string::npos) {
      return make_error(ErrorDomain::kInvalid, "overlay path " + *path +
                                                   " holds ',', ':' or '\\', which overlayfs' "
                                                   "mount options cannot carry");
    }
  }
  p.options = "lowerdir=" + p.lower + ",upperdir=" + p.upper + ",workdir=" + p.work;
  return p;
}

std::string id_map_line(IdRange ids) {
  return "0 " + std::to_string(ids.base) + " " + std::to_string(ids.count) + "\n";
}

RootfsChoice choose_rootfs_path(bool caching, const IdmapSupport& support) {
  if (!caching)
    return {RootfsPath::kUnpack, "rootfs: image unpacked for this workspace (Caching off)"};
  if (support.supported) {
    return {RootfsPath::kIdmappedOverlay,
            "rootfs: the node's cached image through an ID-mapped overlay (Caching on)"};
  }
  return {RootfsPath::kUnpack,
          "rootfs: image unpacked for this workspace: Caching is on but this node cannot share its "
          "image cache through ID-mapped mounts (" +
              support.detail + ")"};
}

std::vector<std::string> mounts_under(std::string_view mountinfo, std::string_view dir) {
  std::vector<std::string> out;
  std::string prefix(dir);
  while (prefix.size() > 1 && prefix.back() == '/') prefix.pop_back();
  size_t pos = 0;
  while (pos < mountinfo.size()) {
    size_t end = mountinfo.find('\n', pos);
    if (end == std::string_view::npos) end = mountinfo.size();
    const std::string_view line = mountinfo.substr(pos, end - pos);
    pos = end + 1;
    // id parent major:minor root mount-point ...
    size_t field_start = 0;
    std::string_view field;
    for (int i = 0; i < 5; ++i) {
      const size_t sp = line.find(' ', field_start);
      field = line.substr(field_start,
                          sp == std::string_view::npos ? std::string_view::npos : sp - field_start);
      if (sp == std::string_view::npos && i < 4) {
        field = {};
        break;
      }
      field_start = sp + 1;
    }
    if (field.empty()) continue;
    std::string mp = unescape_mountinfo(field);
    if (mp == prefix || (mp.size() > prefix.size() && mp.compare(0, prefix.size(), prefix) == 0 &&
                         (prefix == "/" || mp[prefix.size()] == '/'))) {
      out.push_back(std::move(mp));
    }
  }
  // A mount below another has the longer path; stacked mounts come out in the order listed, the
  // later (upper) one first.
  std::reverse(out.begin(), out.end());
  std::stable_sort(out.begin(), out.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  return out;
}

Result<int> open_userns_fd(IdRange ids) {
  int ready[2];
  int go[2];
  if (::pipe2(ready, O_CLOEXEC) != 0) return sys_error("pipe2", errno);
  if (::pipe2(go, O_CLOEXEC) != 0) {
    const int e = errno;
    ::close(ready[0]);
    ::close(ready[1]);
    return sys_error("pipe2", e);
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
    return sys_error("fork", e);
  }
  if (pid == 0) {
    // Only async-signal-safe calls here: the agent is multi-threaded.
    ::close(ready[0]);
    ::close(go[1]);
    if (::unshare(CLONE_NEWUSER) != 0) _exit(1);
    char c = 'u';
    if (::write(ready[1], &c, 1) != 1) _exit(1);
    (void)::read(go[0], &c, 1);  // until the parent has opened the namespace
    _exit(0);
  }
  ::close(ready[1]);
  ::close(go[0]);
  char c = 0;
  ssize_t n = 0;
  do {
    n = ::read(ready[0], &c, 1);
  } while (n < 0 && errno == EINTR);
  ::close(ready[0]);
  Result<int> out = make_error(ErrorDomain::kSystem, "the user namespace child failed to unshare");
  if (n == 1) {
    const std::string proc = "/proc/" + std::to_string(pid);
    Status st = write_text(proc + "/uid_map", id_map_line(ids));
    if (st) st = write_text(proc + "/gid_map", id_map_line(ids));
    if (!st) {
      out = st.error();
    } else {
      const int fd = ::open((proc + "/ns/user").c_str(), O_RDONLY | O_CLOEXEC);
      out = fd >= 0 ? Result<int>(fd) : Result<int>(sys_error("open " + proc + "/ns/user", errno));
    }
  }
  ::close(go[1]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return out;
}

Status mount_idmapped_overlay(const OverlayPlan& plan, IdRange ids) {
  struct stat src {};
  if (::stat(plan.source.c_str(), &src) != 0) return sys_error("stat " + plan.source, errno);
  for (const auto& dir : {plan.lower, plan.upper, plan.work, plan.target}) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return make_error(ErrorDomain::kSystem, "mkdir " + dir + ": " + ec.message());
  }
  // The overlay's root takes the upper dir's owner and mode: the image root's mode, owned by the
  // workspace's root. The work dir belongs to the range's root too (nothing of the host's).
  for (const auto& dir : {plan.upper, plan.work}) {
    if (::chown(dir.c_str(), ids.base, ids.base) != 0) return sys_error("chown " + dir, errno);
  }
  if (::chmod(plan.upper.c_str(), src.st_mode & 07777) != 0) {
    return sys_error("chmod " + plan.upper, errno);
  }
  ::chmod(plan.lower.c_str(), 0700);

  auto userns = open_userns_fd(ids);
  if (!userns) return userns.error();
  const int tree = ::open_tree(AT_FDCWD, plan.source.c_str(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
  if (tree < 0) {
    const int e = errno;
    ::close(*userns);
    return sys_error("open_tree " + plan.source, e);
  }
  mount_attr attr{};
  attr.attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY;
  attr.userns_fd = static_cast<uint64_t>(*userns);
  int rc = ::mount_setattr(tree, "", AT_EMPTY_PATH, &attr, sizeof attr);
  int e = errno;
  ::close(*userns);
  if (rc != 0) {
    ::close(tree);
    return sys_error("mount_setattr(MOUNT_ATTR_IDMAP) on " + plan.source, e);
  }
  rc = ::move_mount(tree, "", AT_FDCWD, plan.lower.c_str(), MOVE_MOUNT_F_EMPTY_PATH);
  e = errno;
  ::close(tree);
  if (rc != 0) return sys_error("move_mount to " + plan.lower, e);
  rc = ::mount("overlay", plan.target.c_str(), "overlay", 0, plan.options.c_str());
  e = errno;
  // overlayfs holds private clones of its layers: the ID-mapped mount point is not needed once
  // the overlay is up (and is not left behind when it is not).
  (void)::umount2(plan.lower.c_str(), MNT_DETACH);
  if (rc != 0) return sys_error("mount overlay at " + plan.target + " (" + plan.options + ")", e);
  return {};
}

Status unmount_under(const std::string& dir) {
  const auto info = detail::read_file("/proc/self/mountinfo", 64 << 20);
  if (!info) return make_error(ErrorDomain::kSystem, "cannot read /proc/self/mountinfo");
  for (const auto& mp : mounts_under(*info, canonical_dir(dir))) {
    if (::umount2(mp.c_str(), MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT) {
      return sys_error("umount " + mp, errno);
    }
  }
  return {};
}

IdmapSupport probe_idmapped_overlay(const std::string& scratch_dir) {
  std::error_code ec;
  fs::create_directories(scratch_dir, ec);
  std::string dir = detail::join_path(scratch_dir, ".idmap-probe.XXXXXX");
  if (::mkdtemp(dir.data()) == nullptr) return {false, "mkdtemp " + dir + ": " + errno_text(errno)};
  IdmapSupport out;
  const std::string source = dir + "/image";
  fs::create_directories(source, ec);
  { std::ofstream(source + "/probe") << "x"; }
  constexpr IdRange kProbe{3000000000u, 65536};
  auto plan = plan_workspace_overlay(dir + "/ws", source);
  if (!plan) {
    out.detail = plan.error().message;
  } else if (auto st = mount_idmapped_overlay(*plan, kProbe); !st) {
    out.detail = st.error().message;
  } else {
    struct stat seen {};
    if (::stat((plan->target + "/probe").c_str(), &seen) != 0) {
      out.detail = "the overlay does not show the lower layer: " + errno_text(errno);
    } else if (seen.st_uid != kProbe.base) {
      out.detail = "the ID-mapped lower layer shows uid " + std::to_string(seen.st_uid) +
                   ", not the mapped " + std::to_string(kProbe.base);
    } else {
      out.supported = true;
      out.detail = "overlay over an ID-mapped lower layer works here";
    }
  }
  (void)unmount_under(dir);
  fs::remove_all(dir, ec);
  return out;
}

}  // namespace cvm::agent
