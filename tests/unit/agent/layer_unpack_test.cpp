// The native unpack: parsers of the OCI layout (pure) and crafted layer tarballs applied to a
// temporary rootfs (whiteouts, hardlinks, symlinks, path escapes, corrupt archives, digests).
// Ownership is checked only as root (chown needs it); everything else runs as any user.
#include "cvm/agent/layer_unpack.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "fixture_tree.h"
#include "layer_test_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using testing::dir;
using testing::file;
using testing::FixtureTree;
using testing::hardlink;
using testing::layer_descriptor;
using testing::symlink;
using testing::write_layout;
using testing::write_tar;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(NormalizeLayerPath, DropsDotsAndRefusesEscapes) {
  EXPECT_EQ(normalize_layer_path("./etc/passwd").value(), "etc/passwd");
  EXPECT_EQ(normalize_layer_path("etc//x/./y/").value(), "etc/x/y");
  EXPECT_EQ(normalize_layer_path("./").value(), "");
  EXPECT_EQ(normalize_layer_path(".").value(), "");
  EXPECT_FALSE(normalize_layer_path("../x").ok());
  EXPECT_FALSE(normalize_layer_path("a/../../x").ok());
  EXPECT_FALSE(normalize_layer_path("a/..").ok());
  // Absolute names are the rootfs's, as umoci, containerd and Docker read them.
  EXPECT_EQ(normalize_layer_path("/etc/passwd").value(), "etc/passwd");
  EXPECT_EQ(normalize_layer_path("/").value(), "") << "umoci insert's root entry";
  EXPECT_EQ(normalize_layer_path("//").value(), "");
  EXPECT_FALSE(normalize_layer_path("/../etc").ok());
  EXPECT_NE(normalize_layer_path("/a/../../x").error().message.find(".."), std::string::npos);
  EXPECT_EQ(normalize_layer_path("a/..b/c").value(), "a/..b/c") << "'..b' is a name";
}

TEST(ClassifyWhiteout, FileAndOpaque) {
  auto w = classify_whiteout("etc/.wh.passwd");
  EXPECT_EQ(w.kind, Whiteout::Kind::kFile);
  EXPECT_EQ(w.target, "etc/passwd");
  w = classify_whiteout(".wh.top");
  EXPECT_EQ(w.kind, Whiteout::Kind::kFile);
  EXPECT_EQ(w.target, "top");
  w = classify_whiteout("var/lib/.wh..wh..opq");
  EXPECT_EQ(w.kind, Whiteout::Kind::kOpaque);
  EXPECT_EQ(w.target, "var/lib");
  w = classify_whiteout(".wh..wh..opq");
  EXPECT_EQ(w.kind, Whiteout::Kind::kOpaque);
  EXPECT_EQ(w.target, "");
  EXPECT_EQ(classify_whiteout("etc/passwd").kind, Whiteout::Kind::kNone);
  EXPECT_EQ(classify_whiteout("etc/.wh.").kind, Whiteout::Kind::kNone);
  EXPECT_EQ(classify_whiteout("etc/x.wh.y").kind, Whiteout::Kind::kNone);
}

TEST(ShiftId, IntoTheRangeOrRefused) {
  const IdRange ids{300000, 65536};
  EXPECT_EQ(shift_id(0, ids).value(), 300000u);
  EXPECT_EQ(shift_id(65534, ids).value(), 300000u + 65534);
  EXPECT_FALSE(shift_id(65536, ids).ok());
  EXPECT_FALSE(shift_id(-1, ids).ok());
  EXPECT_EQ(shift_id(1000, IdRange{0, 65536}).value(), 1000u) << "identity for the node cache";
}

TEST(OciBlobPath, OnlySha256HexReachesAPath) {
  const std::string hex(64, 'a');
  EXPECT_EQ(oci_blob_path("/l", "sha256:" + hex).value(), "/l/blobs/sha256/" + hex);
  EXPECT_FALSE(oci_blob_path("/l", "sha256:../../../../etc/passwd").ok());
  EXPECT_FALSE(oci_blob_path("/l", "sha256:" + std::string(64, 'A')).ok());
  EXPECT_FALSE(oci_blob_path("/l", "sha512:" + hex).ok());
  EXPECT_FALSE(oci_blob_path("/l", "sha256:" + hex + "/x").ok());
}

