#include "cvm/agent/console_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "file_util.h"

namespace cvm::agent {

ConsoleReadPlan plan_console_read(std::optional<ConsoleLogFile> current,
                                  std::optional<ConsoleLogFile> previous, ConsoleCursor from,
                                  int64_t max_bytes) {
  ConsoleReadPlan plan;
  plan.next = from;
  if (!current && !previous) return plan;
  int64_t left = std::max<int64_t>(max_bytes, 0);
  // Where to start: the cursor's file, wherever the rotation has moved it. A file id that is
  // neither (rotated out) or 0 starts at the oldest byte kept. An inode freed by the rotation can
  // be reused by the next console.log; a follower two rotations behind (2 caps of output between
  // two reads) may then skip ahead instead of being told it lost bytes.
  bool in_previous = previous.has_value();
  int64_t offset = 0;
  if (from.file_id != 0 && current && from.file_id == current->id) {
    in_previous = false;
    offset = std::clamp<int64_t>(from.offset, 0, current->size);
  } else if (from.file_id != 0 && previous && from.file_id == previous->id) {
    offset = std::clamp<int64_t>(from.offset, 0, previous->size);
  } else {
    plan.lost = from.file_id != 0;
  }
  if (in_previous) {
    const int64_t n = std::min(previous->size - offset, left);
    if (n > 0) plan.segments.push_back({true, offset, n});
    left -= n;
    offset += n;
    if (offset < previous->size || !current) {
      plan.next = {previous->id, offset};
      return plan;
    }
    offset = 0;
  }
  const int64_t n = std::min(current->size - offset, left);
  if (n > 0) plan.segments.push_back({false, offset, n});
  plan.next = {current->id, offset + n};
  return plan;
}

namespace {

struct OpenLog {
  detail::Fd fd;
  ConsoleLogFile file;
};

// nullopt when the file does not exist; an error for anything else (not a regular file, EACCES).
Result<std::optional<OpenLog>> open_log(const std::string& path) {
  OpenLog log;
  log.fd = detail::Fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (log.fd.get() < 0) {
    if (errno == ENOENT) return std::optional<OpenLog>();
    return make_error(ErrorDomain::kSystem, path + ": " + std::strerror(errno), errno);
  }
  struct stat st {};
  if (::fstat(log.fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return make_error(ErrorDomain::kSystem, path + ": not a regular file");
  }
  log.file = {static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size)};
  return std::optional<OpenLog>(std::move(log));
}

}  // namespace

Result<ConsoleChunk> read_console_log(const std::string& path, ConsoleCursor from,
                                      int64_t max_bytes) {
  // console.log.1 first: opened the other way round, a rotation in between would show the same
  // file under both names.
  auto previous = open_log(path + ".1");
  if (!previous) return previous.error();
  auto current = open_log(path);
  if (!current) return current.error();
  if (!*current && !*previous) {
    return make_error(ErrorDomain::kNotFound, "no console log at " + path);
  }
  auto file_of = [](const std::optional<OpenLog>& l) {
    return l ? std::optional<ConsoleLogFile>(l->file) : std::nullopt;
  };
  const ConsoleReadPlan plan =
      plan_console_read(file_of(*current), file_of(*previous), from, max_bytes);
  ConsoleChunk chunk;
  chunk.next = plan.next;
  chunk.lost = plan.lost;
  for (const auto& s : plan.segments) {
    const int fd = s.previous ? (*previous)->fd.get() : (*current)->fd.get();
    const size_t at = chunk.data.size();
    chunk.data.resize(at + static_cast<size_t>(s.length));
    int64_t done = 0;
    while (done < s.length) {
      const ssize_t r = ::pread(fd, chunk.data.data() + at + done,
                                static_cast<size_t>(s.length - done), s.offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      done += r;
    }
    if (done < s.length) {
      // Shorter than its size said (truncated under us): stop at what is there.
      chunk.data.resize(at + static_cast<size_t>(done));
      chunk.next = {s.previous ? (*previous)->file.id : (*current)->file.id, s.offset + done};
      break;
    }
  }
  return chunk;
}

}  // namespace cvm::agent
