#pragma once
// Caching on: a workspace's rootfs is an overlay whose lower layer is the node's cached rootfs of
// the image (unpacked once, identity ownership) seen through an ID-mapped bind mount that shifts
// it into the workspace's range, and whose upper/work dirs belong to the workspace (owned by the
// range's root). Nothing is copied per workspace; writes land in the upper dir.
//
//   <ws>/overlay/lower   transient mount point of the ID-mapped clone (detached again once the
//                        overlay holds its own private clone of it)
//   <ws>/overlay/upper   the workspace's writes
//   <ws>/overlay/work    overlayfs' work dir
//   <ws>/bundle/rootfs   the overlay: what runc (and, through the supervisor's rbind of the
//                        bundle, the supervising container's runc) uses as the rootfs
//
// The decisions (paths, options, which rootfs path to take) are pure; the syscalls are in the
// host functions below, which only root can run.

#include <string>
#include <string_view>
#include <vector>

#include "cvm/agent/id_range.h"
#include "cvm/base/result.h"

namespace cvm::agent {

struct OverlayPlan {
  std::string lower;  // mount point for the ID-mapped clone of `source`
  std::string upper;
  std::string work;
  std::string target;   // the bundle's rootfs
  std::string source;   // the cached rootfs (identity ownership)
  std::string options;  // overlayfs mount data
};

// The overlay of workspace directory `workspace_dir` over cached rootfs `cached_rootfs`.
// kInvalid when a path holds a character overlayfs' option syntax cannot carry (',' ':' '\').
[[nodiscard]] Result<OverlayPlan> plan_workspace_overlay(const std::string& workspace_dir,
                                                         const std::string& cached_rootfs);

// "0 <base> <count>\n": the uid_map / gid_map of the user namespace an ID-mapped mount uses.
[[nodiscard]] std::string id_map_line(IdRange ids);

// What this host can do, found once by probe_idmapped_overlay().
struct IdmapSupport {
  bool supported = false;
  std::string detail;  // why not, or how it was shown
};

enum class RootfsPath { kUnpack, kIdmappedOverlay };
struct RootfsChoice {
  RootfsPath path = RootfsPath::kUnpack;
  std::string note;  // for the build's events: which path was used and why
};
// Caching on and an ID-mapped overlay shown to work here: the overlay. Otherwise a per-workspace
// unpack; with Caching on the note says why the cache could not be shared.
[[nodiscard]] RootfsChoice choose_rootfs_path(bool caching, const IdmapSupport& support);

// Mount points at or below `dir` in /proc/self/mountinfo text (octal escapes decoded), deepest
// first: the order to unmount them in.
[[nodiscard]] std::vector<std::string> mounts_under(std::string_view mountinfo,
                                                    std::string_view dir);

// ---- host (root) ----

// A user namespace whose uid_map and gid_map are `ids` (a short-lived child unshares it, the
// parent writes the maps and opens /proc/<child>/ns/user). The caller closes the fd.
[[nodiscard]] Result<int> open_userns_fd(IdRange ids);

// Creates lower/upper/work (upper and work owned by the range's root) and mounts the overlay of
// `plan` at plan.target, the lower layer being an ID-mapped, read-only clone of plan.source.
// On failure nothing stays mounted.
[[nodiscard]] Status mount_idmapped_overlay(const OverlayPlan& plan, IdRange ids);

// Detaches every mount at or below `dir` (from /proc/self/mountinfo), deepest first.
[[nodiscard]] Status unmount_under(const std::string& dir);

// Shows on real mounts under `scratch_dir` that an overlay over an ID-mapped lower layer works
// here (kernel >= 5.19, a filesystem that allows ID-mapped mounts): a file owned by 0 in the lower
// layer appears owned by the range's base. Leaves nothing behind.
[[nodiscard]] IdmapSupport probe_idmapped_overlay(const std::string& scratch_dir);

}  // namespace cvm::agent
