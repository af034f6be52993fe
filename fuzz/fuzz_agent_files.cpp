// The node agent's parsers of file and tool input: the supervisor's status.json, the saved ID
// ranges (id-ranges.json, restored at start), an OCI layout's index.json, /etc/subuid, runc's
// status words and the runtime tools' version lines, procfs/sysfs text (kernel release, SELinux,
// cpu lists, meminfo, /proc/<pid>/status capabilities, /proc/driver/nvidia, sysfs hex ids), ldd
// output, image references; and the text the services and cvmctl take from flags (log format,
// quantities). None of them may crash on anything.
//
// Input: one selector byte, then the text.
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "cvm/agent/capabilities.h"
#include "cvm/agent/gpu/discovery.h"
#include "cvm/agent/host_probe.h"
#include "cvm/agent/id_range.h"
#include "cvm/agent/image.h"
#include "cvm/agent/launcher.h"
#include "cvm/agent/runtime.h"
#include "cvm/agent/supervisor_spec.h"
#include "cvm/cli/quantity.h"
#include "cvm/telemetry/logging.h"
#include "fuzz_input.h"

namespace {

void id_ranges(std::string_view text) {
  const auto state = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (state.is_discarded()) return;
  const cvm::agent::IdPool pool{.start = 100'000, .count = 65536 * 16};
  auto restored = cvm::agent::IdRangeAllocator::from_json(state, pool);
  if (!restored) return;
  // What was restored saves and restores to the same ranges, and still allocates sanely.
  auto again = cvm::agent::IdRangeAllocator::from_json(restored->to_json(), pool);
  if (!again || again->in_use() != restored->in_use()) std::abort();
  if (auto r = restored->allocate("fuzz-new")) {
    if (r->base == 0) std::abort();  // host ID 0 is never handed out
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const uint8_t selector = in.byte();
  const std::string_view text = in.rest();
  namespace a = cvm::agent;
  switch (selector % 18) {
    case 0:
      (void)a::parse_supervisor_status(text);
      break;
    case 1:
      id_ranges(text);
      break;
    case 2:
      (void)a::layout_index_has_tag(text, "latest");
      break;
    case 3:
      (void)a::parse_subid_pool(text, "root");
      break;
    case 4:
      (void)a::parse_container_status(text);
      break;
    case 5:
      (void)a::parse_kernel_version(text);
      (void)a::supports_idmapped_mounts(text);
      break;
    case 6:
      (void)a::parse_selinux(text);
      break;
    case 7:
      (void)a::parse_cpu_list_count(text);
      break;
    case 8:
      (void)a::parse_meminfo_total_bytes(text);
      break;
    case 9:
      (void)a::parse_runc_version(text);
      (void)a::parse_sysbox_version(text);
      (void)a::parse_containerd_version(text);
      break;
    case 10:
      if (auto mask = a::parse_status_cap_mask(text)) (void)a::capability_names_from_mask(*mask);
      break;
    case 11:
      (void)a::gpu::parse_proc_gpu_information(text);
      break;
    case 12:
      (void)a::gpu::parse_sysfs_hex(text);
      break;
    case 13:
      (void)a::parse_ldd_output(text);
      break;
    case 14:
      (void)a::parse_image_ref(text);
      break;
    case 15:
      (void)a::modules_list_has(text, "shiftfs");
      (void)a::capability_number(text);
      break;
    case 16:
      (void)cvm::telemetry::parse_log_format(text);
      break;
    default:
      (void)cvm::cli::parse_bytes(text);
      (void)cvm::cli::parse_cpu(text);
      break;
  }
  return 0;
}
