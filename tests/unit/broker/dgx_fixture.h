#pragma once
// GPU inventories shaped like real machines, as an agent would report them, for the topology
// tests and the benchmarks.
//
// "DGX-like": 8 GPUs in two NVLink islands of 4 (GPUs 0-3 and 4-7, every pair inside an island
// joined by 2 links), two CPU sockets (NUMA 0: GPUs 0-3 under root complex pci0000:00, NUMA 1:
// GPUs 4-7 under pci0000:80), each socket with two root ports and one PCIe switch per port holding
// two GPUs. Pair scores (NVIDIA's weights): same switch + NVLink 250, same host bridge + NVLink
// 230, across sockets 10.

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cvm/broker/allocator.h"

namespace cvm::broker::fixture {

inline constexpr uint64_t kGiB = 1ULL << 30;

inline std::string gpu_uuid(int i) { return "GPU-dgx-" + std::to_string(i); }

// Options: nvlink off gives the same machine with PCIe only; nvswitch gives every GPU 12 links
// to an NVSwitch fabric instead of the two islands (DGX A100-like).
inline NodeGpuInventory dgx(const std::string& node_id = "dgx", bool nvlink = true,
                            bool nvswitch = false, uint64_t memory = 80 * kGiB) {
  NodeGpuInventory n;
  n.node_id = node_id;
  n.bare_metal = true;
  for (int i = 0; i < 8; ++i) {
    cvm::v1::GpuDevice g;
    g.set_uuid(gpu_uuid(i));
    g.set_name("NVIDIA H100 80GB HBM3");
    g.set_vendor(cvm::v1::NVIDIA);
    g.set_memory_bytes(memory);
    g.set_minor(static_cast<uint32_t>(i));
    g.set_healthy(true);
    const int socket = i / 4;
    const int port = (i / 2) % 2;  // root port of the socket
    const int slot = i % 2;        // downstream port of the switch
    const std::string root = socket == 0 ? "pci0000:00" : "pci0000:80";
    const std::string bus = socket == 0 ? "00" : "80";
    char buf[160];
    const int sw_bus = (socket == 0 ? 0x01 : 0x81) + port * 0x10;
    std::snprintf(buf, sizeof buf,
                  "%s/0000:%s:%02x.0/0000:%02x:00.0/0000:%02x:%02x.0/0000:%02x:00.0", root.c_str(),
                  bus.c_str(), 1 + 2 * port, sw_bus, sw_bus + 1, slot, sw_bus + 2 + slot);
    g.set_pci_path(buf);
    std::snprintf(buf, sizeof buf, "0000:%02x:00.0", sw_bus + 2 + slot);
    g.set_pci_bus_id(buf);
    g.set_numa_node(socket);
    if (nvswitch) {
      g.set_nvswitch_links(12);
    } else if (nvlink) {
      for (int j = socket * 4; j < socket * 4 + 4; ++j) {
        if (j == i) continue;
        auto* p = g.add_nvlink_peers();
        p->set_uuid(gpu_uuid(j));
        p->set_links(2);
      }
    }
    n.gpus.push_back(std::move(g));
  }
  return n;
}

// A GPU in MIG mode with `instances` instances of profile 1g.10gb (its own minor shared).
inline std::vector<cvm::v1::GpuDevice> mig_gpu(const std::string& uuid, uint32_t minor,
                                               int instances) {
  std::vector<cvm::v1::GpuDevice> out;
  cvm::v1::GpuDevice parent;
  parent.set_uuid(uuid);
  parent.set_name("NVIDIA A100-SXM4-80GB");
  parent.set_vendor(cvm::v1::NVIDIA);
  parent.set_memory_bytes(80 * kGiB);
  parent.set_minor(minor);
  parent.set_healthy(true);
  parent.set_mig_enabled(true);
  parent.set_pci_path("pci0000:00/0000:00:01.0/0000:0" + std::to_string(minor + 1) + ":00.0");
  out.push_back(parent);
  for (int k = 0; k < instances; ++k) {
    cvm::v1::GpuDevice m;
    m.set_uuid("MIG-" + uuid + "-" + std::to_string(k));
    m.set_name("NVIDIA A100-SXM4-80GB MIG 1g.10gb");
    m.set_vendor(cvm::v1::NVIDIA);
    m.set_memory_bytes(10 * kGiB);
    m.set_minor(minor);
    m.set_healthy(true);
    m.set_mig_parent_uuid(uuid);
    m.set_mig_profile("1g.10gb");
    m.set_mig_gpu_instance_id(static_cast<uint32_t>(7 + k));
    m.set_pci_path(parent.pci_path());
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace cvm::broker::fixture
