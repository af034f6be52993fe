#pragma once
// Time is injected: decision code takes "now" as a value, services read it from a Clock, tests
// use ManualClock instead of sleeping.

#include <chrono>
#include <cstdint>

namespace cvm {

class Clock {
 public:
  virtual ~Clock() = default;
  // Wall-clock milliseconds since the epoch (heartbeats and event timestamps cross machines).
  [[nodiscard]] virtual int64_t now_unix_ms() const = 0;
};

class SystemClock final : public Clock {
 public:
  [[nodiscard]] int64_t now_unix_ms() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_ms = 1'700'000'000'000) : now_(start_ms) {}
  [[nodiscard]] int64_t now_unix_ms() const override { return now_; }
  void advance(std::chrono::milliseconds d) { now_ += d.count(); }
  void set(int64_t ms) { now_ = ms; }

 private:
  int64_t now_;
};

}  // namespace cvm
