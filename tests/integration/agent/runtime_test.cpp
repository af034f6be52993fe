// agent_host against the real tools: build the default image with the repo's script, unpack it
// with umoci onto an exclusive ID range, run it with runc in a user namespace, stop and delete it.
// Needs root and runc/umoci; skipped (with the reason) otherwise.

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/oci_spec.h"
#include "cvm/agent/process.h"
#include "cvm/agent/runtime.h"
#include "cvm/test/files.h"

#ifndef CVM_BUILD_DEFAULT_IMAGE_SCRIPT
#error "CVM_BUILD_DEFAULT_IMAGE_SCRIPT must name scripts/build-default-image.sh"
#endif

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;

// The agent's layer applier, built next to the agent.
ImageToolOptions image_options() {
  ImageToolOptions o;
  o.tools.unpack = CVM_UNPACK_BIN;
  return o;
}
using namespace std::chrono_literals;

using cvm::test::read_file;

std::string make_temp_dir() {
  std::string templ = (fs::temp_directory_path() / "cvm-agent-it.XXXXXX").string();
  if (::mkdtemp(templ.data()) == nullptr) return {};
  return templ;
}

// Why this host cannot run the tests, or empty when it can.
std::string missing_prerequisite() {
  if (::geteuid() != 0) return "needs root (runc with user namespaces, umoci chown)";
  for (const char* tool : {"runc", "umoci"}) {
    if (!run_process({tool, "--version"}).ok()) return std::string(tool) + " not found on PATH";
  }
  return {};
}

class AgentRuntimeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    skip_reason_ = new std::string(missing_prerequisite());
    if (!skip_reason_->empty()) return;
    image_dir_ = new std::string(make_temp_dir());
    ProcessOptions options;
    options.timeout = 60s;
    auto built = run_tool(
        {"/bin/sh", CVM_BUILD_DEFAULT_IMAGE_SCRIPT, *image_dir_ + "/layout", "latest"}, options);
    build_error_ = new std::string(built ? "" : built.error().message);
  }

  static void TearDownTestSuite() {
    if (image_dir_ != nullptr) {
      std::error_code ec;
      fs::remove_all(*image_dir_, ec);
    }
    delete image_dir_;
    delete skip_reason_;
    delete build_error_;
    image_dir_ = skip_reason_ = build_error_ = nullptr;
  }

  void SetUp() override {
    if (!skip_reason_->empty()) GTEST_SKIP() << *skip_reason_;
    ASSERT_TRUE(build_error_->empty()) << "build-default-image.sh failed: " << *build_error_;
    work_ = make_temp_dir();
    ASSERT_FALSE(work_.empty());
    // mkdtemp makes 0700; the containers' mapped roots must traverse it to reach their rootfs.
    fs::permissions(work_, fs::perms::others_exec | fs::perms::group_exec, fs::perm_options::add);
    // A private state dir: the tests neither see nor disturb the host's containers.
    runtime_ = std::make_unique<RuncRuntime>(RuncOptions{"runc", work_ + "/runc-root", 20s});
    cgroup_parent_ = "cvm-it-" + std::to_string(::getpid());
  }

  void TearDown() override {
    if (runtime_) {
      for (const auto& id : containers_) (void)runtime_->remove(id, /*force=*/true);
    }
    // runc removes the container's own cgroup, not the parent the test named.
    std::error_code ec;
    for (const auto& controller : fs::directory_iterator("/sys/fs/cgroup", ec)) {
      fs::remove(controller.path() / cgroup_parent_, ec);
    }
    if (!work_.empty()) fs::remove_all(work_, ec);
  }

  std::string layout_ref(const std::string& tag = "latest") const {
    return "oci:" + *image_dir_ + "/layout:" + tag;
  }

  // Unpacks the default image for `workspace` and writes a spec; returns the bundle dir.
  std::string prepare_bundle(const std::string& workspace, IdRange ids, SpecInput spec) {
    ImageTool images(image_options());
    const std::string bundle = work_ + "/bundles/" + workspace;
    auto image = images.unpack(layout_ref(), bundle, ids);
    EXPECT_TRUE(image.ok()) << image.error().message;
    if (!image) return {};
    EXPECT_FALSE(image->has_sbin_init);  // the default image runs the sleep entrypoint
    struct stat st {};
    EXPECT_EQ(::stat(bundle.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0755u);
    EXPECT_EQ(::stat(image->rootfs.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, ids.base) << "rootfs must belong to the mapped container root";

    spec.ids = ids;
    spec.has_sbin_init = image->has_sbin_init;
    spec.env = image->env;
    spec.cwd = image->cwd;
    spec.hostname = workspace;
    spec.cgroups_path = "/" + cgroup_parent_ + "/" + workspace;
    if (auto bounding = read_cap_bounding(HostRoots{})) spec.host_cap_bounding = *bounding;
    rlimit nofile{};
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) spec.host_nofile_hard = nofile.rlim_max;
    const auto written = write_runtime_spec(bundle, build_runtime_spec(spec));
    EXPECT_TRUE(written.ok()) << (written ? "" : written.error().message);
    return bundle;
  }

  Status run(const std::string& id, const std::string& bundle) {
    containers_.push_back(id);
    return runtime_->run_detached(id, bundle, "");
  }

  static std::string* image_dir_;
  static std::string* skip_reason_;
  static std::string* build_error_;
  std::string work_;
  std::string cgroup_parent_;
  std::unique_ptr<RuncRuntime> runtime_;
  std::vector<std::string> containers_;
};

