#include "cvm/agent/layer_unpack.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include <nlohmann/json.hpp>

#include "file_util.h"
#include "sha256.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::string_view kWhiteoutPrefix = ".wh.";
constexpr std::string_view kOpaqueMarker = ".wh..wh..opq";

Result<OciDescriptor> descriptor_of(const json& j, const char* what) {
  if (!j.is_object() || !j.contains("digest") || !j["digest"].is_string()) {
    return make_error(ErrorDomain::kInvalid, std::string(what) + ": descriptor without a digest");
  }
  OciDescriptor d;
  d.digest = j["digest"].get<std::string>();
  if (j.contains("mediaType") && j["mediaType"].is_string()) d.media_type = j["mediaType"];
  if (j.contains("size") && j["size"].is_number_integer()) d.size = j["size"].get<int64_t>();
  return d;
}

std::vector<std::string> strings_of(const json& j, const char* key) {
  std::vector<std::string> out;
  const auto it = j.find(key);
  if (it == j.end() || !it->is_array()) return out;
  for (const auto& v : *it) {
    if (v.is_string()) out.push_back(v.get<std::string>());
  }
  return out;
}

using detail::EvpCtx;
using detail::finish_sha256;
using detail::new_sha256;

}  // namespace

Result<OciDescriptor> find_tagged_manifest(std::string_view index_json, std::string_view tag) {
  const json index = json::parse(index_json, nullptr, /*allow_exceptions=*/false);
  if (!index.is_object() || !index.contains("manifests") || !index["manifests"].is_array()) {
    return make_error(ErrorDomain::kInvalid, "index.json is not an OCI image index");
  }
  for (const auto& m : index["manifests"]) {
    if (!m.is_object() || !m.contains("annotations") || !m["annotations"].is_object()) continue;
    const auto& a = m["annotations"];
    const auto name = a.find("org.opencontainers.image.ref.name");
    if (name == a.end() || !name->is_string() || name->get<std::string>() != tag) continue;
    return descriptor_of(m, "index.json");
  }
  return make_error(ErrorDomain::kNotFound,
                    "tag '" + std::string(tag) + "' not found in the image layout");
}

Result<OciManifest> parse_oci_manifest(std::string_view manifest_json) {
  const json j = json::parse(manifest_json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("config") || !j.contains("layers") || !j["layers"].is_array()) {
    return make_error(ErrorDomain::kInvalid,
                      "not an OCI image manifest (an image index or another kind of document)");
  }
  OciManifest out;
  auto config = descriptor_of(j["config"], "manifest config");
  if (!config) return config.error();
  out.config = *config;
  for (const auto& l : j["layers"]) {
    auto d = descriptor_of(l, "manifest layer");
    if (!d) return d.error();
    out.layers.push_back(*d);
  }
  return out;
}

Result<OciImageConfig> parse_oci_image_config(std::string_view config_json) {
  const json j = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return make_error(ErrorDomain::kInvalid, "image config is not an object");
  OciImageConfig out;
  const auto it = j.find("config");
  if (it == j.end() || !it->is_object()) return out;
  out.env = strings_of(*it, "Env");
  out.args = strings_of(*it, "Entrypoint");
  for (auto& a : strings_of(*it, "Cmd")) out.args.push_back(std::move(a));
  if (it->contains("WorkingDir") && (*it)["WorkingDir"].is_string()) {
    std::string cwd = (*it)["WorkingDir"];
    if (!cwd.empty()) out.cwd = cwd;
  }
  return out;
}

Result<std::string> oci_blob_path(std::string_view layout, std::string_view digest) {
  constexpr std::string_view kAlg = "sha256:";
  const bool ok = digest.size() == kAlg.size() + 64 && digest.substr(0, kAlg.size()) == kAlg &&
                  std::all_of(digest.begin() + kAlg.size(), digest.end(), [](char c) {
                    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                  });
  if (!ok)
    return make_error(ErrorDomain::kInvalid, "unsupported digest '" + std::string(digest) + "'");
  return detail::join_path(layout, "blobs/sha256/" + std::string(digest.substr(kAlg.size())));
}