TEST(OciDocuments, IndexManifestAndConfig) {
  const std::string index = R"({"schemaVersion":2,"manifests":[
    {"mediaType":"m","digest":"sha256:aa","size":5,
     "annotations":{"org.opencontainers.image.ref.name":"other"}},
    {"mediaType":"m","digest":"sha256:bb","size":7,
     "annotations":{"org.opencontainers.image.ref.name":"latest"}}]})";
  auto d = find_tagged_manifest(index, "latest");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->digest, "sha256:bb");
  EXPECT_EQ(d->size, 7);
  auto missing = find_tagged_manifest(index, "nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.error().is_not_found());
  EXPECT_NE(missing.error().message.find("'nope'"), std::string::npos);
  EXPECT_FALSE(find_tagged_manifest("not json", "latest").ok());
  EXPECT_FALSE(find_tagged_manifest("not json", "latest").error().is_not_found());

  auto m = parse_oci_manifest(R"({"config":{"digest":"sha256:cc"},
    "layers":[{"digest":"sha256:l1","mediaType":"t+gzip"},{"digest":"sha256:l2"}]})");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->config.digest, "sha256:cc");
  ASSERT_EQ(m->layers.size(), 2u);
  EXPECT_EQ(m->layers[0].media_type, "t+gzip");
  EXPECT_FALSE(parse_oci_manifest(R"({"manifests":[]})").ok()) << "an index is not a manifest";

  auto c = parse_oci_image_config(R"({"config":{"Env":["PATH=/bin","A=b"],
    "Entrypoint":["/bin/tini","--"],"Cmd":["/bin/sh"],"WorkingDir":"/work"}})");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->env, (std::vector<std::string>{"PATH=/bin", "A=b"}));
  EXPECT_EQ(c->args, (std::vector<std::string>{"/bin/tini", "--", "/bin/sh"}));
  EXPECT_EQ(c->cwd, "/work");
  auto bare = parse_oci_image_config(R"({"architecture":"amd64"})");
  ASSERT_TRUE(bare.ok());
  EXPECT_EQ(bare->cwd, "/");
  EXPECT_FALSE(parse_oci_image_config("[]").ok());
}

