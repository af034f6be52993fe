// The agent's GPU discovery and health: the parsers, procfs/sysfs fixture trees, and the real NVML
// code path (dlopen, dlsym, calls, event sets) against fake_nvml.cpp, a test double of
// libnvidia-ml.so.1 for hardware these machines do not have.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cvm/agent/gpu/discovery.h"
#include "cvm/agent/gpu/health.h"
#include "cvm/agent/gpu/monitor.h"
#include "cvm/agent/gpu/nvml.h"
#include "cvm/base/clock.h"
#include "cvm/broker/allocator.h"
#include "cvm/test/atomic_clock.h"
#include "cvm/test/wait.h"

namespace cvm::agent::gpu {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr uint64_t kGiB = 1ULL << 30;

using cvm::test::wait_until;

// ---- pure parsers -------------------------------------------------------------------------------

constexpr std::string_view kInformation =
    "Model: \t\t NVIDIA H100 80GB HBM3\n"
    "IRQ:   \t\t 94\n"
    "GPU UUID: \t GPU-5f2e1b3c-0d4a-4f5e-9a7b-1c2d3e4f5a6b\n"
    "Video BIOS: \t 96.00.74.00.01\n"
    "Bus Type: \t PCIe\n"
    "DMA Size: \t 52 bits\n"
    "DMA Mask: \t 0xfffffffffffff\n"
    "Bus Location: \t 0000:1b:00.0\n"
    "Device Minor: \t 3\n"
    "GPU Excluded:\t No\n";

TEST(ProcInformation, ParsesTheDriverFile) {
  const auto info = parse_proc_gpu_information(kInformation);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->model, "NVIDIA H100 80GB HBM3");
  EXPECT_EQ(info->uuid, "GPU-5f2e1b3c-0d4a-4f5e-9a7b-1c2d3e4f5a6b");
  EXPECT_EQ(info->bus_location, "0000:1b:00.0");
  EXPECT_EQ(info->minor, 3u);
}

TEST(ProcInformation, NeedsAUuidAndAMinor) {
  EXPECT_FALSE(parse_proc_gpu_information("Model: X\nDevice Minor: 0\n"));
  EXPECT_FALSE(parse_proc_gpu_information("GPU UUID: GPU-1\nDevice Minor: x\n"));
  EXPECT_FALSE(parse_proc_gpu_information("GPU UUID: GPU-?\?\?\?\?\?\?\?\nDevice Minor: 0\n"));
  EXPECT_FALSE(parse_proc_gpu_information(""));
  EXPECT_FALSE(parse_proc_gpu_information("\xff\xfe garbage without colons"));
  EXPECT_TRUE(parse_proc_gpu_information("GPU UUID: GPU-1\nDevice Minor: 0"));
}

TEST(BusId, NormalizedToTheSysfsForm) {
  EXPECT_EQ(normalize_bus_id("00000000:07:00.0"), "0000:07:00.0");
  EXPECT_EQ(normalize_bus_id("0000:1B:00.0\n"), "0000:1b:00.0");
  EXPECT_EQ(normalize_bus_id("0001:af:1f.7"), "0001:af:1f.7");
  EXPECT_EQ(normalize_bus_id("07:00.0"), "0000:07:00.0");
  EXPECT_EQ(normalize_bus_id(""), "");
  EXPECT_EQ(normalize_bus_id("0000:07:00"), "");
  EXPECT_EQ(normalize_bus_id("0000:107:00.0"), "");
  EXPECT_EQ(normalize_bus_id("zz:07:00.0"), "");
  EXPECT_EQ(normalize_bus_id("0000:07:20.0"), "");  // device > 31
}

