#pragma once
// Parsing of human quantities on the command line: "512Mi", "2Gi", "1.5G", "250m" CPUs.

#include <cstdint>
#include <string_view>

#include "cvm/base/result.h"

namespace cvm::cli {

// Bytes: a plain number, or with K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti (powers of 1024).
Result<uint64_t> parse_bytes(std::string_view text);
// CPU as Kubernetes writes it: "2" or "1.5" cores, or "250m" millicores. Returns millicores.
Result<uint64_t> parse_cpu(std::string_view text);

}  // namespace cvm::cli
