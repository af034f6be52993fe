// cvmctl exec / shell: a process inside a workspace, its streams over core NATS (session.proto).
//
// One thread owns the session (flow control, liveness, writing output); the bus delivers frames on
// the io thread and a reader thread reads stdin, both handing their events to it through a queue.
// The reader hands over one chunk at a time and waits until it was sent, so stdin is read only as
// fast as the agent takes it.
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>

#include "cvm/base/wire.h"
#include "cvm/cli/commands.h"
#include "cvm/service/streams.h"
#include "cvm/session/flow.h"
#include "cvm/v1/session.pb.h"
#include "shared.h"

namespace cvm::cli {

using cvm::v1::SessionFrame;
using Steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string session_user(const GlobalOptions& global) {
  if (!global.nats_user.empty()) return global.nats_user;
  const char* user = std::getenv("USER");
  if (user != nullptr && wire::is_valid_id(user)) return user;
  return "root";
}

namespace {

std::atomic<bool> g_winch{false};
std::atomic<int> g_signal{0};

void on_winch(int) { g_winch.store(true); }
void on_signal(int sig) { g_signal.store(sig); }

bool write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// The local terminal in raw mode while a tty session runs, as ssh and docker exec -it do, so
// that ^C, ^Z and every key go to the remote terminal.
class RawTerminal {
 public:
  RawTerminal() {
    if (::isatty(STDIN_FILENO) != 1 || ::tcgetattr(STDIN_FILENO, &saved_) != 0) return;
    termios raw = saved_;
    ::cfmakeraw(&raw);
    if (::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0) active_ = true;
  }
  ~RawTerminal() {
    if (active_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  RawTerminal(const RawTerminal&) = delete;
  RawTerminal& operator=(const RawTerminal&) = delete;

 private:
  termios saved_{};
  bool active_ = false;
};

std::pair<uint32_t, uint32_t> terminal_size() {
  winsize ws{};
  for (int fd : {STDIN_FILENO, STDOUT_FILENO}) {
    if (::ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0) return {ws.ws_row, ws.ws_col};
  }
  return {24, 80};
}

// What the session thread is handed.
struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> frames;    // raw SessionFrames from the agent
  std::optional<std::string> input;  // a chunk of stdin, waiting to be sent
  bool input_eof = false;
  bool input_taken = true;  // the reader may read the next chunk
};

}  // namespace

int exec_command(const GlobalOptions& global, const ExecOptions& o, std::ostream& err) {
  if (!wire::is_valid_id(o.workspace)) {
    err << "cvmctl: '" << o.workspace << "' is not a workspace id ([A-Za-z0-9_-], 1..128)\n";
    return kExitUsage;
  }
  const std::string user = session_user(global);
  if (!wire::is_valid_id(user)) {
    err << "cvmctl: '" << user << "' cannot be a session user ([A-Za-z0-9_-], 1..128)\n";
    return kExitUsage;
  }
  boost::asio::io_context io;
  auto work = boost::asio::make_work_guard(io);
  auto conn = detail::connect(global, io);
  if (!conn) {
    detail::unavailable(err, "cannot reach NATS at " + global.nats_url, conn.error(), global);
    return kExitSessionError;
  }
  std::thread io_thread([&io] { io.run(); });
  struct Joiner {
    boost::asio::io_context& io;
    std::thread& t;
    decltype(work)& w;
    ~Joiner() {
      w.reset();
      io.stop();
      t.join();
    }
  } joiner{io, io_thread, work};

  auto kv = (*conn)->ensure_kv(service::workspaces_bucket());
  if (!kv) {
    detail::unavailable(err, "cannot read the workspaces", kv.error(), global);
    return kExitSessionError;
  }
  auto record = detail::workspace_record(*kv, o.workspace);
  if (!record) {
    detail::unavailable(err, "cannot read the workspaces", record.error(), global);
    return kExitSessionError;
  }
  if (!record->has_value() || (*record)->node_id().empty()) {
    err << "cvmctl: no workspace " << o.workspace << " (cvmctl build start makes one)\n";
    return kExitSessionError;
  }
  const std::string node = (*record)->node_id();
  const std::string sid = session::new_session_id();

  // Shared with the stdin reader, which may outlive this function (it is never joined).
  auto shared_inbox = std::make_shared<Inbox>();
  Inbox& inbox = *shared_inbox;
  auto sub = (*conn)->subscribe(wire::session_out_subject(node, user, sid), "",
                                [shared_inbox](bus::Message m) {
                                  std::lock_guard lock(shared_inbox->mu);
                                  shared_inbox->frames.push_back(std::move(m.data));
                                  shared_inbox->cv.notify_all();
                                });
  if (!sub) {
    detail::unavailable(err, "cannot subscribe to the session's output", sub.error(), global);
    return kExitSessionError;
  }
  (void)(*conn)->flush();

  cvm::v1::SessionOpen open;
  open.set_workspace_id(o.workspace);
  open.set_session_id(sid);
  for (const auto& a : o.argv) open.add_argv(a);
  open.set_tty(o.tty);
  open.set_user(o.user);
  open.set_cwd(o.cwd);
  for (const auto& e : o.env) open.add_env(e);
  if (o.tty) {
    const auto [rows, cols] = terminal_size();
    open.set_rows(rows);
    open.set_cols(cols);
    const char* term = std::getenv("TERM");
    open.set_term(term != nullptr ? term : "xterm");
  }
  open.set_window(session::kDefaultWindow);
  auto answer =
      (*conn)->request(wire::session_open_subject(node, user), open.SerializeAsString(), 10s);
  if (!answer) {
    detail::unavailable(err, "the agent of node " + node + " does not answer", answer.error(),
                        global);
    return kExitSessionError;
  }
  cvm::v1::SessionOpened opened;
  if (!opened.ParseFromString(answer->data)) {
    err << "cvmctl: node " << node << " answered with something that is not a "
        << "cvm.v1.SessionOpened\n";
    return kExitSessionError;
  }
  if (!opened.error().empty()) {
    err << "cvmctl: " << opened.error() << "\n";
    return kExitSessionError;
  }

  session::FlowControl fc(opened.window(), session::kDefaultWindow);
  const auto period =
      std::chrono::milliseconds(opened.heartbeat_ms() == 0 ? 2000 : opened.heartbeat_ms());
  session::Liveness live(period, Steady::now());
  const std::string in_subject = wire::session_in_subject(node, user, sid);
  auto send = [&](SessionFrame f) {
    auto numbered = fc.send(std::move(f));
    if (!numbered) return;
    live.sent(Steady::now());
    (void)(*conn)->publish(in_subject, numbered->SerializeAsString());
  };
  auto send_raw = [&](const SessionFrame& numbered) {
    live.sent(Steady::now());
    (void)(*conn)->publish(in_subject, numbered.SerializeAsString());
  };

  std::optional<RawTerminal> raw;
  if (o.tty) raw.emplace();
  struct sigaction sa {};
  sa.sa_handler = on_winch;
  ::sigaction(SIGWINCH, &sa, nullptr);
  sa.sa_handler = on_signal;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) ::sigaction(sig, &sa, nullptr);

