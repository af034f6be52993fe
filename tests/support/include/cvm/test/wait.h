#pragma once
// Bounded polling for tests: a test that waits on something that never happens must fail, not
// hang, and must not pay a fixed sleep when the thing happens quickly.

#include <chrono>
#include <functional>

namespace cvm::test {

// Polls `pred` every `poll` until it returns true or `timeout` passes; returns the last result.
bool wait_until(const std::function<bool()>& pred,
                std::chrono::milliseconds timeout = std::chrono::seconds{10},
                std::chrono::milliseconds poll = std::chrono::milliseconds{10});

}  // namespace cvm::test