TEST(MigProfile, FromTheInstanceName) {
  EXPECT_EQ(mig_profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb"), "1g.5gb");
  EXPECT_EQ(mig_profile_from_name("NVIDIA H100 80GB HBM3 MIG 3g.40gb "), "3g.40gb");
  EXPECT_EQ(mig_profile_from_name("NVIDIA A100-SXM4-40GB"), "");
}

TEST(PciPath, BelowSysDevices) {
  EXPECT_EQ(pci_path_from_sysfs_target("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"),
            "pci0000:00/0000:00:01.0/0000:01:00.0");
  EXPECT_EQ(pci_path_from_sysfs_target("/tmp/x/sys/devices/pci0000:80/0000:80:03.0/"),
            "pci0000:80/0000:80:03.0");
  EXPECT_EQ(pci_path_from_sysfs_target("/sys/devices/pci0000:00"), "");
  EXPECT_EQ(pci_path_from_sysfs_target("/sys/devices/platform/x"), "");
}

TEST(SysfsHex, Values) {
  EXPECT_EQ(parse_sysfs_hex("0x10de\n"), 0x10deu);
  EXPECT_EQ(parse_sysfs_hex("0x030200"), 0x030200u);
  EXPECT_FALSE(parse_sysfs_hex("nope"));
  EXPECT_FALSE(parse_sysfs_hex(""));
}

// ---- health -------------------------------------------------------------------------------------

TEST(Xid, ApplicationErrorsAreNotHardwareEvents) {
  for (uint32_t x : {13u, 31u, 43u, 45u, 68u, 109u}) EXPECT_FALSE(is_critical_xid(x)) << x;
  for (uint32_t x : {48u, 63u, 64u, 74u, 79u, 92u, 94u, 95u, 119u}) {
    EXPECT_TRUE(is_critical_xid(x)) << x;
  }
  EXPECT_EQ(xid_text(79), "XID 79: GPU has fallen off the bus");
  EXPECT_EQ(xid_text(4321), "XID 4321");
}

TEST(HealthTracker, EventsAndRecovery) {
  GpuHealthTracker t;
  cvm::v1::GpuDevice g;
  g.set_uuid("GPU-a");
  g.set_healthy(true);
  EXPECT_FALSE(t.on_xid("GPU-a", 13, 100));  // application error: nothing
  auto copy = g;
  t.apply(copy);
  EXPECT_EQ(copy.last_health_event_unix_ms(), 0);
  EXPECT_TRUE(t.on_xid("GPU-a", 48, 200));
  copy = g;
  t.apply(copy);
  EXPECT_TRUE(copy.healthy());
  EXPECT_EQ(copy.last_xid(), 48u);
  EXPECT_EQ(copy.last_health_event_unix_ms(), 200);
  EXPECT_EQ(copy.health_reason(), "XID 48: double-bit ECC error");
  // ECC: the first poll is the baseline, an increase is an event.
  EXPECT_FALSE(t.on_ecc_count("GPU-a", 5, 300));
  EXPECT_FALSE(t.on_ecc_count("GPU-a", 5, 400));
  EXPECT_TRUE(t.on_ecc_count("GPU-a", 7, 500));
  copy = g;
  t.apply(copy);
  EXPECT_EQ(copy.ecc_uncorrected_errors(), 7u);
  EXPECT_EQ(copy.health_reason(), "2 new uncorrectable ECC errors (7 in total)");
  EXPECT_EQ(copy.last_health_event_unix_ms(), 500);
  // Silent, then answering again.
  EXPECT_TRUE(t.on_query("GPU-a", "GPU is lost", 600));
  EXPECT_FALSE(t.on_query("GPU-a", "GPU is lost", 700));
  copy = g;
  t.apply(copy);
  EXPECT_FALSE(copy.healthy());
  EXPECT_EQ(copy.health_reason(), "not answering: GPU is lost");
  EXPECT_TRUE(t.on_query("GPU-a", "", 800));
  copy = g;
  t.apply(copy);
  EXPECT_TRUE(copy.healthy());
  EXPECT_EQ(copy.last_health_event_unix_ms(), 600);  // the broker's period runs from here
  // Other GPUs are untouched.
  cvm::v1::GpuDevice other;
  other.set_uuid("GPU-b");
  other.set_healthy(true);
  t.apply(other);
  EXPECT_TRUE(other.healthy());
  EXPECT_TRUE(other.health_reason().empty());
}

// ---- fixture trees ------------------------------------------------------------------------------

// A procfs + sysfs tree in a temp dir: PCI devices under /sys/devices with /sys/bus/pci/devices
// links, as the kernel lays them out.
class Tree {
 public:
  Tree() {
    char tmpl[] = "/tmp/cvm-gpu-XXXXXX";
    root_ = mkdtemp(tmpl);
    fs::create_directories(root_ / "proc");
    fs::create_directories(root_ / "sys/bus/pci/devices");
  }
  ~Tree() {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  [[nodiscard]] GpuRoots roots() const {
    return {(root_ / "proc").string(), (root_ / "sys").string()};
  }
  // path: "pci0000:00/0000:00:01.0/0000:01:00.0"; the last element is the device.
  void pci(const std::string& path, uint32_t vendor, uint32_t cls, int numa,
           const std::map<std::string, std::string>& extra = {}) {
    const auto dev = root_ / "sys/devices" / path;
    fs::create_directories(dev);
    write(dev / "vendor", hex(vendor, 4));
    write(dev / "class", hex(cls, 6));
    write(dev / "numa_node", std::to_string(numa));
    for (const auto& [k, v] : extra) write(dev / k, v);
    const auto id = fs::path(path).filename();
    fs::create_symlink(fs::path("../../../devices") / path, root_ / "sys/bus/pci/devices" / id);
  }
  void nvidia_proc(const std::string& bus, const std::string& uuid, int minor,
                   const std::string& model = "Tesla V100-SXM2-16GB") {
    const auto dir = root_ / "proc/driver/nvidia/gpus" / bus;
    fs::create_directories(dir);
    write(dir / "information", "Model: \t\t " + model + "\nGPU UUID: \t " + uuid +
                                   "\nBus Location: \t " + bus + "\nDevice Minor: \t " +
                                   std::to_string(minor) + "\n");
  }
  [[nodiscard]] fs::path path(const std::string& rel) const { return root_ / rel; }

  static void write(const fs::path& p, const std::string& text) {
    std::ofstream out(p);
    out << text << "\n";
  }

 private:
  static std::string hex(uint32_t v, int width) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%0*x", width, v);
    return buf;
  }
  fs::path root_;
};

// The DGX-like machine of the broker fixture, as sysfs shows it: two sockets, two root ports
// each, one switch per port with two GPUs.
std::string dgx_pci_path(int i) {
  const int socket = i / 4;
  const int port = (i / 2) % 2;
  const int slot = i % 2;
  const int sw = (socket == 0 ? 0x01 : 0x81) + port * 0x10;
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "pci0000:%s/0000:%s:%02x.0/0000:%02x:00.0/0000:%02x:%02x.0/0000:%02x:00.0",
                socket == 0 ? "00" : "80", socket == 0 ? "00" : "80", 1 + 2 * port, sw, sw + 1,
                slot, sw + 2 + slot);
  return buf;
}
std::string dgx_bus(int i) { return fs::path(dgx_pci_path(i)).filename().string(); }