  if (o.interactive) {
    // Detached: a blocking read of stdin cannot be interrupted, and the process ends with the
    // session anyway.
    std::thread([shared_inbox] {
      Inbox& inbox = *shared_inbox;
      std::string buf(session::kMaxChunk, '\0');
      for (;;) {
        {
          std::unique_lock lock(inbox.mu);
          inbox.cv.wait(lock, [&] { return inbox.input_taken; });
        }
        const ssize_t n = ::read(STDIN_FILENO, buf.data(), buf.size());
        if (n < 0 && errno == EINTR) continue;
        std::lock_guard lock(inbox.mu);
        if (n <= 0) {
          inbox.input_eof = true;
          inbox.cv.notify_all();
          return;
        }
        inbox.input = buf.substr(0, static_cast<size_t>(n));
        inbox.input_taken = false;
        inbox.cv.notify_all();
      }
    }).detach();
  } else {
    SessionFrame eof;
    eof.set_stdin_eof(true);
    send(eof);
  }

  int interrupts = 0;
  bool eof_sent = !o.interactive;
  for (;;) {
    std::deque<std::string> frames;
    std::optional<std::string> input;
    bool input_eof = false;
    {
      std::unique_lock lock(inbox.mu);
      inbox.cv.wait_for(lock, 100ms, [&] {
        return !inbox.frames.empty() || (inbox.input && inbox.input->size() <= fc.can_send()) ||
               (inbox.input_eof && !eof_sent);
      });
      frames.swap(inbox.frames);
      // Input is taken only while the agent's window has room for all of it.
      if (inbox.input && inbox.input->size() <= fc.can_send()) {
        input = std::move(inbox.input);
        inbox.input.reset();
        inbox.input_taken = true;
        inbox.cv.notify_all();
      }
      input_eof = inbox.input_eof && !inbox.input;
    }
    const auto now = Steady::now();
    for (auto& raw_frame : frames) {
      live.heard(now);
      SessionFrame f;
      if (!f.ParseFromString(raw_frame)) {
        err << "cvmctl: the agent sent something that is not a cvm.v1.SessionFrame\n";
        return kExitSessionError;
      }
      // An error ends the session whatever its number (an agent without the session sends one
      // unnumbered).
      if (f.body_case() == SessionFrame::kError) {
        raw.reset();
        err << "cvmctl: " << f.error() << "\n";
        return kExitSessionError;
      }
      if (auto st = fc.receive(f); !st.ok()) {
        raw.reset();
        err << "cvmctl: the session broke off: " << st.error().message << "\n";
        SessionFrame bye;
        bye.set_hangup(true);
        send(bye);
        return kExitSessionError;
      }
      switch (f.body_case()) {
        case SessionFrame::kOutput:
        case SessionFrame::kErrorOutput: {
          const bool out = f.body_case() == SessionFrame::kOutput;
          const std::string& data = out ? f.output() : f.error_output();
          if (!write_all(out ? STDOUT_FILENO : STDERR_FILENO, data)) {
            // Our reader went away (a closed pipe): hang up, as ssh does.
            SessionFrame bye;
            bye.set_hangup(true);
            send(bye);
            return kExitSessionError;
          }
          if (auto credit = fc.consumed(data.size())) send_raw(*credit);
          break;
        }
        case SessionFrame::kExit:
          return f.exit().code();
        default:
          break;
      }
    }
    if (input) {
      SessionFrame f;
      f.set_input(std::move(*input));
      send(std::move(f));
    }
    if (input_eof && !eof_sent) {
      SessionFrame f;
      f.set_stdin_eof(true);
      send(f);
      eof_sent = true;
    }
    if (g_winch.exchange(false) && o.tty) {
      const auto [rows, cols] = terminal_size();
      SessionFrame f;
      f.mutable_resize()->set_rows(rows);
      f.mutable_resize()->set_cols(cols);
      send(f);
    }
    if (const int sig = g_signal.exchange(0); sig != 0) {
      // Without a terminal, signals to cvmctl go to the process; a second ^C leaves.
      if (sig == SIGINT && ++interrupts >= 2) {
        SessionFrame bye;
        bye.set_hangup(true);
        send(bye);
        err << "cvmctl: interrupted; the session was hung up\n";
        return 130;
      }
      SessionFrame f;
      f.set_signal(sig);
      send(f);
    }
    if (live.gone(Steady::now())) {
      raw.reset();
      err << "cvmctl: the agent of node " << node << " stopped answering; the session is lost\n";
      return kExitSessionError;
    }
    if (live.heartbeat_due(Steady::now())) {
      SessionFrame f;
      f.set_heartbeat(true);
      send(f);
    }
  }
}

}  // namespace cvm::cli
