// Differential test of the agent's unpacker (cvm-unpack) against `umoci unpack`: for layers made
// by real tools (mmdebstrap's tar as umoci adds it, `umoci repack`, `umoci insert ... /` with its
// root entry "/", GNU tar with absolute names, hardlinks, symlink chains, setuid files, xattrs, and
// a second layer of whiteouts and an opaque directory; device nodes and fifos; images copied by
// skopeo through a docker-registry and back; images committed by buildah from its vfs and overlay
// storage), the two trees must be the same: names, types, permission bits, owners (shifted onto the
// same range), link targets, device numbers, sizes and xattrs. Root only (both tools chown); skips
// otherwise.
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "cvm/agent/process.h"
#include "cvm/test/tree_compare.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cvm::test::diff;
using cvm::test::tree;

constexpr uint32_t kBase = 5000000;
constexpr uint32_t kCount = 65536;

std::string make_temp_dir(const std::string& prefix) {
  std::string templ = (fs::temp_directory_path() / (prefix + ".XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) return {};
  fs::permissions(templ, fs::perms(0755));
  return templ;
}

std::string sh(const std::string& script) {
  ProcessOptions o;
  o.timeout = 900s;
  auto r = run_tool({"/bin/sh", "-c", script}, o);
  return r ? "" : r.error().message;
}

// The standard output of a shell script ("" on failure, with the failure in `error`).
std::string sh_out(const std::string& script, std::string* error) {
  ProcessOptions o;
  o.timeout = 300s;
  auto r = run_tool({"/bin/sh", "-c", script}, o);
  if (!r) {
    *error = r.error().message;
    return "";
  }
  std::string out = r->out;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// buildah with all its state (images, containers, mounts) under `root`, never the host's
// /var/lib/containers. It runs in `cwd` so that layouts are named by relative paths: buildah 1.28
// turns an oci: path into the image's name in its storage and rejects names with upper-case
// letters, which mkdtemp's directories have.
struct Buildah {
  std::string cwd;
  std::string root;
  std::string driver;

  Result<std::string> operator()(std::vector<std::string> args) const {
    std::vector<std::string> argv = {"/bin/sh",   "-c",         "cd \"$0\" && exec \"$@\"",
                                     cwd,         "buildah",    "--storage-driver",
                                     driver,      "--root",     root + "/storage",
                                     "--runroot", root + "/run"};
    argv.insert(argv.end(), args.begin(), args.end());
    ProcessOptions o;
    o.timeout = 300s;
    auto r = run_tool(argv, o);
    if (!r) return r.error();
    std::string out = r->out;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }
  ~Buildah() {
    (void)(*this)({"rm", "--all"});
    (void)(*this)({"rmi", "--all", "--force"});
    // Whatever buildah left mounted (overlay's merged dirs) goes before the files: removing
    // through a mount would reach into the layers below it.
    std::ifstream mounts("/proc/self/mounts");
    std::vector<std::string> points;
    for (std::string dev, point, rest; mounts >> dev >> point && std::getline(mounts, rest);) {
      if (point.rfind(root + "/", 0) == 0) points.push_back(point);
    }
    std::sort(points.begin(), points.end(),
              [](const auto& a, const auto& b) { return a.size() > b.size(); });
    for (const auto& p : points) ::umount2(p.c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

// How many layers `layout:tag`'s manifest lists.
size_t layer_count(const std::string& layout, const std::string& tag, std::string* error) {
  const std::string manifest = sh_out("skopeo inspect --raw oci:" + layout + ":" + tag, error);
  size_t n = 0;
  for (size_t at = 0;
       (at = manifest.find("application/vnd.oci.image.layer.", at)) != std::string::npos; ++at) {
    ++n;
  }
  return n;
}

class UnpackDiff : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::geteuid() != 0) return;
    work_ = new std::string(make_temp_dir("cvm-unpack-diff"));
    const std::string layout = *work_ + "/layout";
    std::string error = sh("/bin/sh " CVM_BUILD_DEFAULT_IMAGE_SCRIPT " " + layout + " busybox");
    // umoci insert of a directory at "/": its layer has the root entry "/".
    if (error.empty()) {
      error = sh("set -e; mkdir -p " + *work_ + "/ins/etc; echo inserted > " + *work_ +
                 "/ins/etc/inserted; umoci tag --image " + layout + ":busybox inserted; " +
                 "umoci insert --image " + layout + ":inserted " + *work_ + "/ins /");
    }
    // GNU tar with what real layers carry; then whiteouts over it in a second layer.
    if (error.empty()) error = crafted(layout);
    error_ = new std::string(error);
  }
  static std::string crafted(const std::string& layout) {
    const std::string src = *work_ + "/src";
    fs::create_directories(src + "/usr/bin");
    fs::create_directories(src + "/etc/gone-dir/sub");
    fs::create_directories(src + "/opaque/old");
    std::ofstream(src + "/usr/bin/tool") << "#!/bin/sh\n";
    std::ofstream(src + "/usr/bin/suid") << "suid";
    std::ofstream(src + "/etc/gone") << "gone";
    std::ofstream(src + "/etc/gone-dir/sub/f") << "f";
    std::ofstream(src + "/opaque/old/f") << "old";
    std::ofstream(src + "/opaque/kept-by-layer") << "x";
    // chown clears setuid, so the mode comes after the owner.
    ::chown((src + "/usr/bin/suid").c_str(), 0, 50);
    ::chmod((src + "/usr/bin/suid").c_str(), 04755);
    ::chown((src + "/usr/bin/tool").c_str(), 1000, 1000);
    ::chmod((src + "/usr/bin/tool").c_str(), 0750);
    fs::create_hard_link(src + "/usr/bin/tool", src + "/usr/bin/tool-hard");
    fs::create_symlink("tool", src + "/usr/bin/link1");
    fs::create_symlink("link1", src + "/usr/bin/link2");
    fs::create_symlink("/usr/bin/link2", src + "/usr/bin/link3");
    fs::create_symlink("../../nowhere", src + "/usr/bin/dangling");
    const char value[] = "cvm";
    if (::lsetxattr((src + "/usr/bin/tool").c_str(), "user.cvm.test", value, 3, 0) != 0) {
      return "setxattr: " + std::string(std::strerror(errno));
    }
    const std::string wh = *work_ + "/wh";
    fs::create_directories(wh + "/etc");
    fs::create_directories(wh + "/opaque");
    std::ofstream(wh + "/etc/.wh.gone");
    std::ofstream(wh + "/etc/.wh.gone-dir");
    std::ofstream(wh + "/opaque/.wh..wh..opq");
    std::ofstream(wh + "/opaque/new") << "new";
    // -P: absolute names ("/usr/bin/tool"), as some hand-made layers have them.
    return sh("set -e; cd " + src + "; tar --xattrs --xattrs-include='user.*' -cf " + *work_ +
              "/crafted.tar --numeric-owner ./usr ./etc ./opaque; tar -C " + src + " -cPf " +
              *work_ + "/abs.tar --numeric-owner --transform='s,^,/,' etc/gone; cd " + wh +
              "; tar -cf " + *work_ + "/wh.tar --numeric-owner ./etc ./opaque; umoci tag " +
              "--image " + layout + ":busybox crafted; umoci raw add-layer --image " + layout +
              ":crafted " + *work_ + "/crafted.tar; umoci raw add-layer --image " + layout +
              ":crafted " + *work_ + "/abs.tar; umoci raw add-layer --image " + layout +
              ":crafted " + *work_ + "/wh.tar");
  }
  static void TearDownTestSuite() {
    if (work_ != nullptr) fs::remove_all(*work_);
    delete work_;
    delete error_;
    work_ = error_ = nullptr;
  }
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (umoci and cvm-unpack chown)";
    ASSERT_TRUE(error_->empty()) << *error_;
  }

  // Unpacks `layout:tag` both ways onto the same range and compares.
  std::map<std::string, std::string> compare(const std::string& layout, const std::string& tag) {
    const std::string ours = *work_ + "/ours-" + tag;
    const std::string theirs = *work_ + "/umoci-" + tag;
    fs::remove_all(ours);
    fs::remove_all(theirs);
    fs::create_directories(ours);
    const std::string map =
        std::to_string(0) + ":" + std::to_string(kBase) + ":" + std::to_string(kCount);
    ProcessOptions o;
    o.timeout = 600s;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = run_tool({CVM_UNPACK_BIN, "--layout", layout, "--tag", tag, "--rootfs", ours,
                       "--id-base", std::to_string(kBase), "--id-count", std::to_string(kCount)},
                      o);
    EXPECT_TRUE(r.ok()) << r.error().message;
    if (!r.ok()) return {};
    const auto t1 = std::chrono::steady_clock::now();
    auto u = run_tool({"umoci", "unpack", "--uid-map", map, "--gid-map", map, "--image",
                       layout + ":" + tag, theirs},
                      o);
    EXPECT_TRUE(u.ok()) << u.error().message;
    if (!u.ok()) return {};
    const auto t2 = std::chrono::steady_clock::now();
    const auto a = tree(ours);
    const auto b = tree(theirs + "/rootfs");
    EXPECT_EQ(diff(a, b), "") << tag;
    EXPECT_GT(b.size(), 1u);
    std::cout << tag << ": " << b.size() << " entries; cvm-unpack "
              << std::chrono::duration<double, std::milli>(t1 - t0).count() << " ms, umoci unpack "
              << std::chrono::duration<double, std::milli>(t2 - t1).count() << " ms\n";
    return a;
  }

  static inline std::string* work_ = nullptr;
  static inline std::string* error_ = nullptr;
};

TEST_F(UnpackDiff, UmociRepackLayer) { compare(*work_ + "/layout", "busybox"); }

TEST_F(UnpackDiff, UmociInsertAtTheRootWithItsSlashEntry) {
  const auto ours = compare(*work_ + "/layout", "inserted");
  EXPECT_TRUE(ours.contains("etc/inserted"));
}

TEST_F(UnpackDiff, GnuTarLayersWithLinksXattrsSetuidAbsoluteNamesAndWhiteouts) {
  const auto ours = compare(*work_ + "/layout", "crafted");
  // What the layers did, beyond agreeing with umoci: whiteouts removed, the opaque dir reset.
  EXPECT_FALSE(ours.contains("etc/gone"));
  EXPECT_FALSE(ours.contains("etc/gone-dir"));
  EXPECT_FALSE(ours.contains("opaque/old"));
  EXPECT_TRUE(ours.contains("opaque/new"));
  EXPECT_NE(ours.at("usr/bin/suid").find("4755"), std::string::npos);
  EXPECT_NE(ours.at("usr/bin/tool").find("[user.cvm.test=cvm]"), std::string::npos);
  EXPECT_NE(ours.at("usr/bin/link3").find("-> /usr/bin/link2"), std::string::npos);
}

// Device nodes and fifos, as a rootfs tarball of /dev carries them: cvm-unpack runs as the node's
// root, so it makes them as umoci does (same major/minor, owners shifted onto the range); a second
// layer replaces one node, whites out another and puts a file over the fifo.
TEST_F(UnpackDiff, DeviceNodesAndFifosWithAReplacingLayer) {
  const std::string src = *work_ + "/devsrc";
  const std::string upper = *work_ + "/devupper";
  fs::create_directories(src + "/dev");
  fs::create_directories(src + "/run");
  fs::create_directories(upper + "/dev");
  fs::create_directories(upper + "/run");
  struct Node {
    std::string path;
    mode_t type_mode;
    unsigned major, minor;
    uid_t uid;
    gid_t gid;
  };
  const std::vector<Node> nodes = {
      {src + "/dev/null", S_IFCHR | 0666, 1, 3, 0, 0},
      {src + "/dev/tty", S_IFCHR | 0666, 5, 0, 0, 5},
      {src + "/dev/loop200", S_IFBLK | 0660, 7, 200, 0, 6},
      {src + "/dev/sda", S_IFBLK | 0660, 8, 0, 0, 6},
      {src + "/run/fifo", S_IFIFO | 0620, 0, 0, 1000, 1000},
      {upper + "/dev/tty", S_IFCHR | 0600, 5, 1, 0, 5},
  };
  for (const auto& n : nodes) {
    ASSERT_EQ(::mknod(n.path.c_str(), n.type_mode, ::makedev(n.major, n.minor)), 0)
        << n.path << ": " << std::strerror(errno);
    ASSERT_EQ(::chown(n.path.c_str(), n.uid, n.gid), 0);
    ASSERT_EQ(::chmod(n.path.c_str(), n.type_mode & 07777), 0);  // the umask is not the layer's
  }
  fs::create_hard_link(src + "/dev/null", src + "/dev/null-hard");
  std::ofstream(upper + "/dev/.wh.sda");
  std::ofstream(upper + "/run/fifo") << "now a file";
  const std::string layout = *work_ + "/layout";
  ASSERT_EQ(sh("set -e; tar -C " + src + " -cf " + *work_ +
               "/dev.tar --numeric-owner ./dev ./run; "
               "tar -C " +
               upper + " -cf " + *work_ +
               "/devupper.tar --numeric-owner ./dev ./run; "
               "umoci tag --image " +
               layout + ":busybox devices; umoci raw add-layer --image " + layout + ":devices " +
               *work_ + "/dev.tar; umoci raw add-layer --image " + layout + ":devices " + *work_ +
               "/devupper.tar"),
            "");
  const auto ours = compare(layout, "devices");
  ASSERT_TRUE(ours.contains("dev/null"));
  const std::string shifted_root = std::to_string(kBase) + ":" + std::to_string(kBase);
  EXPECT_EQ(ours.at("dev/null"), "c 666 " + shifted_root + " dev=1,3");
  EXPECT_EQ(ours.at("dev/loop200"),
            "b 660 " + std::to_string(kBase) + ":" + std::to_string(kBase + 6) + " dev=7,200");
  EXPECT_EQ(ours.at("dev/tty"),
            "c 600 " + std::to_string(kBase) + ":" + std::to_string(kBase + 5) + " dev=5,1");
  EXPECT_FALSE(ours.contains("dev/sda"));
  EXPECT_EQ(ours.at("run/fifo").substr(0, 2), "f ");
  // GNU tar stores a second link to a device node as a device entry of its own, not a hardlink.
  EXPECT_EQ(ours.at("dev/null-hard"), ours.at("dev/null"));
}

// A non-directory entry over a directory of a lower layer replaces the whole directory, as the
// OCI layer spec says and umoci does: a symlink `etc2 -> /etc` over a populated etc2/, and a file
// over a directory. Never dropped in silence.
TEST_F(UnpackDiff, ASymlinkOrFileOverALowerDirectoryReplacesIt) {
  const std::string lower = *work_ + "/replace-lower";
  const std::string upper = *work_ + "/replace-upper";
  fs::create_directories(lower + "/etc2/sub");
  std::ofstream(lower + "/etc2/conf") << "lower";
  std::ofstream(lower + "/etc2/sub/deep") << "lower";
  fs::create_directories(lower + "/opt/data");
  std::ofstream(lower + "/opt/data/file") << "lower";
  fs::create_directories(upper + "/opt");
  fs::create_symlink("/etc", upper + "/etc2");
  std::ofstream(upper + "/opt/data") << "now a file";
  const std::string layout = *work_ + "/layout";
  ASSERT_EQ(sh("set -e; tar -C " + lower + " -cf " + *work_ +
               "/replace-lower.tar --numeric-owner ./etc2 ./opt; tar -C " + upper + " -cf " +
               *work_ + "/replace-upper.tar --numeric-owner ./etc2 ./opt; umoci tag --image " +
               layout + ":busybox replace; umoci raw add-layer --image " + layout + ":replace " +
               *work_ + "/replace-lower.tar; umoci raw add-layer --image " + layout + ":replace " +
               *work_ + "/replace-upper.tar"),
            "");
  const auto ours = compare(layout, "replace");
  ASSERT_TRUE(ours.contains("etc2"));
  EXPECT_EQ(ours.at("etc2").substr(0, 2), "l ") << ours.at("etc2");
  EXPECT_FALSE(ours.contains("etc2/conf"));
  EXPECT_FALSE(ours.contains("etc2/sub/deep"));
  ASSERT_TRUE(ours.contains("opt/data"));
  EXPECT_EQ(ours.at("opt/data").substr(0, 2), "f ") << ours.at("opt/data");
  EXPECT_FALSE(ours.contains("opt/data/file"));
}

// The busybox and crafted images pushed by skopeo to Debian's docker-registry (on loopback, as
// Docker v2 images: gzip layers, Docker media types) and pulled back into a new layout: the
// agent's unpack of what came back equals umoci's.
TEST_F(UnpackDiff, SkopeoCopiesThroughADockerRegistry) {
  if (::access("/usr/bin/docker-registry", X_OK) != 0 || ::access("/usr/bin/skopeo", X_OK) != 0) {
    GTEST_SKIP() << "docker-registry or skopeo missing (scripts/install-deps.sh installs them)";
  }
  const std::string reg = *work_ + "/registry";
  const std::string port = std::to_string(20000 + ::getpid() % 20000);
  fs::create_directories(reg);
  std::ofstream(reg + "/config.yml")
      << "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " << reg
      << "/data\nhttp:\n  addr: 127.0.0.1:" << port << "\n";
  struct Registry {
    std::string config;
    ~Registry() { (void)run_process({"pkill", "-f", "docker-registry serve " + config}); }
  } registry{reg + "/config.yml"};
  const std::string layout = *work_ + "/layout";
  const std::string pulled = *work_ + "/pulled";
  std::string copy = "set -e; timeout 300 /usr/bin/docker-registry serve " + reg + "/config.yml >" +
                     reg +
                     "/log 2>&1 & for i in $(seq 100); do "
                     "(exec 3<>/dev/tcp/127.0.0.1/" +
                     port +
                     ") 2>/dev/null && break; sleep 0.1; "
                     "done; ";
  for (const std::string tag : {"busybox", "crafted"}) {
    copy += "skopeo copy --quiet --format v2s2 --dest-tls-verify=false oci:" + layout + ":" + tag +
            " docker://127.0.0.1:" + port + "/cvm/x:" + tag + "; skopeo copy --quiet " +
            "--src-tls-verify=false docker://127.0.0.1:" + port + "/cvm/x:" + tag +
            " oci:" + pulled + ":" + tag + "; ";
  }
  ASSERT_EQ(sh(copy), "") << std::ifstream(reg + "/log").rdbuf();
  // Both tags came back into the new layout.
  std::ifstream index(pulled + "/index.json");
  const std::string index_json((std::istreambuf_iterator<char>(index)), {});
  EXPECT_NE(index_json.find("crafted"), std::string::npos) << index_json;
  compare(pulled, "busybox");
  const auto ours = compare(pulled, "crafted");
  EXPECT_FALSE(ours.contains("etc/gone"));
  EXPECT_TRUE(ours.contains("opaque/new"));
  EXPECT_NE(ours.at("usr/bin/tool").find("[user.cvm.test=cvm]"), std::string::npos);
}

// A small tree for `buildah copy --chown`: a file, an executable, a directory a later layer
// replaces.
std::string buildah_copy_source(const std::string& dir) {
  fs::create_directories(dir + "/sub");
  fs::create_directories(dir + "/bin");
  std::ofstream(dir + "/a") << "a";
  std::ofstream(dir + "/sub/b") << "b";
  std::ofstream(dir + "/bin/run.sh") << "#!/bin/sh\n";
  fs::permissions(dir + "/bin/run.sh", fs::perms(0755));
  return dir;
}

// What the second buildah layer does, on the container's mounted rootfs: deletions from the base
// (a file and a directory), a directory replaced by new contents, a file replaced by a directory,
// a symlink chain, a hardlink, a setuid file and a user.* xattr.
::testing::AssertionResult edit_buildah_rootfs(const std::string& m) {
  if (!fs::is_symlink(m + "/sbin/halt") || !fs::is_directory(m + "/var/tmp") ||
      !fs::exists(m + "/data/sub/b") || !fs::is_regular_file(m + "/data/a")) {
    return ::testing::AssertionFailure() << "the base or copied entries are not in " << m;
  }
  fs::remove(m + "/sbin/halt");
  fs::remove_all(m + "/var/tmp");
  fs::remove_all(m + "/data/sub");
  fs::create_directories(m + "/data/sub");
  std::ofstream(m + "/data/sub/c") << "new";
  fs::remove(m + "/data/a");
  fs::create_directories(m + "/data/a");
  std::ofstream(m + "/data/a/inner") << "inner";
  const std::string bin = m + "/opt/bin";
  fs::create_directories(bin);
  std::ofstream(bin + "/tool") << "#!/bin/sh\n";
  std::ofstream(bin + "/suid") << "suid";
  // chown clears setuid, so the mode comes after the owner.
  if (::chown((bin + "/tool").c_str(), 1000, 1000) != 0 ||
      ::chown((bin + "/suid").c_str(), 0, 50) != 0 ||
      ::chown((m + "/data/sub/c").c_str(), 1000, 1000) != 0) {
    return ::testing::AssertionFailure() << "chown: " << std::strerror(errno);
  }
  ::chmod((bin + "/tool").c_str(), 0750);
  ::chmod((bin + "/suid").c_str(), 04755);
  if (::lsetxattr((bin + "/tool").c_str(), "user.cvm.test", "cvm", 3, 0) != 0) {
    return ::testing::AssertionFailure() << "setxattr: " << std::strerror(errno);
  }
  fs::create_hard_link(bin + "/tool", bin + "/tool-hard");
  fs::create_symlink("tool", bin + "/link1");
  fs::create_symlink("link1", bin + "/link2");
  fs::create_symlink("/opt/bin/link2", bin + "/link3");
  fs::create_symlink("../../nowhere", bin + "/dangling");
  return ::testing::AssertionSuccess();
}

// The image both buildah tests make, as `tag` in the layout: busybox, a `buildah copy --chown`
// of `src` committed, then that image edited through `buildah mount` and committed as OCI.
// `name` prefixes the two working containers.
::testing::AssertionResult build_with_buildah(const Buildah& buildah, const std::string& src,
                                              const std::string& name, const std::string& tag) {
  const std::vector<std::vector<std::string>> before_edit = {
      {"from", "--quiet", "--name", name + "-1", "oci:layout:busybox"},
      {"copy", "--quiet", "--chown", "1000:1000", name + "-1", src, "/data"},
      {"commit", "--quiet", "--rm", name + "-1", "localhost/cvm-copied"},
      {"from", "--quiet", "--name", name + "-2", "localhost/cvm-copied"}};
  for (const auto& args : before_edit) {
    if (auto r = buildah(args); !r) return ::testing::AssertionFailure() << r.error().message;
  }
  const auto mounted = buildah({"mount", name + "-2"});
  if (!mounted) return ::testing::AssertionFailure() << mounted.error().message;
  if (auto edited = edit_buildah_rootfs(*mounted); !edited) return edited;
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"umount", name + "-2"},
        std::vector<std::string>{"commit", "--quiet", "--rm", "--format", "oci", name + "-2",
                                 "oci:layout:" + tag}}) {
    if (auto r = buildah(args); !r) return ::testing::AssertionFailure() << r.error().message;
  }
  return ::testing::AssertionSuccess();
}