TEST(Procfs, DriverWithoutNvml) {
  Tree t;
  t.pci("pci0000:00/0000:00:1e.0", 0x10de, 0x030200, 0);
  t.nvidia_proc("0000:00:1e.0", "GPU-aaaa", 0);
  t.nvidia_proc("0000:00:1f.0", "GPU-bbbb", 1, "Tesla T4");  // not in sysfs: no topology
  t.nvidia_proc("0000:00:20.0", "GPU-?\?\?\?\?\?\?\?", 2);   // unreadable: skipped
  const auto gpus = discover_procfs(t.roots());
  ASSERT_EQ(gpus.size(), 2u);
  EXPECT_EQ(gpus[0].uuid(), "GPU-aaaa");
  EXPECT_EQ(gpus[0].name(), "Tesla V100-SXM2-16GB");
  EXPECT_EQ(gpus[0].vendor(), cvm::v1::NVIDIA);
  EXPECT_EQ(gpus[0].minor(), 0u);
  EXPECT_EQ(gpus[0].pci_bus_id(), "0000:00:1e.0");
  EXPECT_EQ(gpus[0].pci_path(), "pci0000:00/0000:00:1e.0");
  EXPECT_EQ(gpus[0].numa_node(), 0);
  EXPECT_EQ(gpus[0].discovered_by(), "procfs");
  EXPECT_TRUE(gpus[0].healthy());
  EXPECT_EQ(gpus[1].uuid(), "GPU-bbbb");
  EXPECT_TRUE(gpus[1].pci_path().empty());
  EXPECT_FALSE(gpus[1].has_numa_node());
}

