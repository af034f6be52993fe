// InfrastructureSettings from KV cvm_settings (key "infrastructure"): the scheduler's effective
// settings and cvmctl's view of them, and cvmctl's `settings set KEY VALUE` edit on top.
//
// Input: KEY and VALUE as short strings, then the stored payload.
#include "cvm/cli/views.h"
#include "cvm/scheduler/placement.h"
#include "cvm/v1/settings.pb.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cvm::fuzz::Input in(data, size);
  const std::string_view key = in.short_string();
  const std::string_view value = in.short_string();
  cvm::v1::InfrastructureSettings stored;
  if (!cvm::fuzz::parse(stored, in.rest())) return 0;
  const auto effective = cvm::scheduler::effective_settings(&stored);
  cvm::v1::BuildRequest build;
  (void)cvm::scheduler::check_request(cvm::scheduler::make_placement_request(build, effective));
  (void)cvm::cli::format_settings(&stored);
  (void)cvm::cli::settings_json(&stored);
  auto edited = cvm::cli::effective_settings(&stored);
  if (cvm::cli::apply_setting(edited, key, value)) {
    (void)cvm::cli::format_settings(&edited);
    (void)cvm::scheduler::effective_settings(&edited);
  }
  return 0;
}