std::string* AgentRuntimeTest::image_dir_ = nullptr;
std::string* AgentRuntimeTest::skip_reason_ = nullptr;
std::string* AgentRuntimeTest::build_error_ = nullptr;

TEST_F(AgentRuntimeTest, RunsWorkspaceInItsOwnUserNamespace) {
  auto allocator = IdRangeAllocator::create(IdPool{1000000, 65536 * 16});
  ASSERT_TRUE(allocator.ok());
  (void)allocator->allocate("ws-other");  // so the range under test does not start the pool
  const auto ids = allocator->allocate("ws-it");
  ASSERT_TRUE(ids.ok());

  SpecInput spec;
  spec.memory_limit_bytes = 256ull << 20;
  spec.cpu_millicores = 500;
  const std::string id = "cvm-it-run-" + std::to_string(::getpid());
  const std::string bundle = prepare_bundle("ws-it", *ids, spec);
  ASSERT_FALSE(bundle.empty());

  const auto started = run(id, bundle);
  ASSERT_TRUE(started.ok()) << started.error().message
                            << "\ncontainer.log: " << read_file(bundle + "/container.log");
  const auto state = runtime_->state(id);
  ASSERT_TRUE(state.ok()) << state.error().message;
  EXPECT_EQ(state->status, ContainerStatus::kRunning);
  ASSERT_GT(state->pid, 0);
  EXPECT_EQ(state->bundle, bundle);

  // Container root is the range's base on the host, never host root.
  const std::string uid_map = read_file("/proc/" + std::to_string(state->pid) + "/uid_map");
  const std::string gid_map = read_file("/proc/" + std::to_string(state->pid) + "/gid_map");
  std::cout << "uid_map of container init (pid " << state->pid << "): " << uid_map;
  std::istringstream uid_fields(uid_map);
  uint64_t inside = 99, outside = 0, count = 0;
  uid_fields >> inside >> outside >> count;
  EXPECT_EQ(inside, 0u);
  EXPECT_NE(outside, 0u);
  EXPECT_EQ(outside, ids->base);
  EXPECT_EQ(count, ids->count);
  EXPECT_EQ(gid_map, uid_map);
  struct stat proc_st {};
  ASSERT_EQ(::stat(("/proc/" + std::to_string(state->pid)).c_str(), &proc_st), 0);
  EXPECT_EQ(proc_st.st_uid, ids->base) << "the init runs as the mapped host UID";

  // Limits reached the cgroup (v1 hierarchy on this host; v2 where unified).
  const std::string cgroup = "/" + cgroup_parent_ + "/ws-it";
  if (fs::exists("/sys/fs/cgroup/memory")) {
    const std::string mem = "/sys/fs/cgroup/memory" + cgroup + "/memory.limit_in_bytes";
    std::cout << mem << " = " << read_file(mem);
    EXPECT_EQ(std::stoull(read_file(mem)), 256ull << 20) << mem;
    EXPECT_EQ(std::stoll(read_file("/sys/fs/cgroup/cpu" + cgroup + "/cpu.cfs_quota_us")), 50000);
  } else {
    EXPECT_EQ(std::stoull(read_file("/sys/fs/cgroup" + cgroup + "/memory.max")), 256ull << 20);
    EXPECT_EQ(read_file("/sys/fs/cgroup" + cgroup + "/cpu.max"), "50000 100000\n");
  }

  // The sleep entrypoint's TERM trap makes SIGTERM enough: no wait for the grace period.
  const auto t0 = std::chrono::steady_clock::now();
  const auto stopped = stop_container(*runtime_, id, 10s);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(stopped.ok()) << stopped.error().message;
  EXPECT_LT(took, 5s);
  const auto after = runtime_->state(id);
  ASSERT_TRUE(after.ok()) << after.error().message;
  EXPECT_EQ(after->status, ContainerStatus::kStopped);

  ASSERT_TRUE(runtime_->remove(id, /*force=*/false).ok());
  const auto listed = runtime_->list();
  ASSERT_TRUE(listed.ok()) << listed.error().message;
  EXPECT_TRUE(listed->empty());
  const auto gone = runtime_->state(id);
  ASSERT_FALSE(gone.ok());
  EXPECT_TRUE(gone.error().is_not_found()) << gone.error().message;
}

