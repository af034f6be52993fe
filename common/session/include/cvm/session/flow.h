#pragma once
// The pure core of a session's streams (session.proto): sequence numbers, credit-based windows,
// liveness and who may enter a workspace. No I/O: the agent's session server and cvmctl drive it
// with the frames they receive and the bytes they write out, and send what it hands back.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvm/base/result.h"
#include "cvm/v1/session.pb.h"

namespace cvm::session {

// Bytes either side takes before it hands back credit: large enough that the credit's round trip
// (~100 µs on loopback) does not throttle a stream, small enough that NATS' per-subscription
// pending limit (64 MiB) is never reached.
inline constexpr uint64_t kDefaultWindow = 8ULL << 20;
// The most data one frame carries (NATS' default max_payload is 1 MiB).
inline constexpr size_t kMaxChunk = 128 << 10;
// A side silent for this many heartbeat periods is gone.
inline constexpr int kMissedHeartbeats = 3;

// Bytes of data (input, output, error_output) a frame carries; 0 for control frames.
[[nodiscard]] uint64_t data_size(const cvm::v1::SessionFrame& frame);

// One end of a session: numbers the frames it sends, checks the order of those it receives, and
// keeps both windows: what the peer still takes from it, and what it still owes the peer credit
// for.
class FlowControl {
 public:
  // peer_window: what the peer said it takes; own_window: what this side told the peer.
  FlowControl(uint64_t peer_window, uint64_t own_window);

  // Data bytes the peer takes now.
  [[nodiscard]] uint64_t can_send() const { return send_window_; }
  // `frame` numbered for sending; a data frame spends the peer's window. kInvalid (nothing
  // spent, nothing numbered) for data beyond can_send().
  Result<cvm::v1::SessionFrame> send(cvm::v1::SessionFrame frame);

  // A frame from the peer, in order and within this side's window; credit frames widen the
  // peer's window here. kInvalid names the breach (a gap, a repeat, data beyond the window): the
  // session cannot go on.
  Status receive(const cvm::v1::SessionFrame& frame);

  // This side wrote `bytes` of received data out: a numbered credit frame once half the window
  // waits to be handed back, else nullopt.
  std::optional<cvm::v1::SessionFrame> consumed(uint64_t bytes);

  [[nodiscard]] uint64_t sent_frames() const { return next_out_ - 1; }
  [[nodiscard]] uint64_t received_frames() const { return next_in_ - 1; }
  // Received data bytes not yet written out.
  [[nodiscard]] uint64_t buffered() const { return own_window_ - receive_window_ - unreturned_; }

 private:
  uint64_t send_window_;
  uint64_t own_window_;
  uint64_t receive_window_;  // what the peer may still send before more credit
  uint64_t unreturned_ = 0;  // written out, not yet handed back as credit
  uint64_t next_out_ = 1;
  uint64_t next_in_ = 1;
};

// Whether the peer is still there: anything heard counts; silent for kMissedHeartbeats periods
// means gone. Also when this side should send a heartbeat (nothing sent for a period).
class Liveness {
 public:
  using Time = std::chrono::steady_clock::time_point;
  Liveness(std::chrono::milliseconds period, Time now) : period_(period), heard_(now), sent_(now) {}
  void heard(Time now) { heard_ = now; }
  void sent(Time now) { sent_ = now; }
  [[nodiscard]] bool gone(Time now) const { return now - heard_ >= period_ * kMissedHeartbeats; }
  [[nodiscard]] bool heartbeat_due(Time now) const { return now - sent_ >= period_; }

 private:
  std::chrono::milliseconds period_;
  Time heard_;
  Time sent_;
};

// Who may open a session in a workspace: its owner and the admins; in a workspace without an
// owner, only the admins.
struct Access {
  bool allowed = false;
  std::string reason;  // why not, for the client
};
[[nodiscard]] Access may_enter(std::string_view user, std::string_view owner,
                               const std::vector<std::string>& admins);

// Limits on sessions; 0 means no limit.
struct Limits {
  int per_workspace = 16;
  int per_user = 32;             // on one node
  std::chrono::seconds idle{0};  // no data either way for this long ends a session
};
// Whether one more session fits: nullopt, or why not.
[[nodiscard]] std::optional<std::string> over_limit(int open_in_workspace, int open_by_user,
                                                    const Limits& limits);

// A session id a client picks: 16 random hex digits.
[[nodiscard]] std::string new_session_id();

}  // namespace cvm::session
