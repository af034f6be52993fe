#include <gtest/gtest.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "cvm/agent/image.h"
#include "fixture_tree.h"

namespace cvm::agent {
namespace {

using testing::FixtureTree;
namespace fs = std::filesystem;

TEST(ImageRef, OciLayout) {
  auto r = parse_image_ref("oci:/var/lib/cvm/images/default:v1");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->kind, ImageRef::Kind::kOciLayout);
  EXPECT_EQ(r->layout, "/var/lib/cvm/images/default");
  EXPECT_EQ(r->tag, "v1");

  r = parse_image_ref("oci:/images/default");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->layout, "/images/default");
  EXPECT_EQ(r->tag, "latest");

  r = parse_image_ref("oci:relative/dir:1.2.3");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->layout, "relative/dir");
  EXPECT_EQ(r->tag, "1.2.3");

  EXPECT_FALSE(parse_image_ref("oci:").ok());
  EXPECT_FALSE(parse_image_ref("oci::tag").ok());
  EXPECT_FALSE(parse_image_ref("oci:/x:bad$tag").ok());
}

TEST(ImageRef, Docker) {
  auto r = parse_image_ref("docker://localhost:5000/cvm/base:1");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->kind, ImageRef::Kind::kDocker);
  EXPECT_EQ(r->source, "docker://localhost:5000/cvm/base:1");
  EXPECT_FALSE(parse_image_ref("docker://").ok());
}

TEST(ImageRef, BareReferencesMeanDocker) {
  for (const char* ref :
       {"debian:12", "ubuntu", "ghcr.io/coder/base:latest", "localhost:5000/x/y:1"}) {
    const auto r = parse_image_ref(ref);
    ASSERT_TRUE(r.ok()) << ref;
    EXPECT_EQ(r->kind, ImageRef::Kind::kDocker) << ref;
    EXPECT_EQ(r->source, std::string("docker://") + ref);
  }
}

TEST(ImageRef, OtherTransportsRejected) {
  for (const char* ref :
       {"", "dir:/tmp/x", "containers-storage:x/y", "http://x/y", "oci-archive:/x"}) {
    const auto r = parse_image_ref(ref);
    EXPECT_FALSE(r.ok()) << ref;
  }
}

class Rootfs : public ::testing::Test {
 protected:
  FixtureTree tree_;
  std::string rootfs() const { return tree_.path("rootfs"); }
};

TEST_F(Rootfs, SbinInitRegularExecutable) {
  tree_.write("rootfs/sbin/init", "#!/bin/sh\n");
  EXPECT_FALSE(rootfs_has_sbin_init(rootfs()));  // not executable yet
  tree_.chmod("rootfs/sbin/init", fs::perms::owner_all);
  EXPECT_TRUE(rootfs_has_sbin_init(rootfs()));
}

TEST_F(Rootfs, SbinInitAbsoluteLinkResolvesInsideRootfs) {
  // systemd images: /sbin -> usr/sbin (usrmerge) and /usr/sbin/init -> /lib/systemd/systemd
  tree_.symlink("usr/sbin", "rootfs/sbin");
  tree_.symlink("usr/lib", "rootfs/lib");
  tree_.symlink("/lib/systemd/systemd", "rootfs/usr/sbin/init");
  EXPECT_FALSE(rootfs_has_sbin_init(rootfs()));  // dangling inside the rootfs
  tree_.write("rootfs/usr/lib/systemd/systemd", "elf");
  tree_.chmod("rootfs/usr/lib/systemd/systemd", fs::perms::owner_all);
  EXPECT_TRUE(rootfs_has_sbin_init(rootfs()));
  const auto resolved = resolve_in_rootfs(rootfs(), "/sbin/init");
  ASSERT_TRUE(resolved.ok());
  EXPECT_EQ(*resolved, rootfs() + "/usr/lib/systemd/systemd");
}

