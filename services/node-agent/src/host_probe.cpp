#include "cvm/agent/host_probe.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <system_error>

#include "cvm/agent/capabilities.h"
#include "cvm/agent/cpu_pinning.h"
#include "cvm/agent/image.h"
#include "cvm/agent/process.h"
#include "file_util.h"

namespace cvm::agent {
namespace {

namespace fs = std::filesystem;
using detail::join_path;
using detail::read_file;
using detail::trim;

// Calls fn(line) for each line of `text` (without the newline).
template <class Fn>
void for_each_line(std::string_view text, Fn&& fn) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    fn(text.substr(pos, end - pos));
    pos = end + 1;
  }
}

// Parses a leading run of digits; advances `s` past it.
std::optional<uint64_t> take_number(std::string_view& s) {
  uint64_t value = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || ptr == s.data()) return std::nullopt;
  s.remove_prefix(static_cast<size_t>(ptr - s.data()));
  return value;
}

bool contains_word(std::string_view haystack, std::string_view word) {
  size_t pos = 0;
  while ((pos = haystack.find(word, pos)) != std::string_view::npos) {
    const bool start_ok = pos == 0 || std::isspace(static_cast<unsigned char>(haystack[pos - 1]));
    const size_t end = pos + word.size();
    const bool end_ok =
        end == haystack.size() || std::isspace(static_cast<unsigned char>(haystack[end]));
    if (start_ok && end_ok) return true;
    pos = end;
  }
  return false;
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

bool exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

std::string read_trimmed(const std::string& path) {
  const auto content = read_file(path, 64 * 1024);
  return content ? std::string(trim(*content)) : std::string();
}

// First line of `output` holding `key`, returning the text after it, trimmed.
std::string value_after(std::string_view output, std::string_view key) {
  std::string found;
  for_each_line(output, [&](std::string_view line) {
    if (!found.empty()) return;
    const size_t pos = line.find(key);
    if (pos != std::string_view::npos) found = std::string(trim(line.substr(pos + key.size())));
  });
  return found;
}

std::string first_token(std::string_view s) {
  s = trim(s);
  const size_t end = s.find_first_of(" \t\r\n");
  return std::string(s.substr(0, end));
}

}  // namespace

std::optional<KernelVersion> parse_kernel_version(std::string_view osrelease) {
  std::string_view s = trim(osrelease);
  KernelVersion v;
  const auto major = take_number(s);
  if (!major || s.empty() || s.front() != '.') return std::nullopt;
  s.remove_prefix(1);
  const auto minor = take_number(s);
  if (!minor) return std::nullopt;
  v.major = static_cast<int>(*major);
  v.minor = static_cast<int>(*minor);
  if (!s.empty() && s.front() == '.') {
    s.remove_prefix(1);
    if (const auto patch = take_number(s)) v.patch = static_cast<int>(*patch);
  }
  return v;
}

bool kernel_at_least(std::string_view osrelease, KernelVersion minimum) {
  const auto v = parse_kernel_version(osrelease);
  return v && *v >= minimum;
}

bool supports_idmapped_mounts(std::string_view osrelease) {
  return kernel_at_least(osrelease, KernelVersion{5, 12, 0});
}

SelinuxState parse_selinux(std::optional<std::string_view> enforce_content) {
  SelinuxState state;
  if (!enforce_content) return state;
  state.enabled = true;
  state.enforcing = trim(*enforce_content) == "1";
  return state;
}

bool modules_list_has(std::string_view proc_modules, std::string_view module) {
  bool found = false;
  for_each_line(proc_modules, [&](std::string_view line) {
    if (!found && first_token(line) == module) found = true;
  });
  return found;
}

bool cpuinfo_has_flag(std::string_view cpuinfo, std::string_view flag) {
  bool found = false;
  for_each_line(cpuinfo, [&](std::string_view line) {
    if (found) return;
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) return;
    const std::string_view key = trim(line.substr(0, colon));
    if (key == "flags" || key == "Features") found = contains_word(line.substr(colon + 1), flag);
  });
  return found;
}