TEST(Sha256File, KnownVector) {
  FixtureTree t;
  t.write("abc", "abc");
  EXPECT_EQ(sha256_file(t.path("abc")).value(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_TRUE(sha256_file(t.path("missing")).error().is_not_found());
}

class ApplyLayer : public ::testing::Test {
 protected:
  void SetUp() override {
    rootfs_ = t_.path("rootfs");
    outside_ = t_.path("outside");
    fs::create_directories(rootfs_);
    fs::create_directories(outside_);
    std::ofstream(outside_ + "/victim") << "host file";
  }
  Status apply(const std::vector<testing::TarEntry>& entries, bool gzip = true) {
    const std::string blob = t_.path("layer" + std::to_string(n_++) + ".tar");
    write_tar(blob, entries, gzip);
    return apply_layer(blob, layer_descriptor(blob, gzip), rootfs_, ids_);
  }
  [[nodiscard]] bool outside_intact() const {
    return slurp(outside_ + "/victim") == "host file" && !fs::exists(outside_ + "/pwned");
  }
  FixtureTree t_;
  std::string rootfs_;
  std::string outside_;
  IdRange ids_{400000, 65536};
  int n_ = 0;
};

TEST_F(ApplyLayer, FilesDirsLinksAndShiftedOwners) {
  const auto st =
      apply({dir("./etc"), file("./etc/hostname", "box\n"),
             file("./home/u/notes", "hi", 1000, 0600), symlink("./bin/sh", "busybox"),
             file("./bin/busybox", "ELF", 0, 0755), hardlink("./bin/ls", "bin/busybox")},
            /*gzip=*/false);
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_EQ(slurp(rootfs_ + "/etc/hostname"), "box\n");
  EXPECT_EQ(fs::read_symlink(rootfs_ + "/bin/sh"), "busybox");
  struct stat a {
  }, b{};
  ASSERT_EQ(::stat((rootfs_ + "/bin/busybox").c_str(), &a), 0);
  ASSERT_EQ(::stat((rootfs_ + "/bin/ls").c_str(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino) << "a hardlink, not a copy";
  EXPECT_EQ(a.st_mode & 07777, 0755u);
  struct stat notes {};
  ASSERT_EQ(::stat((rootfs_ + "/home/u/notes").c_str(), &notes), 0);
  EXPECT_EQ(notes.st_mode & 07777, 0600u);
  if (::geteuid() == 0) {
    EXPECT_EQ(a.st_uid, ids_.base);
    EXPECT_EQ(notes.st_uid, ids_.base + 1000);
    EXPECT_EQ(notes.st_gid, ids_.base + 1000);
  }
}

TEST_F(ApplyLayer, WhiteoutsHideTheLowerLayersOnly) {
  ASSERT_TRUE(apply({file("a/x", "1"), file("a/y", "2"), file("b/z", "3"), file("b/keep/k", "4"),
                     symlink("s", "a")})
                  .ok());
  const auto st = apply({file("a/.wh.x", ""), file("b/new", "5"), file("b/.wh..wh..opq", ""),
                         file("b/later", "6"), file(".wh.s", ""), file(".wh.absent", "")});
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_FALSE(fs::exists(rootfs_ + "/a/x"));
  EXPECT_EQ(slurp(rootfs_ + "/a/y"), "2");
  EXPECT_FALSE(fs::exists(rootfs_ + "/b/z")) << "opaque: the lower layer's files are hidden";
  EXPECT_FALSE(fs::exists(rootfs_ + "/b/keep"));
  EXPECT_EQ(slurp(rootfs_ + "/b/new"), "5") << "the same layer's entries before the marker stay";
  EXPECT_EQ(slurp(rootfs_ + "/b/later"), "6");
  EXPECT_FALSE(fs::exists(fs::symlink_status(rootfs_ + "/s")));
  EXPECT_TRUE(fs::exists(rootfs_ + "/a")) << "removing the symlink s left its target alone";
  EXPECT_FALSE(fs::exists(rootfs_ + "/a/.wh.x")) << "whiteouts are not extracted";
}

TEST_F(ApplyLayer, RefusesDotDotEscapes) {
  const auto st = apply({file("../outside/pwned", "x")});
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find(".."), std::string::npos) << st.error().message;
  EXPECT_TRUE(outside_intact());
  const auto nested = apply({dir("a"), file("a/../../outside/pwned", "x")});
  EXPECT_FALSE(nested.ok());
  EXPECT_TRUE(outside_intact());
}

TEST_F(ApplyLayer, AbsolutePathsAreTakenFromTheRootfs) {
  // As umoci, containerd and Docker read them: "/x" is the rootfs's x, never the host's.
  const auto st = apply({file(outside_ + "/pwned", "x"), file("/etc/abs", "abs")});
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_TRUE(outside_intact());
  EXPECT_EQ(slurp(rootfs_ + outside_ + "/pwned"), "x");
  EXPECT_EQ(slurp(rootfs_ + "/etc/abs"), "abs");
}

TEST_F(ApplyLayer, RefusesToWriteThroughASymlink) {
  // The classic: a symlink to a host directory, then a file "inside" it.
  const auto st = apply({symlink("evil", outside_), file("evil/pwned", "x")});
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find("evil"), std::string::npos) << st.error().message;
  EXPECT_TRUE(outside_intact());
  // The same across two layers, and a whiteout through the link.
  FixtureTree other;
  rootfs_ = other.path("rootfs");
  fs::create_directories(rootfs_);
  ASSERT_TRUE(apply({symlink("evil", outside_)}).ok());
  EXPECT_FALSE(apply({file("evil/pwned", "x")}).ok());
  EXPECT_FALSE(apply({file("evil/.wh.victim", "")}).ok());
  EXPECT_FALSE(apply({file("evil/.wh..wh..opq", "")}).ok());
  EXPECT_TRUE(outside_intact());
}

// A later layer's entry over a lower layer's symlink replaces the link; it never acts on what the
// link points to (a host directory here: its mode and owner must stay as they were).
TEST_F(ApplyLayer, AnEntryOverASymlinkReplacesTheLinkNotItsTarget) {
  fs::permissions(outside_, fs::perms(0755));
  struct stat before {};
  ASSERT_EQ(::stat(outside_.c_str(), &before), 0);
  ASSERT_TRUE(apply({symlink("d", outside_), symlink("f", outside_ + "/victim")}).ok());
  ASSERT_TRUE(apply({dir("d", 0, 0700), file("f", "layer file")}).ok());
  EXPECT_TRUE(fs::is_directory(fs::symlink_status(rootfs_ + "/d"))) << "d is a directory now";
  EXPECT_TRUE(fs::is_regular_file(fs::symlink_status(rootfs_ + "/f")));
  EXPECT_EQ(slurp(rootfs_ + "/f"), "layer file");
  struct stat after {};
  ASSERT_EQ(::stat(outside_.c_str(), &after), 0);
  EXPECT_EQ(after.st_mode, before.st_mode) << "the host directory's mode changed";
  EXPECT_EQ(after.st_uid, before.st_uid) << "the host directory's owner changed";
  EXPECT_TRUE(outside_intact());
}

TEST_F(ApplyLayer, RefusesHardlinksOutOfTheRootfs) {
  EXPECT_FALSE(apply({hardlink("stolen", "../outside/victim")}).ok());
  // An absolute target is the rootfs's (where there is no such file), never the host's.
  const auto abs = apply({hardlink("stolen", outside_ + "/victim")});
  ASSERT_FALSE(abs.ok());
  EXPECT_NE(abs.error().message.find("not in the rootfs"), std::string::npos)
      << abs.error().message;
  EXPECT_FALSE(fs::exists(rootfs_ + "/stolen"));
  EXPECT_TRUE(outside_intact());
}

TEST_F(ApplyLayer, RefusesOwnersOutsideTheRange) {
  const auto st = apply({file("big", "x", 70000)});
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find("70000"), std::string::npos) << st.error().message;
}

TEST_F(ApplyLayer, CorruptGzipAndWrongDigestFailWithAClearMessage) {
  const std::string blob = t_.path("corrupt.tar.gz");
  write_tar(blob, {file("a", std::string(100000, 'x')), file("b", "y")});
  const auto good = layer_descriptor(blob);
  std::string bytes = slurp(blob);
  ASSERT_GT(bytes.size(), 40u);
  for (size_t i = 20; i < bytes.size() - 10; ++i) bytes[i] = static_cast<char>(bytes[i] ^ 0x5a);
  std::ofstream(blob, std::ios::binary | std::ios::trunc) << bytes;
  const auto corrupt = apply_layer(blob, layer_descriptor(blob), rootfs_, ids_);
  ASSERT_FALSE(corrupt.ok());
  EXPECT_NE(corrupt.error().message.find("layer sha256:"), std::string::npos)
      << corrupt.error().message;
  std::cout << "corrupt gzip: " << corrupt.error().message << "\n";

  const std::string fine = t_.path("fine.tar.gz");
  write_tar(fine, {file("c", "z")});
  auto wrong = layer_descriptor(fine);
  wrong.digest = good.digest;  // another blob's digest
  const auto mismatch = apply_layer(fine, wrong, rootfs_, ids_);
  ASSERT_FALSE(mismatch.ok());
  EXPECT_NE(mismatch.error().message.find("digest mismatch"), std::string::npos)
      << mismatch.error().message;
}

TEST(UnpackLayoutImage, AppliesLayersInOrderAndReadsTheConfig) {
  FixtureTree t;
  write_layout(t.path("layout"), "v1",
               {{dir("./"), file("etc/os-release", "ID=test\n"), file("tmp/left", "x")},
                {file("etc/os-release", "ID=second\n"), file("etc/.wh.gone", "")}},
               {{"Env", {"PATH=/bin"}}, {"Cmd", {"/bin/sh"}}, {"WorkingDir", "/srv"}});
  auto image = unpack_layout_image(t.path("layout"), "v1", t.path("rootfs"), IdRange{0, 65536});
  ASSERT_TRUE(image.ok()) << image.error().message;
  EXPECT_EQ(slurp(t.path("rootfs/etc/os-release")), "ID=second\n");
  EXPECT_EQ(image->config.env, std::vector<std::string>{"PATH=/bin"});
  EXPECT_EQ(image->config.args, std::vector<std::string>{"/bin/sh"});
  EXPECT_EQ(image->config.cwd, "/srv");
  EXPECT_EQ(image->manifest_digest.rfind("sha256:", 0), 0u);

  auto missing = unpack_layout_image(t.path("layout"), "v2", t.path("rootfs2"), IdRange{0, 65536});
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.error().is_not_found());
  auto no_layout = unpack_layout_image(t.path("nope"), "v1", t.path("rootfs3"), IdRange{0, 65536});
  ASSERT_FALSE(no_layout.ok());
  EXPECT_TRUE(no_layout.error().is_not_found());
  EXPECT_NE(no_layout.error().message.find("no image layout"), std::string::npos);
}

TEST(UnpackLayoutImage, ATamperedBlobFailsItsDigest) {
  FixtureTree t;
  write_layout(t.path("layout"), "v1", {{file("a", "original")}}, nlohmann::json::object());
  // Replace the layer blob's content with another valid tarball: the digest no longer matches.
  for (const auto& e : fs::directory_iterator(t.path("layout/blobs/sha256"))) {
    if (slurp(e.path().string()).rfind("\x1f\x8b", 0) == 0) {
      write_tar(e.path().string(), {file("a", "tampered")});
    }
  }
  auto image = unpack_layout_image(t.path("layout"), "v1", t.path("rootfs"), IdRange{0, 65536});
  ASSERT_FALSE(image.ok());
  EXPECT_NE(image.error().message.find("digest mismatch"), std::string::npos)
      << image.error().message;
}

}  // namespace
}  // namespace cvm::agent
