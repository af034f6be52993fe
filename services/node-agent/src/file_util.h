#pragma once
// Small file and string helpers shared by the agent's sources (not part of the public API).

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <unistd.h>

namespace cvm::agent::detail {

// The file's content, at most `max_bytes`; nullopt when it cannot be opened. procfs and sysfs files
// report size 0, so this reads until EOF instead of trusting stat.
std::optional<std::string> read_file(const std::string& path, size_t max_bytes = 4 << 20);

// `root` + "/" + `rel` without doubling slashes ("/" + "proc" -> "/proc").
std::string join_path(std::string_view root, std::string_view rel);

std::string_view trim(std::string_view s);

// The lines of `text`, each trimmed (a last line without its newline counts; views into `text`).
std::vector<std::string_view> trimmed_lines(std::string_view text);

// A file descriptor closed once, whatever path leaves the scope.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  [[nodiscard]] int get() const { return fd_; }
  // Hands the descriptor to a new owner, which closes it.
  [[nodiscard]] int release() { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

}  // namespace cvm::agent::detail
