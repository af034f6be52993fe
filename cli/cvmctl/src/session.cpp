// cvmctl exec / shell: a process inside a workspace, its streams over core NATS (session.proto).
//
// One thread owns the session (flow control, liveness, writing output); the bus delivers frames on
// the io thread and a reader thread reads stdin, both handing their events to it through a queue.
// The reader hands over one chunk at a time and waits until it was sent, so stdin is read only as
// fast as the agent takes it.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <sstream>
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

// A connection whose io_context runs on a thread of its own (subscriptions deliver there), and
// the node the workspace lives on.
struct Client {
  boost::asio::io_context io;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work{
      boost::asio::make_work_guard(io)};
  std::thread thread;
  bus::ConnectionPtr conn;
  std::string node;
  std::string user;
  ~Client() {
    work.reset();
    io.stop();
    if (thread.joinable()) thread.join();
  }
};

// Connects, and finds where `workspace` lives; kExitOk, or the exit code with `err` told why.
int open_client(const GlobalOptions& global, const std::string& workspace, Client& c,
                std::ostream& err) {
  if (!wire::is_valid_id(workspace)) {
    err << "cvmctl: '" << workspace << "' is not a workspace id ([A-Za-z0-9_-], 1..128)\n";
    return kExitUsage;
  }
  c.user = session_user(global);
  if (!wire::is_valid_id(c.user)) {
    err << "cvmctl: '" << c.user << "' cannot be a session user ([A-Za-z0-9_-], 1..128)\n";
    return kExitUsage;
  }
  auto conn = detail::connect(global, c.io);
  if (!conn) {
    detail::unavailable(err, "cannot reach NATS at " + global.nats_url, conn.error(), global);
    return kExitSessionError;
  }
  c.conn = *conn;
  c.thread = std::thread([&c] { c.io.run(); });
  auto kv = c.conn->ensure_kv(service::workspaces_bucket());
  if (!kv) {
    detail::unavailable(err, "cannot read the workspaces", kv.error(), global);
    return kExitSessionError;
  }
  auto record = detail::workspace_record(*kv, workspace);
  if (!record) {
    detail::unavailable(err, "cannot read the workspaces", record.error(), global);
    return kExitSessionError;
  }
  if (!record->has_value() || (*record)->node_id().empty()) {
    err << "cvmctl: no workspace " << workspace << " (cvmctl build start makes one)\n";
    return kExitSessionError;
  }
  c.node = (*record)->node_id();
  return kExitOk;
}

// Where a session's bytes come from and go to: the terminal's, or an accepted connection's.
struct Stdio {
  int in = STDIN_FILENO;
  int out = STDOUT_FILENO;
  int err = STDERR_FILENO;
  bool terminal = true;  // raw mode, resizes and signals are this process's
};

