// cvm-gpu-probe: runs the agent's GPU discovery once and prints what a NodeStatus would carry, as
// JSON (one GpuDevice per line) after a summary line on stderr. tests/gpu/ runs it on a machine
// with a real NVIDIA GPU and compares it with nvidia-smi.
#include <iostream>
#include <string>

#include <google/protobuf/util/json_util.h>
#include <CLI/CLI.hpp>

#include "cvm/agent/gpu/monitor.h"

int main(int argc, char** argv) {
  CLI::App app{"cvm-gpu-probe: the node agent's GPU discovery, once"};
  cvm::agent::gpu::GpuMonitorOptions options;
  app.add_option("--path.procfs", options.roots.procfs, "procfs root")->capture_default_str();
  app.add_option("--path.sysfs", options.roots.sysfs, "sysfs root")->capture_default_str();
  app.add_option("--nvml", options.nvml_library, "NVML library to dlopen")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::string error;
  auto nvml = cvm::agent::gpu::Nvml::load(options.nvml_library);
  if (!nvml) error = nvml.error().message;
  const auto d = cvm::agent::gpu::discover_gpus(options.roots, nvml ? nvml->get() : nullptr, error);
  std::cerr << d.gpus.size() << " GPU(s) through " << d.source
            << (d.detail.empty() ? "" : " (" + d.detail + ")") << "\n";
  google::protobuf::util::JsonPrintOptions json;
  json.preserve_proto_field_names = true;
  json.always_print_primitive_fields = true;
  for (const auto& g : d.gpus) {
    std::string line;
    (void)google::protobuf::util::MessageToJsonString(g, &line, json);
    std::cout << line << "\n";
  }
  return 0;
}
