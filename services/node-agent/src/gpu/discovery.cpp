#include "cvm/agent/gpu/discovery.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace cvm::agent::gpu {

namespace fs = std::filesystem;

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::optional<std::string> read_file(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return std::nullopt;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool parse_hex(std::string_view s, uint64_t& out) {
  if (s.empty()) return false;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out, 16);
  return ec == std::errc() && ptr == s.data() + s.size();
}

}  // namespace

std::optional<ProcGpuInfo> parse_proc_gpu_information(std::string_view text) {
  ProcGpuInfo info;
  bool have_minor = false;
  while (!text.empty()) {
    const auto nl = text.find('\n');
    auto line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    const auto colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const auto key = trim(line.substr(0, colon));
    const auto value = trim(line.substr(colon + 1));
    if (key == "Model") {
      info.model = std::string(value);
    } else if (key == "GPU UUID") {
      info.uuid = std::string(value);
    } else if (key == "Bus Location") {
      info.bus_location = std::string(value);
    } else if (key == "Device Minor") {
      auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), info.minor);
      have_minor = ec == std::errc() && ptr == value.data() + value.size();
    }
  }
  // A UUID the driver could not read shows as "GPU-????????-...": no identity to lease by.
  if (info.uuid.empty() || info.uuid.find('?') != std::string::npos || !have_minor) {
    return std::nullopt;
  }
  return info;
}

std::string normalize_bus_id(std::string_view bus_id) {
  bus_id = trim(bus_id);
  // [domain:]bus:device.function
  const auto last = bus_id.rfind(':');
  if (last == std::string_view::npos) return {};
  const auto devfn = bus_id.substr(last + 1);
  auto head = bus_id.substr(0, last);
  std::string_view domain_s = "0";
  std::string_view bus_s = head;
  if (const auto c = head.rfind(':'); c != std::string_view::npos) {
    domain_s = head.substr(0, c);
    bus_s = head.substr(c + 1);
  }
  const auto dot = devfn.find('.');
  if (dot == std::string_view::npos) return {};
  uint64_t domain = 0;
  uint64_t bus = 0;
  uint64_t dev = 0;
  uint64_t fn = 0;
  if (!parse_hex(domain_s, domain) || !parse_hex(bus_s, bus) ||
      !parse_hex(devfn.substr(0, dot), dev) || !parse_hex(devfn.substr(dot + 1), fn) ||
      domain > 0xffff || bus > 0xff || dev > 0x1f || fn > 7) {
    return {};
  }
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.%x", static_cast<unsigned>(domain),
                static_cast<unsigned>(bus), static_cast<unsigned>(dev), static_cast<unsigned>(fn));
  return buf;
}

std::string mig_profile_from_name(std::string_view name) {
  const auto pos = name.find(" MIG ");
  if (pos == std::string_view::npos) return {};
  return std::string(trim(name.substr(pos + 5)));
}

std::string pci_path_from_sysfs_target(std::string_view resolved) {
  const auto pos = resolved.rfind("/devices/pci");
  if (pos == std::string_view::npos) return {};
  auto path = resolved.substr(pos + std::string_view("/devices/").size());
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  if (path.find('/') == std::string_view::npos) return {};  // the root bus alone
  return std::string(path);
}

std::optional<uint32_t> parse_sysfs_hex(std::string_view text) {
  text = trim(text);
  if (text.starts_with("0x") || text.starts_with("0X")) text.remove_prefix(2);
  uint64_t v = 0;
  if (!parse_hex(text, v) || v > 0xffffffffULL) return std::nullopt;
  return static_cast<uint32_t>(v);
}

PciPlacement read_pci_placement(const GpuRoots& roots, std::string_view bus_id) {
  PciPlacement out;
  const auto id = normalize_bus_id(bus_id);
  if (id.empty()) return out;
  const fs::path dev = fs::path(roots.sysfs) / "bus/pci/devices" / id;
  std::error_code ec;
  const auto target = fs::canonical(dev, ec);
  if (!ec) out.pci_path = pci_path_from_sysfs_target(target.string());
  if (auto numa = read_file(dev / "numa_node")) {
    const auto v = trim(*numa);
    int n = -1;
    auto [ptr, err] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (err == std::errc() && ptr == v.data() + v.size() && n >= 0) out.numa_node = n;
  }
  return out;
}

std::vector<cvm::v1::GpuDevice> discover_procfs(const GpuRoots& roots) {
  std::vector<cvm::v1::GpuDevice> out;
  const fs::path dir = fs::path(roots.procfs) / "driver/nvidia/gpus";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    auto text = read_file(entry.path() / "information");
    if (!text) continue;
    auto info = parse_proc_gpu_information(*text);
    if (!info) continue;
    cvm::v1::GpuDevice g;
    g.set_uuid(info->uuid);
    g.set_name(info->model);
    g.set_vendor(cvm::v1::NVIDIA);
    g.set_minor(info->minor);
    const auto bus = normalize_bus_id(info->bus_location.empty() ? entry.path().filename().string()
                                                                 : info->bus_location);
    g.set_pci_bus_id(bus);
    const auto place = read_pci_placement(roots, bus);
    g.set_pci_path(place.pci_path);
    if (place.numa_node) g.set_numa_node(*place.numa_node);
    g.set_healthy(true);
    g.set_discovered_by("procfs");
    out.push_back(std::move(g));
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.minor() < b.minor(); });
  return out;
}

std::vector<cvm::v1::GpuDevice> discover_sysfs_amd(const GpuRoots& roots) {
  std::vector<cvm::v1::GpuDevice> out;
  const fs::path dir = fs::path(roots.sysfs) / "bus/pci/devices";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const auto vendor = read_file(entry.path() / "vendor");
    const auto cls = read_file(entry.path() / "class");
    if (!vendor || !cls) continue;
    const auto v = parse_sysfs_hex(*vendor);
    const auto c = parse_sysfs_hex(*cls);
    if (!v || !c || *v != 0x1002 || (*c >> 16) != 0x03) continue;
    const std::string bus = entry.path().filename().string();
    cvm::v1::GpuDevice g;
    auto unique = read_file(entry.path() / "unique_id");
    g.set_uuid("AMD-" + std::string(unique && !trim(*unique).empty() ? trim(*unique) : bus));
    std::string name = "AMD GPU";
    if (auto dev = read_file(entry.path() / "device")) {
      if (auto d = parse_sysfs_hex(*dev)) {
        char buf[32];
        std::snprintf(buf, sizeof buf, " [1002:%04x]", *d);
        name += buf;
      }
    }
    g.set_name(name);
    g.set_vendor(cvm::v1::AMD);
    g.set_pci_bus_id(bus);
    if (auto vram = read_file(entry.path() / "mem_info_vram_total")) {
      const auto t = trim(*vram);
      uint64_t bytes = 0;
      auto [ptr, err] = std::from_chars(t.data(), t.data() + t.size(), bytes);
      if (err == std::errc()) g.set_memory_bytes(bytes);
    }
    const auto place = read_pci_placement(roots, bus);
    g.set_pci_path(place.pci_path);
    if (place.numa_node) g.set_numa_node(*place.numa_node);
    g.set_healthy(true);
    g.set_health_reason("AMD GPUs are not supported");
    g.set_discovered_by("sysfs");
    out.push_back(std::move(g));
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.pci_bus_id() < b.pci_bus_id(); });
  return out;
}

}  // namespace cvm::agent::gpu