TEST(Sysfs, AmdIsReportedAndUnsupported) {
  Tree t;
  t.pci("pci0000:00/0000:00:03.1/0000:03:00.0", 0x1002, 0x030000, -1,
        {{"device", "0x740f"}, {"mem_info_vram_total", "68702699520"}, {"unique_id", "8a1b2c3d"}});
  t.pci("pci0000:00/0000:00:03.1/0000:03:00.1", 0x1002, 0x040300, -1);  // its HDMI audio
  t.pci("pci0000:00/0000:00:05.0", 0x10de, 0x030200, 0);                // NVIDIA, no driver
  t.pci("pci0000:00/0000:00:1f.0", 0x8086, 0x060100, 0);
  const auto amd = discover_sysfs_amd(t.roots());
  ASSERT_EQ(amd.size(), 1u);
  EXPECT_EQ(amd[0].uuid(), "AMD-8a1b2c3d");
  EXPECT_EQ(amd[0].vendor(), cvm::v1::AMD);
  EXPECT_EQ(amd[0].name(), "AMD GPU [1002:740f]");
  EXPECT_EQ(amd[0].memory_bytes(), 68702699520u);
  EXPECT_FALSE(amd[0].has_numa_node());  // -1: unknown
  EXPECT_EQ(amd[0].pci_path(), "pci0000:00/0000:00:03.1/0000:03:00.0");
  // The broker never leases it.
  broker::NodeGpuInventory inv{"n", true, amd};
  EXPECT_FALSE(broker::choose_gpus(inv, {}, 1, 0).ok());
  // The NVIDIA card without a driver is not a GPU to lease (no /dev/nvidia<minor>).
  const auto d = discover_gpus(t.roots(), nullptr, "no NVML");
  EXPECT_EQ(d.source, "none");
  EXPECT_EQ(d.gpus.size(), 1u);
}

TEST(Discovery, NoGpuNoDriverNoNvmlIsAnEmptyList) {
  Tree t;
  const auto d = discover_gpus(t.roots(), nullptr, "cannot load libnvidia-ml.so.1");
  EXPECT_TRUE(d.gpus.empty());
  EXPECT_EQ(d.source, "none");
  EXPECT_EQ(d.detail, "cannot load libnvidia-ml.so.1");
  // Roots that do not exist at all.
  EXPECT_TRUE(discover_gpus({"/nonexistent/proc", "/nonexistent/sys"}, nullptr, "").gpus.empty());
}

// ---- NVML through the fake library --------------------------------------------------------------

