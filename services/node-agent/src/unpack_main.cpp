// cvm-unpack: applies the layers of an OCI image layout's tag onto a new rootfs, ownership shifted
// into an ID range (layer_unpack.h). The agent runs it as a child process: libarchive and its
// dependencies stay out of the long-lived agent (idle RSS), and a bug in parsing an untrusted
// archive cannot take the agent down.
//
//   cvm-unpack --layout DIR --tag TAG --rootfs DIR --id-base N --id-count N
//
// Exit 0: done. 3: the layout, tag or a blob is missing. 1: anything else. The reason is on stderr.
#include <sys/prctl.h>
#include <unistd.h>

#include <csignal>
#include <iostream>
#include <string>

#include "cvm/agent/layer_unpack.h"

int main(int argc, char** argv) {
  // Dies with the agent (a kill -9 mid-launch): a restarted agent removes what it was unpacking,
  // and nothing may still be writing there.
  const pid_t parent = ::getppid();
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) return 1;
  std::string layout, tag, rootfs;
  long long base = -1, count = -1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const std::string value = argv[i + 1];
    try {
      if (flag == "--layout") {
        layout = value;
      } else if (flag == "--tag") {
        tag = value;
      } else if (flag == "--rootfs") {
        rootfs = value;
      } else if (flag == "--id-base") {
        base = std::stoll(value);
      } else if (flag == "--id-count") {
        count = std::stoll(value);
      } else {
        base = -1;
        break;
      }
    } catch (const std::exception&) {
      base = -1;
      break;
    }
  }
  if (layout.empty() || tag.empty() || rootfs.empty() || base < 0 || count <= 0 ||
      base + count > (1LL << 32)) {
    std::cerr << "usage: cvm-unpack --layout DIR --tag TAG --rootfs DIR --id-base N --id-count N\n";
    return 2;
  }
  const cvm::agent::IdRange ids{static_cast<uint32_t>(base), static_cast<uint32_t>(count)};
  auto image = cvm::agent::unpack_layout_image(layout, tag, rootfs, ids);
  if (!image) {
    std::cerr << image.error().message << "\n";
    return image.error().is_not_found() ? 3 : 1;
  }
  return 0;
}