uint32_t count_cpuinfo_processors(std::string_view cpuinfo) {
  uint32_t count = 0;
  for_each_line(cpuinfo, [&](std::string_view line) {
    const size_t colon = line.find(':');
    if (colon != std::string_view::npos && trim(line.substr(0, colon)) == "processor") ++count;
  });
  return count;
}

std::optional<uint32_t> parse_cpu_list_count(std::string_view list) {
  const auto cpus = parse_cpu_list(list);
  if (!cpus || cpus->empty()) return std::nullopt;
  return static_cast<uint32_t>(cpus->size());
}

std::optional<uint64_t> parse_meminfo_total_bytes(std::string_view meminfo) {
  std::optional<uint64_t> total;
  for_each_line(meminfo, [&](std::string_view line) {
    if (total || line.substr(0, 9) != "MemTotal:") return;
    std::string_view rest = trim(line.substr(9));
    const auto value = take_number(rest);
    if (!value) return;
    const std::string_view unit = trim(rest);
    uint64_t scale = 1;
    if (unit == "kB" || unit == "KB" || unit == "kb") {
      scale = 1024;
    } else if (!unit.empty()) {
      return;  // procfs has only ever used kB; anything else is not trusted
    }
    if (*value > UINT64_MAX / scale) return;
    total = *value * scale;
  });
  return total;
}

Virtualization classify_virtualization(std::string_view sys_vendor, std::string_view product_name,
                                       bool hypervisor_flag) {
  const std::string vendor = lower(trim(sys_vendor));
  const std::string product = lower(trim(product_name));
  const auto vm = [](std::string name) { return Virtualization{false, std::move(name)}; };
  const auto has = [](const std::string& s, std::string_view what) {
    return s.find(what) != std::string::npos;
  };

  if (has(vendor, "google") || has(product, "google compute engine")) {
    return vm("Google Compute Engine");
  }
  if (has(vendor, "amazon ec2") || has(product, "amazon ec2")) {
    // EC2 bare-metal instance types ("m5.metal", "c6i.metal-32xl") have no hypervisor.
    if (has(product, ".metal") && !hypervisor_flag) return Virtualization{true, ""};
    return vm("Amazon EC2");
  }
  if (has(vendor, "microsoft") && has(product, "virtual machine")) {
    return vm("Microsoft Hyper-V");
  }
  if (has(vendor, "alibaba") || has(product, "alibaba cloud")) return vm("Alibaba Cloud ECS");
  if (has(vendor, "digitalocean")) return vm("DigitalOcean");
  if (has(vendor, "hetzner") && has(product, "vserver")) return vm("Hetzner Cloud");
  if (has(vendor, "openstack") || has(product, "openstack")) return vm("OpenStack");
  if (has(vendor, "vmware") || has(product, "vmware")) return vm("VMware");
  if (has(vendor, "innotek") || has(product, "virtualbox")) return vm("VirtualBox");
  if (has(vendor, "xen") || has(product, "hvm domu")) return vm("Xen");
  if (has(vendor, "qemu") || has(product, "qemu")) return vm("QEMU");
  if (has(product, "kvm") || has(vendor, "kvm")) return vm("KVM");
  if (has(vendor, "parallels")) return vm("Parallels");
  if (has(vendor, "bochs") || has(product, "bochs")) return vm("Bochs");
  if (hypervisor_flag) return vm("unknown hypervisor");
  return Virtualization{true, ""};
}

cvm::v1::GpuVendor classify_pci_gpu(std::string_view vendor, std::string_view pci_class) {
  const std::string v = lower(trim(vendor));
  const std::string c = lower(trim(pci_class));
  // class is 0xCCSSPP: base class 0x03 is "display controller" (VGA 0x0300, 3D 0x0302).
  if (c.size() != 8 || c.rfind("0x03", 0) != 0) return cvm::v1::GPU_VENDOR_UNSPECIFIED;
  if (v == "0x10de") return cvm::v1::NVIDIA;
  if (v == "0x1002") return cvm::v1::AMD;
  return cvm::v1::GPU_VENDOR_UNSPECIFIED;
}

std::string parse_runc_version(std::string_view output) {
  return first_token(value_after(output, "runc version"));
}