class FakeNvml : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = tree_.path("nvml.json");
    events_ = tree_.path("nvml.events");
    Tree::write(events_, "");
    setenv("CVM_FAKE_NVML_CONFIG", config_.c_str(), 1);
    setenv("CVM_FAKE_NVML_EVENTS", events_.c_str(), 1);
  }
  void TearDown() override {
    unsetenv("CVM_FAKE_NVML_CONFIG");
    unsetenv("CVM_FAKE_NVML_EVENTS");
  }
  void configure(const nlohmann::json& j) { Tree::write(config_, j.dump()); }
  void event(const std::string& line) {
    std::ofstream out(events_, std::ios::app);
    out << line << "\n";
  }

  // 8 GPUs, two NVLink islands of 4 (2 links between every pair of an island), in the sysfs tree.
  nlohmann::json dgx_config() {
    nlohmann::json devices = nlohmann::json::array();
    for (int i = 0; i < 8; ++i) {
      tree_.pci(dgx_pci_path(i), 0x10de, 0x030200, i / 4);
      nlohmann::json links = nlohmann::json::array();
      for (int j = (i / 4) * 4; j < (i / 4) * 4 + 4; ++j) {
        if (j == i) continue;
        links.push_back("0000" + dgx_bus(j));  // NVML's 8-digit domain form
        links.push_back("0000" + dgx_bus(j));
      }
      devices.push_back({{"uuid", "GPU-" + std::to_string(1000 + i)},
                         {"name", "NVIDIA H100 80GB HBM3"},
                         {"memory", 80 * kGiB},
                         {"minor", i},
                         {"bus_id", "0000" + dgx_bus(i)},
                         {"nvlinks", links}});
    }
    return {{"driver", "550.54.15"}, {"devices", devices}};
  }

  Tree tree_;
  fs::path config_;
  fs::path events_;
};

TEST_F(FakeNvml, AMissingLibraryIsNotFound) {
  auto n = Nvml::load("/nonexistent/libnvidia-ml.so.1");
  ASSERT_FALSE(n.ok());
  EXPECT_TRUE(n.error().is_not_found());
}

TEST_F(FakeNvml, NotALibraryOfNvml) {
  // A shared library that is not NVML: the entry points are missing.
  auto n = Nvml::load("libm.so.6");
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.error().message.find("lacks the NVML entry points"), std::string::npos);
}

TEST_F(FakeNvml, DriverNotLoadedFallsBackToProcfs) {
  configure({{"init_error", 9}});
  auto n = Nvml::load(CVM_FAKE_NVML_PATH);
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.error().message.find("Driver Not Loaded"), std::string::npos) << n.error().message;
  tree_.nvidia_proc("0000:00:1e.0", "GPU-aaaa", 0);
  const auto d = discover_gpus(tree_.roots(), nullptr, n.error().message);
  EXPECT_EQ(d.source, "procfs");
  ASSERT_EQ(d.gpus.size(), 1u);
  EXPECT_EQ(d.gpus[0].uuid(), "GPU-aaaa");
}

TEST_F(FakeNvml, DgxTopologyFromNvmlAndSysfs) {
  configure(dgx_config());
  auto n = Nvml::load(CVM_FAKE_NVML_PATH);
  ASSERT_TRUE(n.ok()) << n.error().message;
  EXPECT_EQ((*n)->driver_version(), "550.54.15");
  auto d = discover_gpus(tree_.roots(), n->get(), "");
  EXPECT_EQ(d.source, "nvml");
  ASSERT_EQ(d.gpus.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const auto& g = d.gpus[static_cast<size_t>(i)];
    EXPECT_EQ(g.uuid(), "GPU-" + std::to_string(1000 + i));
    EXPECT_EQ(g.name(), "NVIDIA H100 80GB HBM3");
    EXPECT_EQ(g.memory_bytes(), 80 * kGiB);
    EXPECT_EQ(g.minor(), static_cast<uint32_t>(i));
    EXPECT_EQ(g.pci_bus_id(), dgx_bus(i));
    EXPECT_EQ(g.pci_path(), dgx_pci_path(i));
    EXPECT_EQ(g.numa_node(), i / 4);
    EXPECT_EQ(g.discovered_by(), "nvml");
    EXPECT_EQ(g.nvswitch_links(), 0u);
    ASSERT_EQ(g.nvlink_peers_size(), 3);
    for (const auto& p : g.nvlink_peers()) {
      EXPECT_EQ(p.links(), 2u);
      const int peer = std::stoi(p.uuid().substr(4)) - 1000;
      EXPECT_EQ(peer / 4, i / 4) << "peer outside the island";
    }
  }
  // What the agent reports is what the broker's topology choice works on.
  broker::NodeGpuInventory inv{"dgx", true, d.gpus};
  std::set<uint32_t> four;
  for (const auto& g : broker::choose_gpus(inv, {}, 4, 0).gpus) four.insert(g.minor());
  EXPECT_EQ(four, (std::set<uint32_t>{0, 1, 2, 3}));
  broker::GpuLeases l;
  l.add("GPU-1000", "ws");
  std::set<uint32_t> two;
  for (const auto& g : broker::choose_gpus(inv, l, 2, 0).gpus) two.insert(g.minor());
  EXPECT_EQ(two, (std::set<uint32_t>{2, 3}));
}

