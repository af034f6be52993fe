#pragma once
// Handing an assignment's NVIDIA GPUs to a workspace: the device nodes, the driver libraries and
// the environment the NVIDIA user-space stack reads.
//
//   /dev/nvidia<minor> for each GPU, plus /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools,
//   /dev/nvidia-modeset where the host has them (major/minor read from the host's nodes);
//   every lib*.so* of a configured host library folder, bind-mounted read-only into the image's
//   library folder for its distro, symlinks resolved inside that folder (a link out of it is
//   skipped: it would expose an arbitrary host file);
//   NVIDIA_VISIBLE_DEVICES=<uuid>,<uuid>.
//
// The distro rule and the planning are pure over what the caller read; collect_* read a /dev and a
// library tree (fixture trees in tests).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/agent/oci_spec.h"
#include "cvm/base/result.h"

namespace cvm::agent {

// The image's library folder from its /etc/os-release: Debian/Ubuntu (and ID_LIKE debian) use the
// multiarch folder (/usr/lib/x86_64-linux-gnu, /usr/lib/aarch64-linux-gnu), RHEL-likes /usr/lib64,
// anything else /usr/lib. `machine` is uname's (x86_64, aarch64).
[[nodiscard]] std::string image_library_dir(std::string_view os_release,
                                            std::string_view machine = "x86_64");

// A library to bind: `name` is how the container sees it, `target` the regular file (relative to
// the library folder) that the name resolves to.
struct LibraryFile {
  std::string name;
  std::string target;
  bool operator==(const LibraryFile&) const = default;
};

struct GpuPassthrough {
  std::vector<DeviceNode> devices;
  std::vector<BindMount> libraries;
  std::vector<std::string> env;
  std::vector<std::string> warnings;
};

struct GpuPassthroughInput {
  std::vector<uint32_t> minors;             // /dev/nvidia<minor> of each assigned GPU
  std::vector<std::string> uuids;           // NVIDIA_VISIBLE_DEVICES
  std::vector<DeviceNode> present_devices;  // host nodes found (collect_nvidia_devices)
  std::vector<LibraryFile> libraries;       // collect_library_files
  std::string library_source_dir;           // where the libraries are seen by the runtime
  std::string image_library_dir;            // image_library_dir()
};

// Pure: kNotFound when an assigned GPU's /dev/nvidia<minor> is not among `present_devices`.
[[nodiscard]] Result<GpuPassthrough> plan_gpu_passthrough(const GpuPassthroughInput& in);

// The NVIDIA nodes present under `dev_root` (nvidia<N>, nvidiactl, nvidia-uvm, nvidia-uvm-tools,
// nvidia-modeset), as container paths under /dev with the host's major/minor. Not character
// devices are ignored.
[[nodiscard]] std::vector<DeviceNode> collect_nvidia_devices(const std::string& dev_root);

// The lib*.so* entries of `dir` (not recursive), symlinks followed inside `dir` (up to 40 hops);
// links that leave `dir`, dangle or loop are reported in `skipped`.
struct LibraryScan {
  std::vector<LibraryFile> files;
  std::vector<std::string> skipped;
};
[[nodiscard]] LibraryScan collect_library_files(const std::string& dir);

}  // namespace cvm::agent
