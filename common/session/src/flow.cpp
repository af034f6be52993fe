#include "cvm/session/flow.h"

#include <algorithm>
#include <random>
#include <string>

namespace cvm::session {

using cvm::v1::SessionFrame;

uint64_t data_size(const SessionFrame& frame) {
  switch (frame.body_case()) {
    case SessionFrame::kInput:
      return frame.input().size();
    case SessionFrame::kOutput:
      return frame.output().size();
    case SessionFrame::kErrorOutput:
      return frame.error_output().size();
    default:
      return 0;
  }
}

FlowControl::FlowControl(uint64_t peer_window, uint64_t own_window)
    : send_window_(peer_window), own_window_(own_window), receive_window_(own_window) {}

Result<SessionFrame> FlowControl::send(SessionFrame frame) {
  const uint64_t n = data_size(frame);
  if (n > send_window_) {
    return make_error(ErrorDomain::kInvalid, std::to_string(n) +
                                                 " bytes exceed the peer's window (" +
                                                 std::to_string(send_window_) + " left)");
  }
  send_window_ -= n;
  frame.set_seq(next_out_++);
  return frame;
}

Status FlowControl::receive(const SessionFrame& frame) {
  if (frame.seq() != next_in_) {
    return make_error(ErrorDomain::kInvalid, "frame " + std::to_string(frame.seq()) +
                                                 " came where " + std::to_string(next_in_) +
                                                 " was due (a frame was lost or repeated)");
  }
  const uint64_t n = data_size(frame);
  if (n > receive_window_) {
    return make_error(ErrorDomain::kInvalid,
                      "the peer sent " + std::to_string(n) + " bytes with only " +
                          std::to_string(receive_window_) + " of window left");
  }
  if (frame.body_case() == SessionFrame::kCredit) {
    // A peer cannot hand back more than was ever sent to it; saturate rather than wrap.
    send_window_ =
        frame.credit() > UINT64_MAX - send_window_ ? UINT64_MAX : send_window_ + frame.credit();
  }
  receive_window_ -= n;
  ++next_in_;
  return {};
}

std::optional<SessionFrame> FlowControl::consumed(uint64_t bytes) {
  // Never hand back more than the peer spent: a caller's mistake must not widen the window.
  const uint64_t spent = own_window_ - receive_window_ - unreturned_;
  unreturned_ += std::min(bytes, spent);
  if (unreturned_ == 0 || unreturned_ < own_window_ / 2) return std::nullopt;
  SessionFrame credit;
  credit.set_credit(unreturned_);
  receive_window_ += unreturned_;
  unreturned_ = 0;
  credit.set_seq(next_out_++);
  return credit;
}

Access may_enter(std::string_view user, std::string_view owner,
                 const std::vector<std::string>& admins) {
  if (user.empty()) return {false, "the request names no user"};
  if (std::find(admins.begin(), admins.end(), user) != admins.end()) return {true, {}};
  if (!owner.empty() && owner == user) return {true, {}};
  if (owner.empty()) {
    return {false, "the workspace has no owner: only admins may enter it, and " +
                       std::string(user) + " is not one"};
  }
  return {false,
          "the workspace belongs to " + std::string(owner) + ", not to " + std::string(user)};
}

std::optional<std::string> over_limit(int open_in_workspace, int open_by_user,
                                      const Limits& limits) {
  if (limits.per_workspace > 0 && open_in_workspace >= limits.per_workspace) {
    return "the workspace already has " + std::to_string(open_in_workspace) +
           " sessions (at most " + std::to_string(limits.per_workspace) + ")";
  }
  if (limits.per_user > 0 && open_by_user >= limits.per_user) {
    return "you already have " + std::to_string(open_by_user) + " sessions on this node (at most " +
           std::to_string(limits.per_user) + ")";
  }
  return std::nullopt;
}

std::string new_session_id() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(16, '0');
  uint64_t v = rng();
  for (auto& c : id) {
    c = kHex[v & 0xf];
    v >>= 4;
  }
  return id;
}

}  // namespace cvm::session
