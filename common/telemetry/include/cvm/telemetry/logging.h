#pragma once
// Logging for every service: spdlog, as text for people or as one JSON object per line for log
// pipelines (--log-format json).

#include <string>
#include <string_view>

#include "cvm/base/result.h"

namespace cvm::telemetry {

enum class LogFormat { kText, kJson };

Result<LogFormat> parse_log_format(std::string_view text);

// Installs the default logger for this process (stderr). level: trace|debug|info|warn|error.
void init_logging(std::string_view service, LogFormat format, std::string_view level = "info");

// One JSON line for a log record; exposed so tests can check the escaping.
std::string format_json_line(std::string_view time_iso, std::string_view level,
                             std::string_view service, std::string_view message);

}  // namespace cvm::telemetry