// Two layers on busybox by buildah with its vfs storage (whose diff whites out each removed entry
// on its own): `buildah copy --chown` of a tree, committed; then a container from that image,
// edited through `buildah mount` and committed to the layout as an OCI image.
TEST_F(UnpackDiff, BuildahCommitsLayersWithChownCopiesDeletionsAndLinks) {
  ASSERT_EQ(sh("command -v buildah >/dev/null"), "")
      << "buildah not found (scripts/install-deps.sh installs it)";
  const Buildah buildah{*work_, *work_ + "/buildah-vfs", "vfs"};
  const std::string src = buildah_copy_source(*work_ + "/buildah-src");
  ASSERT_TRUE(build_with_buildah(buildah, src, "cvm-vfs", "buildah"));

  const std::string layout = *work_ + "/layout";
  std::string error;
  const size_t base = layer_count(layout, "busybox", &error);
  EXPECT_EQ(layer_count(layout, "buildah", &error), base + 2) << error;
  const auto ours = compare(layout, "buildah");
  ASSERT_TRUE(ours.contains("opt/bin/tool")) << "the edited layer is not in the image";
  const std::string user = std::to_string(kBase + 1000) + ":" + std::to_string(kBase + 1000);
  EXPECT_EQ(ours.at("data/bin/run.sh"), "f 755 " + user + " size=10");
  EXPECT_EQ(ours.at("data/sub/c"), "f 644 " + user + " size=3");
  EXPECT_FALSE(ours.contains("data/sub/b"));
  EXPECT_FALSE(ours.contains("sbin/halt"));
  EXPECT_FALSE(ours.contains("var/tmp"));
  EXPECT_TRUE(ours.contains("sbin/ifconfig"));
  EXPECT_EQ(ours.at("data/a").substr(0, 2), "d ");
  EXPECT_TRUE(ours.contains("data/a/inner"));
  EXPECT_NE(ours.at("opt/bin/suid").find("4755"), std::string::npos);
  EXPECT_NE(ours.at("opt/bin/tool").find("[user.cvm.test=cvm]"), std::string::npos);
  EXPECT_NE(ours.at("opt/bin/link3").find("-> /opt/bin/link2"), std::string::npos);
  struct stat tool {};
  struct stat hard {};
  const std::string root = *work_ + "/ours-buildah/opt/bin";
  ASSERT_EQ(::lstat((root + "/tool").c_str(), &tool), 0);
  ASSERT_EQ(::lstat((root + "/tool-hard").c_str(), &hard), 0);
  EXPECT_EQ(tool.st_ino, hard.st_ino) << "tool-hard is not a hardlink of tool";
}