std::string parse_sysbox_version(std::string_view output) {
  // sysbox-runc prints "\tversion: \t0.6.2" among edition/commit lines.
  std::string v = first_token(value_after(output, "version:"));
  if (v.empty()) v = first_token(value_after(output, "sysbox-runc version"));
  return v;
}

std::string parse_containerd_version(std::string_view output) {
  // "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"
  std::string_view s = trim(output);
  const size_t nl = s.find('\n');
  std::string_view line = s.substr(0, nl);
  std::array<std::string_view, 3> tokens{};
  size_t n = 0;
  while (!line.empty() && n < tokens.size()) {
    line = trim(line);
    const size_t end = line.find_first_of(" \t");
    tokens[n++] = line.substr(0, end);
    line = end == std::string_view::npos ? std::string_view() : line.substr(end);
  }
  if (n < 3 || tokens[0] != "containerd") return {};
  std::string version(tokens[2]);
  if (!version.empty() && version.front() == 'v') version.erase(0, 1);
  return version;
}

bool shiftfs_module_available(const HostRoots& roots, std::string_view kernel) {
  if (kernel.empty()) return false;
  const std::string dir = join_path(roots.rootfs, "lib/modules/" + std::string(kernel));
  // modules.dep names every module of the tree: one read instead of a walk when depmod ran.
  if (const auto dep = read_file(dir + "/modules.dep", 16 << 20)) {
    if (dep->find("/shiftfs.ko") != std::string::npos || dep->rfind("shiftfs.ko", 0) == 0) {
      return true;
    }
  }
  constexpr int kMaxDepth = 8;
  constexpr size_t kMaxEntries = 200000;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::skip_permission_denied, ec);
  size_t seen = 0;
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (++seen > kMaxEntries) break;
    if (it.depth() >= kMaxDepth) it.disable_recursion_pending();
    const std::string name = it->path().filename().string();
    if (name.rfind("shiftfs.ko", 0) == 0) return true;
  }
  return false;
}

cvm::v1::HostCapabilities probe_host(const HostRoots& roots) {
  cvm::v1::HostCapabilities caps;

  const auto enforce = read_file(join_path(roots.sysfs, "fs/selinux/enforce"), 64);
  const SelinuxState selinux =
      parse_selinux(enforce ? std::optional<std::string_view>(*enforce) : std::nullopt);
  caps.set_selinux_enabled(selinux.enabled);
  caps.set_selinux_enforcing(selinux.enforcing);

  const std::string kernel = read_trimmed(join_path(roots.procfs, "sys/kernel/osrelease"));
  caps.set_kernel_version(kernel);
  caps.set_idmapped_mounts(supports_idmapped_mounts(kernel));

  const auto modules = read_file(join_path(roots.procfs, "modules"));
  caps.set_shiftfs_loaded((modules && modules_list_has(*modules, "shiftfs")) ||
                          exists(join_path(roots.sysfs, "module/shiftfs")));
  caps.set_shiftfs_module_available(caps.shiftfs_loaded() ||
                                    shiftfs_module_available(roots, kernel));

  // Resolved inside rootfs: Debian's lib/modules/<v>/build is an absolute link into /usr/src,
  // which must mean the probed root's /usr/src when rootfs is not "/".
  caps.set_kernel_headers(
      !kernel.empty() &&
      (resolve_in_rootfs(roots.rootfs, "/usr/src/linux-headers-" + kernel).ok() ||
       resolve_in_rootfs(roots.rootfs, "/lib/modules/" + kernel + "/build").ok()));

  const auto cpuinfo = read_file(join_path(roots.procfs, "cpuinfo"));
  const Virtualization virt =
      classify_virtualization(read_trimmed(join_path(roots.sysfs, "class/dmi/id/sys_vendor")),
                              read_trimmed(join_path(roots.sysfs, "class/dmi/id/product_name")),
                              cpuinfo && cpuinfo_has_flag(*cpuinfo, "hypervisor"));
  caps.set_bare_metal(virt.bare_metal);
  caps.set_virtualization(virt.name);
  caps.set_hypervisor_flag(cpuinfo && cpuinfo_has_flag(*cpuinfo, "hypervisor"));
  const PciGpuCount gpus = probe_pci_gpus(roots);
  caps.set_nvidia_pci_gpus(gpus.nvidia);
  caps.set_amd_pci_gpus(gpus.amd);
  return caps;
}