TEST_F(AgentRuntimeTest, StopEscalatesToSigkill) {
  auto allocator = IdRangeAllocator::create(IdPool{2000000, 65536 * 4});
  ASSERT_TRUE(allocator.ok());
  const auto ids = allocator->allocate("ws-stubborn");
  ASSERT_TRUE(ids.ok());
  SpecInput spec;
  // PID 1 that ignores SIGTERM: only the SIGKILL after the grace period stops it.
  spec.args = {"/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"};
  const std::string id = "cvm-it-kill-" + std::to_string(::getpid());
  const std::string bundle = prepare_bundle("ws-stubborn", *ids, spec);
  ASSERT_FALSE(bundle.empty());
  const auto started = run(id, bundle);
  ASSERT_TRUE(started.ok()) << started.error().message;

  const auto t0 = std::chrono::steady_clock::now();
  const auto stopped = stop_container(*runtime_, id, 700ms);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(stopped.ok()) << stopped.error().message;
  EXPECT_GE(took, 700ms);
  EXPECT_LT(took, 10s);
  EXPECT_EQ(runtime_->state(id)->status, ContainerStatus::kStopped);
  EXPECT_TRUE(runtime_->remove(id, false).ok());
}

TEST_F(AgentRuntimeTest, MissingImageNamesTheTagOrTheLayout) {
  ImageTool images(image_options());
  auto missing_tag =
      images.unpack(layout_ref("no-such-tag"), work_ + "/b1", IdRange{3000000, 65536});
  ASSERT_FALSE(missing_tag.ok());
  EXPECT_TRUE(missing_tag.error().is_not_found()) << missing_tag.error().message;
  EXPECT_NE(missing_tag.error().message.find("tag 'no-such-tag' not found"), std::string::npos)
      << missing_tag.error().message;

  auto missing_layout = images.unpack("oci:" + work_ + "/no-such-layout:latest", work_ + "/b2",
                                      IdRange{3000000, 65536});
  ASSERT_FALSE(missing_layout.ok());
  EXPECT_TRUE(missing_layout.error().is_not_found()) << missing_layout.error().message;
  EXPECT_NE(missing_layout.error().message.find("no image layout at"), std::string::npos)
      << missing_layout.error().message;
  std::cout << "missing tag: " << missing_tag.error().message
            << "\nmissing layout: " << missing_layout.error().message << "\n";
}

TEST_F(AgentRuntimeTest, UnpackNamesAnUntraversableParent) {
  fs::create_directories(work_ + "/private");
  fs::permissions(work_ + "/private", fs::perms::owner_all);
  ImageTool images(image_options());
  auto r = images.unpack(layout_ref(), work_ + "/private/bundle", IdRange{3000000, 65536});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find(work_ + "/private is mode 0700"), std::string::npos)
      << r.error().message;
}

TEST_F(AgentRuntimeTest, UnpackRefusesNonEmptyBundle) {
  fs::create_directories(work_ + "/busy/x");
  ImageTool images(image_options());
  auto r = images.unpack(layout_ref(), work_ + "/busy", IdRange{3000000, 65536});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.error().is_conflict());
}

TEST_F(AgentRuntimeTest, CreateFailureCarriesRuncMessageAndLeavesNothing) {
  auto allocator = IdRangeAllocator::create(IdPool{4000000, 65536});
  const auto ids = allocator->allocate("ws-bad");
  SpecInput spec;
  const std::string bundle = prepare_bundle("ws-bad", *ids, spec);
  ASSERT_FALSE(bundle.empty());
  spec.rootfs = "no-such-rootfs";
  spec.ids = *ids;
  ASSERT_TRUE(write_runtime_spec(bundle, build_runtime_spec(spec)).ok());

  const auto started = run("cvm-it-bad-" + std::to_string(::getpid()), bundle);
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.error().domain, ErrorDomain::kTool);
  EXPECT_NE(started.error().message.find("no-such-rootfs"), std::string::npos)
      << started.error().message;
  const auto listed = runtime_->list();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
}

TEST_F(AgentRuntimeTest, UnknownContainerIsNotFound) {
  const auto state = runtime_->state("cvm-it-never-created");
  ASSERT_FALSE(state.ok());
  EXPECT_TRUE(state.error().is_not_found()) << state.error().message;
  EXPECT_TRUE(runtime_->kill("cvm-it-never-created", SIGTERM).error().is_not_found());
  const auto listed = runtime_->list();  // an empty/fresh state dir lists as nothing
  ASSERT_TRUE(listed.ok()) << listed.error().message;
  EXPECT_TRUE(listed->empty());
}

TEST_F(AgentRuntimeTest, ProbesThisHost) {
  const auto runtime = probe_runtime(ToolPaths{});
  EXPECT_TRUE(runtime.ready()) << runtime.detail();
  EXPECT_FALSE(runtime.runc_version().empty());
  std::cout << "runtime: " << runtime.ShortDebugString() << "\n";
  const auto host = probe_host(HostRoots{});
  EXPECT_FALSE(host.kernel_version().empty());
  std::cout << "host: " << host.ShortDebugString() << "\n";
  const auto capacity = probe_capacity(HostRoots{});
  EXPECT_GT(capacity.cpu_millicores(), 0u);
  EXPECT_GT(capacity.memory_bytes(), 0u);
  std::cout << "capacity: " << capacity.ShortDebugString() << "\n";
}

}  // namespace
}  // namespace cvm::agent
