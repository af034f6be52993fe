#pragma once
// Trees compared entry by entry, for tests that check an unpacked rootfs against `umoci unpack`'s:
// names, types, permission bits, owners, link targets, device numbers, sizes and xattrs.

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace cvm::test {

// One entry of a tree, as compared.
inline std::string describe(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return "<lstat failed>";
  std::ostringstream out;
  const char type = S_ISDIR(st.st_mode)    ? 'd'
                    : S_ISLNK(st.st_mode)  ? 'l'
                    : S_ISREG(st.st_mode)  ? 'f'
                    : S_ISCHR(st.st_mode)  ? 'c'
                    : S_ISBLK(st.st_mode)  ? 'b'
                    : S_ISFIFO(st.st_mode) ? 'p'
                                           : '?';
  out << type << " " << std::oct << (st.st_mode & 07777) << std::dec << " " << st.st_uid << ":"
      << st.st_gid;
  if (S_ISREG(st.st_mode)) out << " size=" << st.st_size;
  if (S_ISLNK(st.st_mode)) out << " -> " << std::filesystem::read_symlink(path).string();
  if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
    out << " dev=" << ::major(st.st_rdev) << "," << ::minor(st.st_rdev);
  }
  // xattrs (names and values), sorted.
  std::string names(65536, '\0');
  const ssize_t n = ::llistxattr(path.c_str(), names.data(), names.size());
  std::vector<std::string> attrs;
  for (ssize_t i = 0; n > 0 && i < n;) {
    const std::string name(names.data() + i);
    i += static_cast<ssize_t>(name.size()) + 1;
    // POSIX ACLs are not applied by cvm-unpack (umoci copies their user and group IDs unshifted,
    // so they would name IDs outside the workspace's range): a known, documented difference.
    if (name.rfind("system.posix_acl_", 0) == 0) continue;
    std::string value(4096, '\0');
    const ssize_t v = ::lgetxattr(path.c_str(), name.c_str(), value.data(), value.size());
    attrs.push_back(name + "=" + (v >= 0 ? value.substr(0, static_cast<size_t>(v)) : "?"));
  }
  std::sort(attrs.begin(), attrs.end());
  for (const auto& a : attrs) out << " [" << a << "]";
  return out.str();
}

inline std::map<std::string, std::string> tree(const std::string& root) {
  std::map<std::string, std::string> out;
  out["."] = describe(root);
  std::error_code ec;
  for (std::filesystem::recursive_directory_iterator
           it(root, std::filesystem::directory_options::none, ec),
       end;
       !ec && it != end; it.increment(ec)) {
    out[it->path().lexically_relative(root).string()] = describe(it->path().string());
  }
  return out;
}

// The differences between two trees, one line each (at most 40).
inline std::string diff(const std::map<std::string, std::string>& ours,
                        const std::map<std::string, std::string>& theirs) {
  std::ostringstream out;
  int shown = 0;
  for (const auto& [path, what] : theirs) {
    auto it = ours.find(path);
    if (it == ours.end()) {
      out << "missing in ours: " << path << " (" << what << ")\n";
    } else if (it->second != what) {
      out << path << ": ours " << it->second << ", umoci " << what << "\n";
    } else {
      continue;
    }
    if (++shown == 40) return out.str() + "...\n";
  }
  for (const auto& [path, what] : ours) {
    if (!theirs.contains(path)) {
      out << "only in ours: " << path << " (" << what << ")\n";
      if (++shown == 40) return out.str() + "...\n";
    }
  }
  return out.str();
}

}  // namespace cvm::test