cvm::v1::Capacity probe_capacity(const HostRoots& roots) {
  cvm::v1::Capacity capacity;
  uint32_t cpus = 0;
  if (const auto cpuinfo = read_file(join_path(roots.procfs, "cpuinfo"))) {
    cpus = count_cpuinfo_processors(*cpuinfo);
  }
  if (cpus == 0) {
    // Some architectures' cpuinfo has no "processor" lines; sysfs always lists online CPUs.
    if (const auto online = read_file(join_path(roots.sysfs, "devices/system/cpu/online"), 4096)) {
      cpus = parse_cpu_list_count(*online).value_or(0);
    }
  }
  capacity.set_cpu_millicores(uint64_t{cpus} * 1000);
  if (const auto meminfo = read_file(join_path(roots.procfs, "meminfo"))) {
    capacity.set_memory_bytes(parse_meminfo_total_bytes(*meminfo).value_or(0));
  }
  return capacity;
}

PciGpuCount probe_pci_gpus(const HostRoots& roots) {
  PciGpuCount count;
  std::error_code ec;
  size_t seen = 0;
  for (fs::directory_iterator it(join_path(roots.sysfs, "bus/pci/devices"), ec);
       !ec && it != fs::directory_iterator() && ++seen < 4096; it.increment(ec)) {
    const std::string dir = it->path().string();
    switch (classify_pci_gpu(read_trimmed(dir + "/vendor"), read_trimmed(dir + "/class"))) {
      case cvm::v1::NVIDIA:
        ++count.nvidia;
        break;
      case cvm::v1::AMD:
        ++count.amd;
        break;
      default:
        break;
    }
  }
  return count;
}

Result<uint64_t> read_cap_bounding(const HostRoots& roots) {
  const std::string path = join_path(roots.procfs, "self/status");
  const auto status = read_file(path);
  if (!status) return make_error(ErrorDomain::kSystem, "cannot read " + path);
  return parse_status_cap_mask(*status, "CapBnd");
}

cvm::v1::RuntimeInfo probe_runtime(const ToolPaths& tools) {
  cvm::v1::RuntimeInfo info;
  ProcessOptions options;
  options.timeout = tools.probe_timeout;

  // A tool's version when it runs and answers, else the reason why not.
  const auto version_of = [&](const std::string& binary,
                              std::string (*parse)(std::string_view)) -> Result<std::string> {
    auto result = run_tool({binary, "--version"}, options);
    if (!result) return result.error();
    std::string v = parse(result->out);
    if (v.empty()) {
      return make_error(ErrorDomain::kTool, binary + " --version: unrecognised output '" +
                                                std::string(trim(result->out)) + "'");
    }
    return v;
  };

  std::string detail;
  const auto runc = version_of(tools.runc, parse_runc_version);
  if (runc) info.set_runc_version(*runc);
  const auto sysbox = version_of(tools.sysbox_runc, parse_sysbox_version);
  if (sysbox) info.set_sysbox_version(*sysbox);
  if (const auto containerd = version_of(tools.containerd, parse_containerd_version)) {
    info.set_containerd_version(*containerd);
  }

  if (sysbox) {
    info.set_runtime("sysbox-runc");
    info.set_sysbox(true);
  } else {
    info.set_runtime("runc");
    info.set_sysbox(false);
    detail = sysbox.error().is_not_found()
                 ? "sysbox-runc not installed: runc with a user namespace per workspace "
                   "(exclusive ID range) stands in for Sysbox"
                 : "sysbox-runc unusable (" + sysbox.error().message +
                       "): runc with a user namespace per workspace stands in for Sysbox";
  }
  info.set_ready(runc.ok());
  if (!runc)
    detail = "runc unusable: " + runc.error().message + (detail.empty() ? "" : "; ") + detail;
  info.set_detail(detail);
  return info;
}

}  // namespace cvm::agent
