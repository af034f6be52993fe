#pragma once
// Small file and string helpers shared by the agent's sources (not part of the public API).

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace cvm::agent::detail {

// The file's content, at most `max_bytes`; nullopt when it cannot be opened. procfs and sysfs files
// report size 0, so this reads until EOF instead of trusting stat.
std::optional<std::string> read_file(const std::string& path, size_t max_bytes = 4 << 20);

// `root` + "/" + `rel` without doubling slashes ("/" + "proc" -> "/proc").
std::string join_path(std::string_view root, std::string_view rel);

std::string_view trim(std::string_view s);

}  // namespace cvm::agent::detail