TEST_F(FakeNvml, NvswitchLinksAndMigInstances) {
  nlohmann::json sw = nlohmann::json::array();
  for (int k = 0; k < 12; ++k) sw.push_back("00000000:c" + std::to_string(k % 6) + ":00.0");
  configure({{"devices",
              {{{"uuid", "GPU-a"},
                {"name", "NVIDIA A100-SXM4-80GB"},
                {"memory", 80 * kGiB},
                {"minor", 0},
                {"bus_id", "00000000:07:00.0"},
                {"nvlinks", sw},
                {"mig",
                 {{{"uuid", "MIG-a-1"},
                   {"name", "NVIDIA A100-SXM4-80GB MIG 3g.40gb"},
                   {"memory", 40 * kGiB},
                   {"gi", 1},
                   {"ci", 0}},
                  {{"uuid", "MIG-a-2"},
                   {"name", "NVIDIA A100-SXM4-80GB MIG 1g.10gb"},
                   {"memory", 10 * kGiB},
                   {"gi", 9},
                   {"ci", 0}}}}},
               {{"uuid", "GPU-b"},
                {"name", "NVIDIA A100-SXM4-80GB"},
                {"memory", 80 * kGiB},
                {"minor", 1},
                {"bus_id", "00000000:0f:00.0"},
                {"nvlinks", sw}}}}});
  auto n = Nvml::load(CVM_FAKE_NVML_PATH);
  ASSERT_TRUE(n.ok()) << n.error().message;
  auto devs = (*n)->devices(tree_.roots());
  ASSERT_TRUE(devs.ok());
  ASSERT_EQ(devs->size(), 4u);
  const auto& a = (*devs)[0];
  EXPECT_TRUE(a.mig_enabled());
  EXPECT_EQ(a.nvswitch_links(), 12u);
  EXPECT_EQ(a.nvlink_peers_size(), 0);
  const auto& m1 = (*devs)[1];
  EXPECT_EQ(m1.uuid(), "MIG-a-1");
  EXPECT_EQ(m1.mig_parent_uuid(), "GPU-a");
  EXPECT_EQ(m1.mig_profile(), "3g.40gb");
  EXPECT_EQ(m1.mig_gpu_instance_id(), 1u);
  EXPECT_EQ(m1.memory_bytes(), 40 * kGiB);
  EXPECT_EQ(m1.minor(), 0u);
  EXPECT_EQ((*devs)[2].mig_profile(), "1g.10gb");
  EXPECT_FALSE((*devs)[3].mig_enabled());
  // The broker leases the instances and the whole GPU b, never GPU a itself.
  broker::NodeGpuInventory inv{"n", true, *devs};
  auto c = broker::choose_gpus(inv, {}, 3, 0);
  ASSERT_TRUE(c.ok());
  std::set<std::string> got;
  for (const auto& g : c.gpus) got.insert(g.uuid());
  EXPECT_EQ(got, (std::set<std::string>{"MIG-a-1", "MIG-a-2", "GPU-b"}));
  c = broker::choose_gpus(inv, {}, 1, 20 * kGiB);
  EXPECT_EQ(c.gpus[0].uuid(), "MIG-a-1");  // first by minor among those with enough memory
}

TEST_F(FakeNvml, LoadsByItsSonameThroughTheLibraryPath) {
  const char* lp = std::getenv("LD_LIBRARY_PATH");
  if (lp == nullptr || std::string(lp).find(CVM_FAKE_NVML_DIR) == std::string::npos) {
    GTEST_SKIP() << "run under ctest, which puts the fake libnvidia-ml.so.1 on LD_LIBRARY_PATH";
  }
  configure(dgx_config());
  auto n = Nvml::load();  // dlopen("libnvidia-ml.so.1"), as in production
  ASSERT_TRUE(n.ok()) << n.error().message;
  auto devs = (*n)->devices(tree_.roots());
  ASSERT_TRUE(devs.ok());
  EXPECT_EQ(devs->size(), 8u);
}