Result<std::string> normalize_layer_path(std::string_view name) {
  // Empty components (leading '/' included) are skipped below: "/etc" is "etc", "/" the root.
  std::string out;
  size_t pos = 0;
  while (pos <= name.size()) {
    size_t end = name.find('/', pos);
    if (end == std::string_view::npos) end = name.size();
    const std::string_view part = name.substr(pos, end - pos);
    pos = end + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      return make_error(ErrorDomain::kInvalid,
                        "layer entry '" + std::string(name) + "' climbs out with '..'");
    }
    if (!out.empty()) out += '/';
    out += part;
  }
  return out;
}

Whiteout classify_whiteout(std::string_view path) {
  const size_t slash = path.rfind('/');
  const std::string_view dir = slash == std::string_view::npos ? "" : path.substr(0, slash);
  const std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
  if (base == kOpaqueMarker) return {Whiteout::Kind::kOpaque, std::string(dir)};
  if (base.size() > kWhiteoutPrefix.size() &&
      base.substr(0, kWhiteoutPrefix.size()) == kWhiteoutPrefix) {
    const std::string_view name = base.substr(kWhiteoutPrefix.size());
    return {Whiteout::Kind::kFile,
            dir.empty() ? std::string(name) : std::string(dir) + "/" + std::string(name)};
  }
  return {};
}

Result<uint32_t> shift_id(int64_t id, IdRange ids) {
  if (id < 0 || static_cast<uint64_t>(id) >= ids.count) {
    return make_error(ErrorDomain::kInvalid, "owner id " + std::to_string(id) +
                                                 " is outside the workspace's " +
                                                 std::to_string(ids.count) + " mapped IDs");
  }
  return static_cast<uint32_t>(ids.base + static_cast<uint32_t>(id));
}

Result<std::string> sha256_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return make_error(e == ENOENT ? ErrorDomain::kNotFound : ErrorDomain::kSystem,
                      path + ": " + std::strerror(e), e);
  }
  EvpCtx ctx = new_sha256();
  std::vector<char> buf(128 * 1024);
  ssize_t n = 0;
  while ((n = ::read(fd, buf.data(), buf.size())) > 0) {
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n));
  }
  const int e = errno;
  ::close(fd);
  if (n < 0) return make_error(ErrorDomain::kSystem, path + ": " + std::strerror(e), e);
  return finish_sha256(ctx.get());
}

Result<LayoutImage> read_layout_image(const std::string& layout, const std::string& tag,
                                      OciManifest* manifest_out) {
  const std::string index_path = detail::join_path(layout, "index.json");
  const auto index = detail::read_file(index_path, 16 << 20);
  if (!index) {
    return make_error(ErrorDomain::kNotFound, "no image layout at " + layout + " (" + index_path +
                                                  ": " +
                                                  std::strerror(errno == 0 ? ENOENT : errno) + ")");
  }
  auto desc = find_tagged_manifest(*index, tag);
  if (!desc) {
    Error e = desc.error();
    e.message = layout + ": " + e.message;
    return e;
  }
  const auto read_blob = [&](const OciDescriptor& d, const char* what) -> Result<std::string> {
    auto path = oci_blob_path(layout, d.digest);
    if (!path) return path.error();
    auto text = detail::read_file(*path, 16 << 20);
    if (!text)
      return make_error(ErrorDomain::kNotFound,
                        std::string(what) + " blob " + d.digest + " missing");
    EvpCtx ctx = new_sha256();
    EVP_DigestUpdate(ctx.get(), text->data(), text->size());
    if (const std::string actual = finish_sha256(ctx.get()); actual != d.digest) {
      return make_error(ErrorDomain::kInvalid,
                        std::string(what) + " " + d.digest + ": digest mismatch (" + actual + ")");
    }
    return *text;
  };
  auto manifest_text = read_blob(*desc, "manifest");
  if (!manifest_text) return manifest_text.error();
  auto manifest = parse_oci_manifest(*manifest_text);
  if (!manifest) return manifest.error();
  auto config_text = read_blob(manifest->config, "config");
  if (!config_text) return config_text.error();
  auto config = parse_oci_image_config(*config_text);
  if (!config) return config.error();
  if (manifest_out) *manifest_out = *manifest;
  return LayoutImage{desc->digest, *config};
}

}  // namespace cvm::agent
