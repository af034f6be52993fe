#pragma once
// Native image unpack: an OCI image layout's layers applied in order onto a rootfs with libarchive,
// ownership shifted into a workspace's ID range as it is written. Replaces `umoci unpack`, which
// also writes an mtree manifest of the whole tree (the larger part of its time on the launch path).
//
// Safety: every entry path is normalized and refused when absolute or when it climbs out ("..");
// libarchive is asked for the same (ARCHIVE_EXTRACT_SECURE_NODOTDOT / _NOABSOLUTEPATHS) and refuses
// to write through a symlink on disk (_SECURE_SYMLINKS: the symlink-then-file attack). Whiteouts
// (`.wh.NAME`, `.wh..wh..opq`) are applied by us and never through a symlink. Each blob's sha256 is
// checked against its descriptor while it is read (a layer whose digest does not match fails the
// unpack; the caller removes the half-made rootfs).
//
// The parsers are pure; apply_layer / unpack_layout_image touch the host and live in library
// agent_unpack (libarchive), which only cvm-unpack (the child process the agent runs) and the
// tests link.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/agent/id_range.h"
#include "cvm/base/result.h"

namespace cvm::agent {

struct OciDescriptor {
  std::string media_type;
  std::string digest;  // "sha256:<64 hex>"
  int64_t size = -1;
};

struct OciManifest {
  OciDescriptor config;
  std::vector<OciDescriptor> layers;
};

// What the launch takes from the image config.
struct OciImageConfig {
  std::vector<std::string> env;
  std::vector<std::string> args;  // Entrypoint + Cmd
  std::string cwd = "/";
};

// The manifest descriptor tagged `tag` (annotation org.opencontainers.image.ref.name) in an
// index.json; kNotFound when no manifest has the tag, kInvalid when the text is not an index.
[[nodiscard]] Result<OciDescriptor> find_tagged_manifest(std::string_view index_json,
                                                         std::string_view tag);
[[nodiscard]] Result<OciManifest> parse_oci_manifest(std::string_view manifest_json);
[[nodiscard]] Result<OciImageConfig> parse_oci_image_config(std::string_view config_json);

// <layout>/blobs/sha256/<hex>; kInvalid unless `digest` is "sha256:" + 64 lowercase hex digits
// (nothing else may reach a path).
[[nodiscard]] Result<std::string> oci_blob_path(std::string_view layout, std::string_view digest);

// A layer entry's path relative to the rootfs, "" for the root itself ("./", ".", "/"). Leading
// "./" and '/' and repeated '/' are dropped: an absolute name ("/etc/passwd", "/" from `umoci
// insert ... /`) is taken from the rootfs, as umoci, containerd and Docker take it. kInvalid for
// any ".." component (refused rather than clamped: no real tool writes one).
[[nodiscard]] Result<std::string> normalize_layer_path(std::string_view name);

// An OCI whiteout entry (normalized path): kFile removes `target` from the lower layers, kOpaque
// hides everything the lower layers have under directory `target` ("" is the root).
struct Whiteout {
  enum class Kind { kNone, kFile, kOpaque };
  Kind kind = Kind::kNone;
  std::string target;
};
[[nodiscard]] Whiteout classify_whiteout(std::string_view normalized_path);

// An ID of the image shifted into `ids` (0 -> ids.base); kInvalid when it lies outside the range's
// width, since the workspace's user namespace could not map it.
[[nodiscard]] Result<uint32_t> shift_id(int64_t id, IdRange ids);

// sha256 of a file as "sha256:<hex>".
[[nodiscard]] Result<std::string> sha256_file(const std::string& path);

// Applies one layer blob (tar, tar+gzip or tar+zstd) onto `rootfs` (an existing directory),
// shifting ownership into `ids` ({0, 65536} keeps it as it is). kInvalid for a digest mismatch, an
// unsafe entry or a corrupt archive, with libarchive's words.
[[nodiscard]] Status apply_layer(const std::string& blob_path, const OciDescriptor& layer,
                                 const std::string& rootfs, IdRange ids);

struct LayoutImage {
  std::string manifest_digest;
  OciImageConfig config;
};

// The manifest and config of `tag` in `layout`, digests checked. kNotFound when the layout or the
// tag is missing.
[[nodiscard]] Result<LayoutImage> read_layout_image(const std::string& layout,
                                                    const std::string& tag,
                                                    OciManifest* manifest = nullptr);

// Creates `rootfs` (owned by the range's root, 0755) and applies every layer of `tag` in order.
[[nodiscard]] Result<LayoutImage> unpack_layout_image(const std::string& layout,
                                                      const std::string& tag,
                                                      const std::string& rootfs, IdRange ids);

}  // namespace cvm::agent