TEST_F(Rootfs, LinksNeverEscapeTheRootfs) {
  tree_.write("outside/sbin/init", "elf");
  tree_.chmod("outside/sbin/init", fs::perms::owner_all);
  tree_.symlink("../../outside/sbin/init", "rootfs/sbin/init");
  EXPECT_FALSE(rootfs_has_sbin_init(rootfs()));
  tree_.mkdir("rootfs/etc");
  tree_.symlink("/../../../../bin/sh", "rootfs/etc/sh");  // would be the host's /bin/sh
  EXPECT_FALSE(resolve_in_rootfs(rootfs(), "/etc/sh").ok());
}

TEST_F(Rootfs, SymlinkLoopIsAnError) {
  tree_.symlink("b", "rootfs/a");
  tree_.symlink("a", "rootfs/b");
  const auto r = resolve_in_rootfs(rootfs(), "/a");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().domain, ErrorDomain::kInvalid);
}

TEST_F(Rootfs, NoSbinInit) {
  tree_.mkdir("rootfs/bin");
  EXPECT_FALSE(rootfs_has_sbin_init(rootfs()));
  tree_.mkdir("rootfs/sbin/init");  // a directory is not an init
  EXPECT_FALSE(rootfs_has_sbin_init(rootfs()));
}

TEST_F(Rootfs, TmpFiles) {
  tree_.mkdir("rootfs/tmp");
  EXPECT_TRUE(rootfs_tmp_files(rootfs()).empty());
  tree_.write("rootfs/tmp/b.txt", "x");
  tree_.write("rootfs/tmp/a/nested", "x");
  EXPECT_EQ(rootfs_tmp_files(rootfs()), (std::vector<std::string>{"/tmp/a", "/tmp/b.txt"}));
  EXPECT_EQ(rootfs_tmp_files(rootfs(), 1), (std::vector<std::string>{"/tmp/a"}));
}

TEST_F(Rootfs, NoTmpAtAll) { EXPECT_TRUE(rootfs_tmp_files(rootfs()).empty()); }

TEST_F(Rootfs, WriteRuntimeSpecReplacesConfig) {
  tree_.write("bundle/config.json", "{\"umoci\": true}");
  ASSERT_TRUE(write_runtime_spec(tree_.path("bundle"), {{"ociVersion", "1.0.2"}}).ok());
  std::ifstream in(tree_.path("bundle/config.json"));
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j, (nlohmann::json{{"ociVersion", "1.0.2"}}));
  EXPECT_FALSE(fs::exists(tree_.path("bundle/config.json.tmp")));
  EXPECT_FALSE(write_runtime_spec(tree_.path("missing"), {}).ok());
}

}  // namespace
}  // namespace cvm::agent

namespace cvm::agent {
namespace {

TEST(CacheTag, SanitizedUniqueAndValid) {
  const std::string a = cache_tag("docker://127.0.0.1:5000/library/busybox:latest");
  EXPECT_EQ(a.rfind("127.0.0.1_5000_library_busybox_latest-", 0), 0u) << a;
  // Sanitizing alone would make these two equal; the hash keeps them apart.
  EXPECT_NE(cache_tag("docker://a/b:c"), cache_tag("docker://a_b_c"));
  EXPECT_EQ(cache_tag("docker://a/b:c"), cache_tag("docker://a/b:c"));
  const std::string long_tag = cache_tag("docker://" + std::string(400, 'x'));
  EXPECT_LE(long_tag.size(), 128u);
  EXPECT_TRUE(parse_image_ref("oci:/cache/layout:" + a).ok()) << "a valid OCI tag";
  EXPECT_TRUE(parse_image_ref("oci:/cache/layout:" + cache_tag("docker://-x")).ok());
}

TEST(LayoutIndex, FindsTags) {
  const std::string index = R"({"schemaVersion":2,"manifests":[
    {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:ab","size":1,
     "annotations":{"org.opencontainers.image.ref.name":"busybox-1"}},
    {"digest":"sha256:cd","size":1}]})";
  EXPECT_TRUE(layout_index_has_tag(index, "busybox-1"));
  EXPECT_FALSE(layout_index_has_tag(index, "busybox-2"));
  EXPECT_FALSE(layout_index_has_tag("not json", "busybox-1"));
  EXPECT_FALSE(layout_index_has_tag(R"({"manifests":{}})", "busybox-1"));
}

}  // namespace
}  // namespace cvm::agent
