#pragma once
// Crafted OCI layer tarballs (libarchive's writer) and image layouts for the unpack tests.

#include <archive.h>
#include <archive_entry.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cvm/agent/layer_unpack.h"

namespace cvm::agent::testing {

struct TarEntry {
  enum class Type { kFile, kDir, kSymlink, kHardlink };
  std::string path;
  Type type = Type::kFile;
  std::string content;  // file content, or the link target
  int64_t uid = 0;
  int64_t gid = 0;
  int mode = 0644;
};

inline TarEntry file(std::string path, std::string content, int64_t uid = 0, int mode = 0644) {
  return {std::move(path), TarEntry::Type::kFile, std::move(content), uid, uid, mode};
}
inline TarEntry dir(std::string path, int64_t uid = 0, int mode = 0755) {
  return {std::move(path), TarEntry::Type::kDir, "", uid, uid, mode};
}
inline TarEntry symlink(std::string path, std::string target) {
  return {std::move(path), TarEntry::Type::kSymlink, std::move(target), 0, 0, 0777};
}
inline TarEntry hardlink(std::string path, std::string target) {
  return {std::move(path), TarEntry::Type::kHardlink, std::move(target), 0, 0, 0644};
}

// Writes a tar (gzip-compressed with `gzip`) of `entries` to `path`.
inline void write_tar(const std::string& path, const std::vector<TarEntry>& entries,
                      bool gzip = true) {
  struct archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  if (gzip) archive_write_add_filter_gzip(a);
  archive_write_open_filename(a, path.c_str());
  for (const auto& e : entries) {
    struct archive_entry* entry = archive_entry_new();
    archive_entry_set_pathname(entry, e.path.c_str());
    archive_entry_set_uid(entry, e.uid);
    archive_entry_set_gid(entry, e.gid);
    archive_entry_set_perm(entry, static_cast<mode_t>(e.mode));
    archive_entry_set_mtime(entry, 1700000000, 0);
    switch (e.type) {
      case TarEntry::Type::kFile:
        archive_entry_set_filetype(entry, AE_IFREG);
        archive_entry_set_size(entry, static_cast<la_int64_t>(e.content.size()));
        break;
      case TarEntry::Type::kDir:
        archive_entry_set_filetype(entry, AE_IFDIR);
        break;
      case TarEntry::Type::kSymlink:
        archive_entry_set_filetype(entry, AE_IFLNK);
        archive_entry_set_symlink(entry, e.content.c_str());
        break;
      case TarEntry::Type::kHardlink:
        archive_entry_set_filetype(entry, AE_IFREG);
        archive_entry_set_hardlink(entry, e.content.c_str());
        break;
    }
    archive_write_header(a, entry);
    if (e.type == TarEntry::Type::kFile && !e.content.empty()) {
      archive_write_data(a, e.content.data(), e.content.size());
    }
    archive_entry_free(entry);
  }
  archive_write_close(a);
  archive_write_free(a);
}

// A descriptor of a layer blob written by write_tar.
inline OciDescriptor layer_descriptor(const std::string& path, bool gzip = true) {
  OciDescriptor d;
  d.media_type = gzip ? "application/vnd.oci.image.layer.v1.tar+gzip"
                      : "application/vnd.oci.image.layer.v1.tar";
  d.digest = sha256_file(path).value();
  d.size = static_cast<int64_t>(std::filesystem::file_size(path));
  return d;
}

// An OCI image layout at `layout` whose tag `tag` has `layers` (each a list of entries) and an
// image config with `config` as its "config" object.
inline void write_layout(const std::string& layout, const std::string& tag,
                         const std::vector<std::vector<TarEntry>>& layers,
                         const nlohmann::json& config) {
  namespace fs = std::filesystem;
  const std::string blobs = layout + "/blobs/sha256";
  fs::create_directories(blobs);
  const auto put_blob = [&](const std::string& tmp) {
    const std::string digest = sha256_file(tmp).value();
    const std::string hex = digest.substr(7);
    fs::rename(tmp, blobs + "/" + hex);
    return digest;
  };
  nlohmann::json manifest = {{"schemaVersion", 2},
                             {"mediaType", "application/vnd.oci.image.manifest.v1+json"},
                             {"layers", nlohmann::json::array()}};
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string tmp = layout + "/layer.tmp";
    write_tar(tmp, layers[i]);
    const auto size = static_cast<int64_t>(fs::file_size(tmp));
    manifest["layers"].push_back({{"mediaType", "application/vnd.oci.image.layer.v1.tar+gzip"},
                                  {"digest", put_blob(tmp)},
                                  {"size", size}});
  }
  const auto put_json = [&](const nlohmann::json& j) {
    const std::string tmp = layout + "/json.tmp";
    std::ofstream(tmp) << j.dump();
    const auto size = static_cast<int64_t>(fs::file_size(tmp));
    return std::make_pair(put_blob(tmp), size);
  };
  const auto [config_digest, config_size] =
      put_json({{"architecture", "amd64"}, {"os", "linux"}, {"config", config}});
  manifest["config"] = {{"mediaType", "application/vnd.oci.image.config.v1+json"},
                        {"digest", config_digest},
                        {"size", config_size}};
  const auto [manifest_digest, manifest_size] = put_json(manifest);
  std::ofstream(layout + "/oci-layout") << R"({"imageLayoutVersion":"1.0.0"})";
  nlohmann::json index = {{"schemaVersion", 2},
                          {"manifests",
                           {{{"mediaType", "application/vnd.oci.image.manifest.v1+json"},
                             {"digest", manifest_digest},
                             {"size", manifest_size},
                             {"annotations", {{"org.opencontainers.image.ref.name", tag}}}}}}};
  std::ofstream(layout + "/index.json") << index.dump();
}

}  // namespace cvm::agent::testing
