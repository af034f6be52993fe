#pragma once
// Small file helpers shared by tests that look at what a container, a service or a tool left on
// disk (uid_map, cgroup limits, logs, generated configs).

#include <string>

namespace cvm::test {

// The whole file, or "" when it cannot be read (tests then fail on the content, with context).
std::string read_file(const std::string& path);

}  // namespace cvm::test
