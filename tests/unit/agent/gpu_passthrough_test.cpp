// Handing GPUs to a workspace: the distro rule, the plan (pure), and the collectors over fixture
// device nodes (mknod in a temp dir: root only, skipped otherwise) and library trees.
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "cvm/agent/gpu_passthrough.h"
#include "fixture_tree.h"

namespace cvm::agent {
namespace {

using testing::FixtureTree;

TEST(ImageLibraryDir, PerDistro) {
  EXPECT_EQ(image_library_dir("ID=debian\nVERSION_ID=\"12\"\n"), "/usr/lib/x86_64-linux-gnu");
  EXPECT_EQ(image_library_dir("NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n"),
            "/usr/lib/x86_64-linux-gnu");
  EXPECT_EQ(image_library_dir("ID=pop\nID_LIKE=\"ubuntu debian\"\n"), "/usr/lib/x86_64-linux-gnu");
  EXPECT_EQ(image_library_dir("ID=ubuntu\n", "aarch64"), "/usr/lib/aarch64-linux-gnu");
  EXPECT_EQ(image_library_dir("ID=\"rhel\"\nID_LIKE=\"fedora\"\n"), "/usr/lib64");
  EXPECT_EQ(image_library_dir("ID=rocky\nID_LIKE=\"rhel centos fedora\"\n"), "/usr/lib64");
  EXPECT_EQ(image_library_dir("ID=fedora\n"), "/usr/lib64");
  EXPECT_EQ(image_library_dir("ID=alpine\n"), "/usr/lib");
  EXPECT_EQ(image_library_dir(""), "/usr/lib") << "no os-release: the plain folder";
  EXPECT_EQ(image_library_dir("IDX=debian\nVERSION_ID=debian\n"), "/usr/lib");
}

std::vector<DeviceNode> host_nodes() {
  std::vector<DeviceNode> nodes = {{"/dev/nvidiactl", 195, 255, 0666},
                                   {"/dev/nvidia-uvm", 508, 0, 0666},
                                   {"/dev/nvidia-uvm-tools", 508, 1, 0666},
                                   {"/dev/nvidia-modeset", 195, 254, 0666}};
  for (uint32_t i = 0; i < 8; ++i)
    nodes.push_back({"/dev/nvidia" + std::to_string(i), 195, i, 0666});
  return nodes;
}

TEST(GpuPlan, AssignedGpusAndTheSharedNodes) {
  GpuPassthroughInput in;
  in.minors = {2, 5};
  in.uuids = {"GPU-aaa", "GPU-bbb"};
  in.present_devices = host_nodes();
  in.libraries = {{"libcuda.so.1", "libcuda.so.535.129.03"},
                  {"libnvidia-ml.so.1", "libnvidia-ml.so.535.129.03"}};
  in.library_source_dir = "/cvm/gpu-lib";
  in.image_library_dir = "/usr/lib/x86_64-linux-gnu";
  auto plan = plan_gpu_passthrough(in);
  ASSERT_TRUE(plan.ok()) << plan.error().message;
  std::vector<std::string> paths;
  for (const auto& d : plan->devices) paths.push_back(d.path);
  EXPECT_EQ(paths, (std::vector<std::string>{"/dev/nvidia2", "/dev/nvidia5", "/dev/nvidiactl",
                                             "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                                             "/dev/nvidia-modeset"}));
  EXPECT_EQ(plan->devices[1].minor, 5);
  ASSERT_EQ(plan->libraries.size(), 2u);
  EXPECT_EQ(plan->libraries[0], (BindMount{"/cvm/gpu-lib/libcuda.so.535.129.03",
                                           "/usr/lib/x86_64-linux-gnu/libcuda.so.1", true}));
  EXPECT_EQ(plan->env, (std::vector<std::string>{"NVIDIA_VISIBLE_DEVICES=GPU-aaa,GPU-bbb"}));
  EXPECT_TRUE(plan->warnings.empty());
}

TEST(GpuPlan, OnlyTheSharedNodesThatExist) {
  GpuPassthroughInput in;
  in.minors = {0};
  in.uuids = {"GPU-0"};
  in.present_devices = {{"/dev/nvidia0", 195, 0, 0666}, {"/dev/nvidiactl", 195, 255, 0666}};
  in.libraries = {{"libcuda.so.1", "libcuda.so.1"}};
  in.image_library_dir = "/usr/lib64";
  auto plan = plan_gpu_passthrough(in);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->devices.size(), 2u);
  EXPECT_EQ(plan->devices[1].path, "/dev/nvidiactl");
  EXPECT_EQ(plan->libraries[0].destination, "/usr/lib64/libcuda.so.1");
}

TEST(GpuPlan, MissingAssignedGpuIsAnError) {
  GpuPassthroughInput in;
  in.minors = {9};
  in.present_devices = host_nodes();
  auto plan = plan_gpu_passthrough(in);
  ASSERT_FALSE(plan.ok());
  EXPECT_TRUE(plan.error().is_not_found());
  EXPECT_NE(plan.error().message.find("/dev/nvidia9"), std::string::npos);
}

TEST(GpuPlan, NoGpusNoDevicesNoEnv) {
  GpuPassthroughInput in;
  in.present_devices = host_nodes();
  auto plan = plan_gpu_passthrough(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->devices.empty());
  EXPECT_TRUE(plan->env.empty());
}

TEST(GpuPlan, WarnsWithoutControlNodeOrLibraries) {
  GpuPassthroughInput in;
  in.minors = {1, 1};
  in.present_devices = {{"/dev/nvidia1", 195, 1, 0666}};
  auto plan = plan_gpu_passthrough(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->devices.size(), 1u) << "a repeated minor is handed over once";
  EXPECT_EQ(plan->warnings.size(), 2u);
}

TEST(CollectDevices, FixtureNodes) {
  if (::geteuid() != 0) GTEST_SKIP() << "mknod of character devices needs root";
  FixtureTree tree;
  tree.mkdir("dev");
  const auto node = [&](const std::string& name, unsigned maj, unsigned min) {
    ASSERT_EQ(::mknod(tree.path("dev/" + name).c_str(), S_IFCHR | 0600, makedev(maj, min)), 0)
        << name;
  };
  for (unsigned i = 0; i < 8; ++i) node("nvidia" + std::to_string(i), 195, i);
  node("nvidiactl", 195, 255);
  node("nvidia-uvm", 508, 0);
  node("nvidia-modeset", 195, 254);
  node("nvidia-caps-other", 237, 1);  // not one of ours
  tree.write("dev/nvidia9", "a regular file, not a device");
  const auto devices = collect_nvidia_devices(tree.path("dev"));
  ASSERT_EQ(devices.size(), 11u);
  EXPECT_EQ(devices[0].path, "/dev/nvidia-modeset");
  const auto gpu7 = std::find_if(devices.begin(), devices.end(),
                                 [](const DeviceNode& d) { return d.path == "/dev/nvidia7"; });
  ASSERT_NE(gpu7, devices.end());
  EXPECT_EQ(gpu7->major, 195);
  EXPECT_EQ(gpu7->minor, 7);

  // End to end over the fixture: two GPUs of eight, uvm-tools absent on this host.
  GpuPassthroughInput in;
  in.minors = {3, 7};
  in.present_devices = devices;
  auto plan = plan_gpu_passthrough(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->devices.size(), 5u);
}

TEST(CollectLibraries, FollowsLinksInsideTheFolderOnly) {
  FixtureTree tree;
  tree.write("lib/libcuda.so.535.129.03", "elf");
  tree.symlink("libcuda.so.535.129.03", "lib/libcuda.so.1");
  tree.symlink("libcuda.so.1", "lib/libcuda.so");  // two hops
  tree.write("lib/libnvidia-ml.so.535.129.03", "elf");
  tree.symlink(tree.path("lib/libnvidia-ml.so.535.129.03"), "lib/libnvidia-ml.so.1");  // absolute
  tree.write("outside/libsecret.so.1", "host file");
  tree.symlink("../outside/libsecret.so.1", "lib/libescape.so.1");
  tree.symlink("/etc/passwd", "lib/libpasswd.so");
  tree.symlink("libnothing.so.9", "lib/libdangling.so.1");
  tree.symlink("libloop.so.2", "lib/libloop.so.1");
  tree.symlink("libloop.so.1", "lib/libloop.so.2");
  tree.write("lib/README", "not a library");
  const auto scan = collect_library_files(tree.path("lib"));
  EXPECT_EQ(scan.files, (std::vector<LibraryFile>{
                            {"libcuda.so", "libcuda.so.535.129.03"},
                            {"libcuda.so.1", "libcuda.so.535.129.03"},
                            {"libcuda.so.535.129.03", "libcuda.so.535.129.03"},
                            {"libnvidia-ml.so.1", "libnvidia-ml.so.535.129.03"},
                            {"libnvidia-ml.so.535.129.03", "libnvidia-ml.so.535.129.03"},
                        }));
  EXPECT_EQ(scan.skipped,
            (std::vector<std::string>{"libdangling.so.1", "libescape.so.1", "libloop.so.1",
                                      "libloop.so.2", "libpasswd.so"}));
}

TEST(CollectLibraries, MissingFolderIsEmpty) {
  const auto scan = collect_library_files("/nonexistent/cvm/lib");
  EXPECT_TRUE(scan.files.empty());
  EXPECT_TRUE(scan.skipped.empty());
}

}  // namespace
}  // namespace cvm::agent
