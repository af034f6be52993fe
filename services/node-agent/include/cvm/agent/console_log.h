#pragma once
// Reading a workspace's console log (what its init wrote to /dev/console) in pieces, for
// `cvmctl logs`. The supervisor appends to console.log and, at its size cap, renames it to
// console.log.1 and starts a new one; a reader following the log must neither repeat nor miss
// bytes across that rename. A cursor therefore names a file by its inode, not its path: after a
// rotation the inode it names is console.log.1, whose rest is read before the new console.log.
//
// plan_console_read decides what to read (pure, unit-tested); read_console_log does the I/O on
// descriptors opened once, so a rotation between deciding and reading changes nothing.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cvm/base/result.h"

namespace cvm::agent {

struct ConsoleLogFile {
  uint64_t id = 0;  // inode number
  int64_t size = 0;
};

// A position in the log: `offset` bytes into the file `file_id`. file_id 0: the oldest byte kept.
struct ConsoleCursor {
  uint64_t file_id = 0;
  int64_t offset = 0;
  bool operator==(const ConsoleCursor&) const = default;
};

struct ConsoleReadSegment {
  bool previous = false;  // console.log.1 (else console.log)
  int64_t offset = 0;
  int64_t length = 0;
  bool operator==(const ConsoleReadSegment&) const = default;
};

struct ConsoleReadPlan {
  std::vector<ConsoleReadSegment> segments;
  ConsoleCursor next;  // where the following read starts
  // The cursor's file is gone (rotated out twice since): what was between it and the oldest kept
  // byte is lost, and the read starts at the oldest kept byte.
  bool lost = false;
};

// What to read of `previous` (console.log.1) and `current` (console.log), either of which may be
// missing, from `from`, at most `max_bytes` (> 0) in all.
ConsoleReadPlan plan_console_read(std::optional<ConsoleLogFile> current,
                                  std::optional<ConsoleLogFile> previous, ConsoleCursor from,
                                  int64_t max_bytes);

struct ConsoleChunk {
  std::string data;
  ConsoleCursor next;
  bool lost = false;
};

// Reads `path` (and `path`.1) from `from`. kNotFound when neither file exists.
Result<ConsoleChunk> read_console_log(const std::string& path, ConsoleCursor from,
                                      int64_t max_bytes);

}  // namespace cvm::agent
