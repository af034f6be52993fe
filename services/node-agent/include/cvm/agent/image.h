#pragma once
// Image reference -> OCI runtime bundle whose rootfs is owned by the workspace's ID range.
//
//   oci:PATH[:TAG]        an OCI image layout on this host (TAG defaults to "latest")
//   docker://NAME[:TAG]   pulled with skopeo into a temporary OCI layout first
//
// The layers are applied natively (layer_unpack.h: libarchive, ownership shifted into the range as
// it is written, digests checked), so files owned by container root belong to the range's base on
// the host. The image's env/cwd/args come from its config; the caller writes config.json
// (write_runtime_spec). With Caching on and ID-mapped mounts, cached_rootfs() instead keeps one
// rootfs per image (identity ownership) that every workspace shares (idmap_mount.h).

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "cvm/agent/id_range.h"
#include "cvm/agent/layer_unpack.h"
#include "cvm/agent/tool_paths.h"
#include "cvm/base/result.h"

namespace cvm::agent {

struct ImageRef {
  enum class Kind { kOciLayout, kDocker };
  Kind kind = Kind::kOciLayout;
  std::string layout;  // kOciLayout: the layout directory
  std::string tag;     // kOciLayout: the tag in it
  std::string source;  // kDocker: the skopeo source, "docker://..."
};

// kInvalid for anything but the two forms above.
[[nodiscard]] Result<ImageRef> parse_image_ref(std::string_view ref);

struct UnpackedImage {
  std::string bundle;
  std::string rootfs;
  bool has_sbin_init = false;
  std::vector<std::string> tmp_files;  // under /tmp in the image: gone once the CVM is built
  // From the image config.
  std::vector<std::string> env;
  std::vector<std::string> args;
  std::string cwd = "/";
  bool cache_hit = false;  // a docker:// image found in the node cache (no pull)
};

struct ImageToolOptions {
  ToolPaths tools;
  // Where pulled images are staged when they are not cached; empty: the system temp dir.
  std::string staging_dir;
  // The node cache (Caching on): one OCI image layout (content-addressed blobs shared by every
  // image) under /var/lib by default; each pulled reference is a tag in it, reused by later builds.
  std::string cache_dir;
  // Extra `skopeo copy` flags, e.g. {"--src-tls-verify=false"} for a plain-HTTP test registry.
  std::vector<std::string> skopeo_copy_args;
  std::chrono::milliseconds unpack_timeout{std::chrono::minutes(10)};
  std::chrono::milliseconds pull_timeout{std::chrono::minutes(10)};
};

// An image unpacked once into the node cache, identity ownership (Caching on).
struct CachedRootfs {
  std::string rootfs;  // <cache>/rootfs/<manifest hex>/rootfs
  std::string digest;  // the manifest's
  OciImageConfig config;
  bool has_sbin_init = false;
  std::vector<std::string> tmp_files;
  bool cache_hit = false;  // already unpacked by an earlier build
};

class ImageTool {
 public:
  explicit ImageTool(ImageToolOptions options) : options_(std::move(options)) {}

  // Unpacks into `bundle_dir` (created, must not exist or be empty; made 0755 so the mapped
  // container root can traverse it). A missing image is kNotFound (skopeo's own message for a
  // failed pull); a corrupt or unsafe layer kInvalid.
  // With `cache` (the Caching setting), a docker:// image is taken from / kept in the node cache;
  // without it, it is pulled into a staging layout that is removed after unpacking.
  [[nodiscard]] Result<UnpackedImage> unpack(const std::string& image_ref,
                                             const std::string& bundle_dir, IdRange ids,
                                             bool cache = false);

  // The local OCI layout holding `ref`: the layout itself for oci:, the cache or a fresh staging
  // layout (named in `cleanup`, which the caller removes) for docker://.
  struct LocalImage {
    std::string layout;
    std::string tag;
    std::string cleanup;  // a directory to remove after unpacking; empty: nothing to remove
    bool cache_hit = false;
  };
  [[nodiscard]] Result<LocalImage> fetch(const ImageRef& ref, bool cache = false);

  // unpack() in two steps, so that a launch can start the supervising container while the layers
  // are applied: resolve() fetches the image and reads its manifest and config (a missing image
  // fails here) and creates the bundle directory; extract() applies the layers into
  // <bundle>/rootfs and removes a staged pull.
  struct Resolved {
    LocalImage local;
    std::string bundle;
    OciImageConfig config;
  };
  [[nodiscard]] Result<Resolved> resolve(const std::string& image_ref,
                                         const std::string& bundle_dir, bool cache = false);
  [[nodiscard]] Result<UnpackedImage> extract(const Resolved& image, IdRange ids);

  // The image's rootfs in the node cache, unpacked now unless an earlier build did (Caching on).
  [[nodiscard]] Result<CachedRootfs> cached_rootfs(const std::string& image_ref);
  // Removes cache entries a killed agent was unpacking (at start).
  void remove_unfinished_cache_entries();
  [[nodiscard]] const std::string& cache_dir() const { return options_.cache_dir; }

 private:
  // Runs cvm-unpack (the layers of `tag` onto `rootfs`, shifted into `ids`); the image's config.
  Result<LayoutImage> run_unpack(const std::string& layout, const std::string& tag,
                                 const std::string& rootfs, IdRange ids);
  ImageToolOptions options_;
};

// The cache tag of a docker:// source: its name with every character outside [A-Za-z0-9_.-] made
// '_', plus a hash of the exact source so two references never share a tag (at most 128 chars).
[[nodiscard]] std::string cache_tag(std::string_view source);

// Whether an OCI layout's index.json text names `tag` (org.opencontainers.image.ref.name).
[[nodiscard]] bool layout_index_has_tag(std::string_view index_json, std::string_view tag);

// Writes config.json into the bundle (replacing umoci's).
[[nodiscard]] Status write_runtime_spec(const std::string& bundle_dir, const nlohmann::json& spec);

// Whether <rootfs>/sbin/init is an executable file, following symlinks inside the rootfs (an
// absolute link such as /sbin/init -> /lib/systemd/systemd resolves against the rootfs, never
// the host).
[[nodiscard]] bool rootfs_has_sbin_init(const std::string& rootfs);

// Entries under <rootfs>/tmp, as container paths ("/tmp/x"), sorted, at most `limit`.
[[nodiscard]] std::vector<std::string> rootfs_tmp_files(const std::string& rootfs,
                                                        size_t limit = 50);

// `path` (absolute, as seen in the container) resolved against `rootfs` with symlinks followed
// inside it; kNotFound when a component is missing, kInvalid on a symlink loop.
[[nodiscard]] Result<std::string> resolve_in_rootfs(const std::string& rootfs,
                                                    const std::string& path);

}  // namespace cvm::agent