TEST_F(FakeNvml, MonitorReportsXidEccAndLostGpus) {
  configure(dgx_config());
  cvm::test::AtomicClock clock;
  GpuMonitor monitor({.roots = tree_.roots(), .nvml_library = CVM_FAKE_NVML_PATH, .poll = 20ms},
                     clock);
  monitor.start();
  EXPECT_EQ(monitor.source(), "nvml");
  ASSERT_EQ(monitor.snapshot().size(), 8u);
  auto gpu = [&](const std::string& uuid) {
    for (const auto& g : monitor.snapshot()) {
      if (g.uuid() == uuid) return g;
    }
    return cvm::v1::GpuDevice{};
  };

  clock.advance(1s);
  const int64_t t1 = clock.now_unix_ms();
  event("xid GPU-1002 13");  // an application's fault: not a health event
  event("xid GPU-1002 79");
  ASSERT_TRUE(wait_until([&] { return monitor.events_seen() >= 1; }));
  auto g = gpu("GPU-1002");
  EXPECT_TRUE(g.healthy());
  EXPECT_EQ(g.last_xid(), 79u);
  EXPECT_EQ(g.last_health_event_unix_ms(), t1);
  EXPECT_EQ(g.health_reason(), "XID 79: GPU has fallen off the bus");
  EXPECT_EQ(gpu("GPU-1003").last_health_event_unix_ms(), 0);

  event("dbe GPU-1004");
  ASSERT_TRUE(wait_until([&] { return monitor.events_seen() >= 2; }));
  EXPECT_EQ(gpu("GPU-1004").health_reason(), "double-bit ECC error");

  event("ecc GPU-1005 3");
  ASSERT_TRUE(wait_until([&] { return gpu("GPU-1005").ecc_uncorrected_errors() == 3; }));
  EXPECT_EQ(gpu("GPU-1005").health_reason(), "3 new uncorrectable ECC errors (3 in total)");

  event("lost GPU-1006");
  ASSERT_TRUE(wait_until([&] { return !gpu("GPU-1006").healthy(); }));
  EXPECT_EQ(gpu("GPU-1006").health_reason(), "not answering: GPU is lost");
  event("found GPU-1006");
  ASSERT_TRUE(wait_until([&] { return gpu("GPU-1006").healthy(); }));
  EXPECT_GT(gpu("GPU-1006").last_health_event_unix_ms(), 0);
  monitor.stop();
}

TEST_F(FakeNvml, MonitorWithoutEventSetsStillPolls) {
  auto cfg = dgx_config();
  cfg["no_events"] = true;
  configure(cfg);
  cvm::test::AtomicClock clock;
  GpuMonitor monitor({.roots = tree_.roots(), .nvml_library = CVM_FAKE_NVML_PATH, .poll = 20ms},
                     clock);
  monitor.start();
  event("lost GPU-1001");
  ASSERT_TRUE(wait_until([&] {
    for (const auto& g : monitor.snapshot()) {
      if (g.uuid() == "GPU-1001") return !g.healthy();
    }
    return false;
  }));
}

TEST(Monitor, WithoutNvmlTheNodeSimplyHasNoGpus) {
  cvm::test::AtomicClock clock;
  GpuMonitor monitor({.roots = {"/nonexistent/proc", "/nonexistent/sys"},
                      .nvml_library = "/nonexistent/libnvidia-ml.so.1"},
                     clock);
  monitor.start();
  EXPECT_TRUE(monitor.snapshot().empty());
  EXPECT_EQ(monitor.source(), "none");
  EXPECT_NE(monitor.detail().find("cannot load"), std::string::npos);
}

}  // namespace
}  // namespace cvm::agent::gpu