// buildah with its overlay storage: a directory removed and made again in the container is an
// opaque directory in the upper dir, so the committed layer carries `.wh..wh..opq` (asserted, so
// that the case stays covered), besides a plain whiteout of a base file.
TEST_F(UnpackDiff, BuildahOverlayCommitsAnOpaqueDirectory) {
  ASSERT_EQ(sh("command -v buildah >/dev/null"), "")
      << "buildah not found (scripts/install-deps.sh installs it)";
  const Buildah buildah{*work_, *work_ + "/buildah-overlay", "overlay"};
  const std::string src = buildah_copy_source(*work_ + "/buildah-src");
  ASSERT_TRUE(build_with_buildah(buildah, src, "cvm-ov", "buildah-overlay"));

  const std::string layout = *work_ + "/layout";
  std::string error;
  const std::string last = sh_out("skopeo inspect --raw oci:" + layout +
                                      ":buildah-overlay | jq -r '.layers[-1].digest' | cut -d: -f2",
                                  &error);
  ASSERT_EQ(error, "");
  const std::string entries = sh_out("tar -tf " + layout + "/blobs/sha256/" + last, &error);
  ASSERT_EQ(error, "");
  EXPECT_NE(entries.find("data/sub/.wh..wh..opq"), std::string::npos) << entries;
  EXPECT_NE(entries.find("sbin/.wh.halt"), std::string::npos) << entries;
  const auto ours = compare(layout, "buildah-overlay");
  EXPECT_FALSE(ours.contains("data/sub/b"));
  EXPECT_TRUE(ours.contains("data/sub/c"));
  EXPECT_FALSE(ours.contains("sbin/halt"));
  EXPECT_EQ(ours.at("data/a").substr(0, 2), "d ");
  EXPECT_NE(ours.at("opt/bin/tool").find("[user.cvm.test=cvm]"), std::string::npos);
}

TEST_F(UnpackDiff, MmdebstrapDebianImage) {
  const char* cache = std::getenv("CVM_TEST_IMAGE_CACHE");
  const std::string dir = cache != nullptr && *cache ? cache : "/var/cache/cvm-control/images";
  const std::string built = sh("/bin/sh " CVM_BUILD_DEBIAN_IMAGE_SCRIPT " " + dir + " debian");
  ASSERT_EQ(built, "");
  compare(dir, "debian");
}

}  // namespace
}  // namespace cvm::agent
