#pragma once
// A ManualClock that a test may advance from its own thread while services read it on theirs
// (cvm::ManualClock is plain: single-threaded decision tests use it).

#include <atomic>
#include <chrono>
#include <cstdint>

#include "cvm/base/clock.h"

namespace cvm::test {

class AtomicClock final : public Clock {
 public:
  explicit AtomicClock(int64_t start_ms = 1'700'000'000'000) : now_(start_ms) {}
  [[nodiscard]] int64_t now_unix_ms() const override { return now_.load(); }
  void advance(std::chrono::milliseconds d) { now_ += d.count(); }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace cvm::test