// One session, from the open to its end: the process's exit status, or kExitSessionError.
int run_session(Client& c, cvm::v1::SessionOpen open, bool interactive, const Stdio& stdio,
                std::ostream& err) {
  bus::Connection* conn = c.conn.get();
  const std::string& node = c.node;
  const std::string& user = c.user;
  const std::string sid = session::new_session_id();
  open.set_session_id(sid);
  // Shared with the stdin reader, which may outlive this function (it is never joined).
  auto shared_inbox = std::make_shared<Inbox>();
  Inbox& inbox = *shared_inbox;
  auto sub = conn->subscribe(wire::session_out_subject(node, user, sid), "",
                             [shared_inbox](bus::Message m) {
                               std::lock_guard lock(shared_inbox->mu);
                               shared_inbox->frames.push_back(std::move(m.data));
                               shared_inbox->cv.notify_all();
                             });
  if (!sub) {
    err << "cvmctl: cannot subscribe to the session's output: " << sub.error().message << "\n";
    return kExitSessionError;
  }
  (void)conn->flush();

  open.set_window(session::kDefaultWindow);
  auto answer =
      conn->request(wire::session_open_subject(node, user), open.SerializeAsString(), 10s);
  if (!answer) {
    err << "cvmctl: the agent of node " << node << " does not answer: " << answer.error().message
        << "\n";
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
    (void)conn->publish(in_subject, numbered->SerializeAsString());
  };
  auto send_raw = [&](const SessionFrame& numbered) {
    live.sent(Steady::now());
    (void)conn->publish(in_subject, numbered.SerializeAsString());
  };

  const bool tty = open.tty();
  std::optional<RawTerminal> raw;
  if (tty && stdio.terminal) raw.emplace();
  if (stdio.terminal) {
    struct sigaction sa {};
    sa.sa_handler = on_winch;
    ::sigaction(SIGWINCH, &sa, nullptr);
    sa.sa_handler = on_signal;
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) ::sigaction(sig, &sa, nullptr);
  }

  if (interactive) {
    // Detached: a blocking read of stdin cannot be interrupted, and the process ends with the
    // session anyway.
    // Its own descriptor, closed by itself: the caller may close its own at any time.
    const int in_fd = ::fcntl(stdio.in, F_DUPFD_CLOEXEC, 0);
    std::thread([shared_inbox, in_fd] {
      Inbox& inbox = *shared_inbox;
      std::string buf(session::kMaxChunk, '\0');
      for (;;) {
        {
          std::unique_lock lock(inbox.mu);
          inbox.cv.wait(lock, [&] { return inbox.input_taken; });
        }
        const ssize_t n = in_fd < 0 ? 0 : ::read(in_fd, buf.data(), buf.size());
        if (n < 0 && errno == EINTR) continue;
        std::lock_guard lock(inbox.mu);
        if (n <= 0) {
          if (in_fd >= 0) ::close(in_fd);
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
  bool eof_sent = !interactive;
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
          if (!write_all(out ? stdio.out : stdio.err, data)) {
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
    if (stdio.terminal && g_winch.exchange(false) && tty) {
      const auto [rows, cols] = terminal_size();
      SessionFrame f;
      f.mutable_resize()->set_rows(rows);
      f.mutable_resize()->set_cols(cols);
      send(f);
    }
    if (const int sig = stdio.terminal ? g_signal.exchange(0) : 0; sig != 0) {
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

}  // namespace

std::optional<std::pair<uint16_t, uint16_t>> parse_port_pair(const std::string& text) {
  auto port = [](std::string_view s, bool zero_ok) -> std::optional<uint16_t> {
    uint32_t v = 0;
    if (s.empty() || s.size() > 5) return std::nullopt;
    for (char ch : s) {
      if (ch < '0' || ch > '9') return std::nullopt;
      v = v * 10 + static_cast<uint32_t>(ch - '0');
    }
    if (v > 65535 || (v == 0 && !zero_ok)) return std::nullopt;
    return static_cast<uint16_t>(v);
  };
  const auto colon = text.find(':');
  if (colon == std::string::npos) {
    auto p = port(text, false);
    if (!p) return std::nullopt;
    return std::make_pair(*p, *p);
  }
  auto local = port(std::string_view(text).substr(0, colon), true);
  auto remote = port(std::string_view(text).substr(colon + 1), false);
  if (!local || !remote) return std::nullopt;
  return std::make_pair(*local, *remote);
}

int exec_command(const GlobalOptions& global, const ExecOptions& o, std::ostream& err) {
  Client c;
  if (const int rc = open_client(global, o.workspace, c, err); rc != kExitOk) return rc;
  cvm::v1::SessionOpen open;
  open.set_workspace_id(o.workspace);
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
  return run_session(c, std::move(open), o.interactive, Stdio{}, err);
}

int proxy_command(const GlobalOptions& global, const std::string& workspace, uint16_t port,
                  std::ostream& err) {
  Client c;
  if (const int rc = open_client(global, workspace, c, err); rc != kExitOk) return rc;
  cvm::v1::SessionOpen open;
  open.set_workspace_id(workspace);
  open.set_port(port);
  return run_session(c, std::move(open), /*interactive=*/true, Stdio{}, err);
}

int port_forward_command(const GlobalOptions& global, const std::string& workspace, uint16_t local,
                         uint16_t remote, std::ostream& out, std::ostream& err) {
  Client c;
  if (const int rc = open_client(global, workspace, c, err); rc != kExitOk) return rc;
  // A peer that goes away mid-write must end its connection, not cvmctl.
  ::signal(SIGPIPE, SIG_IGN);
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(local);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (listener < 0 || ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listener, 64) != 0) {
    err << "cvmctl: cannot listen on 127.0.0.1:" << local << ": " << std::strerror(errno) << "\n";
    return kExitSessionError;
  }
  socklen_t len = sizeof addr;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  out << "Forwarding from 127.0.0.1:" << ntohs(addr.sin_port) << " -> " << workspace << ":"
      << remote << std::endl;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  std::atomic<int> live{0};
  while (g_signal.load() == 0) {
    const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      err << "cvmctl: accept: " << std::strerror(errno) << "\n";
      break;
    }
    live.fetch_add(1);
    std::thread([&c, &err, &live, fd, workspace, remote] {
      cvm::v1::SessionOpen open;
      open.set_workspace_id(workspace);
      open.set_port(remote);
      std::ostringstream why;
      (void)run_session(c, std::move(open), true, Stdio{fd, fd, STDERR_FILENO, false}, why);
      ::shutdown(fd, SHUT_RDWR);
      ::close(fd);
      if (!why.str().empty()) err << why.str() << std::flush;
      live.fetch_sub(1);
    }).detach();
  }
  ::close(listener);
  // Connections in flight end with the process; their peers see it close.
  return kExitOk;
}

}  // namespace cvm::cli
