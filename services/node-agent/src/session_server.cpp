#include "cvm/agent/session_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <sstream>

#include <spdlog/spdlog.h>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <nlohmann/json.hpp>

#include "cvm/agent/launcher.h"
#include "cvm/agent/supervisor_spec.h"
#include "cvm/base/wire.h"
#include "file_util.h"

extern char** environ;

namespace cvm::agent {

using cvm::v1::SessionFrame;
using cvm::v1::SessionOpen;
using cvm::v1::SessionOpened;
using Steady = std::chrono::steady_clock;
namespace asio = boost::asio;

namespace {

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (;;) {
    const size_t at = s.find(sep, start);
    out.push_back(
        s.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start));
    if (at == std::string_view::npos) return out;
    start = at + 1;
  }
}

std::optional<uint32_t> number(std::string_view s) {
  uint32_t v = 0;
  if (s.empty()) return std::nullopt;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size()) return std::nullopt;
  return v;
}

struct PasswdEntry {
  std::string name;
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string home;
  std::string shell;
};

// The colon-separated records of /etc/passwd or /etc/group with at least `fields` fields;
// comments and blank lines are skipped.
std::vector<std::vector<std::string_view>> records(std::string_view text, size_t fields) {
  std::vector<std::vector<std::string_view>> out;
  for (auto line : detail::trimmed_lines(text)) {
    if (line.empty() || line.front() == '#') continue;
    auto f = split(line, ':');
    if (f.size() >= fields) out.push_back(std::move(f));
  }
  return out;
}

std::vector<PasswdEntry> parse_passwd(std::string_view text) {
  std::vector<PasswdEntry> out;
  for (const auto& f : records(text, 7)) {
    const auto uid = number(f[2]);
    const auto gid = number(f[3]);
    if (!uid || !gid) continue;
    out.push_back({std::string(f[0]), *uid, *gid, std::string(f[5]), std::string(f[6])});
  }
  return out;
}

struct GroupEntry {
  std::string name;
  uint32_t gid = 0;
  std::vector<std::string_view> members;
};

std::vector<GroupEntry> parse_group(std::string_view text) {
  std::vector<GroupEntry> out;
  for (const auto& f : records(text, 4)) {
    const auto gid = number(f[2]);
    if (!gid) continue;
    GroupEntry g{std::string(f[0]), *gid, {}};
    if (!f[3].empty()) g.members = split(f[3], ',');
    out.push_back(std::move(g));
  }
  return out;
}

Error sys_error(const std::string& what, int err) {
  return make_error(ErrorDomain::kSystem, what + ": " + std::strerror(err), err);
}

// The signals a client may send a process that runs without a terminal (with one, ^C and ^Z are
// bytes the terminal turns into signals). runc forwards what it receives down the chain; SIGKILL
// and SIGSTOP cannot be forwarded, so they are not offered.
bool forwardable(int sig) {
  switch (sig) {
    case SIGHUP:
    case SIGINT:
    case SIGQUIT:
    case SIGTERM:
    case SIGUSR1:
    case SIGUSR2:
    case SIGWINCH:
    case SIGCONT:
    case SIGTSTP:
      return true;
    default:
      return false;
  }
}

// Reads the file at `rel` below `root` with every path component resolved inside `root` (an
// image's /etc/passwd may be a symlink; it must not lead to the node's). Empty when unreadable.
std::string read_in_root(const std::string& root, const std::string& rel) {
  const int dir = ::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return {};
  detail::Fd d(dir);
  struct OpenHow {
    uint64_t flags, mode, resolve;
  } how{O_RDONLY | O_CLOEXEC, 0, 0x10 /* RESOLVE_IN_ROOT */};
  const int fd = static_cast<int>(::syscall(SYS_openat2, dir, rel.c_str(), &how, sizeof how));
  if (fd < 0) return {};
  detail::Fd f(fd);
  std::string out;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0 || out.size() > (4u << 20)) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// The pid runc started the container with (its state.json), without running runc.
int container_init_pid(const std::string& runc_root, const std::string& container_id) {
  auto text = detail::read_file(runc_root + "/" + container_id + "/state.json", 1 << 20);
  if (!text) return 0;
  auto j = nlohmann::json::parse(*text, nullptr, false);
  return j.is_object() ? j.value("init_process_pid", 0) : 0;
}

// A TCP connection to 127.0.0.1:port inside the network namespace at `netns`: made on a thread of
// its own that enters the namespace (setns changes only the calling thread) and ends there; the
// socket stays in the namespace it was made in.
Result<int> connect_in_netns(const std::string& netns, uint16_t port) {
  Result<int> out = make_error(ErrorDomain::kSystem, "not connected");
  std::thread([&] {
    const int ns = ::open(netns.c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0) {
      out = sys_error("open " + netns, errno);
      return;
    }
    detail::Fd ns_fd(ns);
    if (::setns(ns, CLONE_NEWNET) != 0) {
      out = sys_error("enter the workspace's network namespace", errno);
      return;
    }
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      out = sys_error("socket", errno);
      return;
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      const int e = errno;
      ::close(fd);
      out = sys_error("nothing answers on port " + std::to_string(port) + " in the workspace", e);
      return;
    }
    out = fd;
  }).join();
  return out;
}

}  // namespace

Result<SessionUser> resolve_session_user(std::string_view spec, std::string_view passwd,
                                         std::string_view group, uint32_t default_uid,
                                         uint32_t default_gid) {
  const auto users = parse_passwd(passwd);
  const auto groups = parse_group(group);
  const size_t colon = spec.find(':');
  const std::string_view user_part = spec.substr(0, colon);
  const std::string_view group_part =
      colon == std::string_view::npos ? std::string_view{} : spec.substr(colon + 1);

  SessionUser out;
  const PasswdEntry* entry = nullptr;
  if (user_part.empty()) {
    out.uid = default_uid;
    out.gid = default_gid;
    for (const auto& u : users) {
      if (u.uid == default_uid) {
        entry = &u;
        break;
      }
    }
  } else {
    for (const auto& u : users) {
      if (u.name == user_part) {
        entry = &u;
        break;
      }
    }
    if (entry == nullptr) {
      const auto uid = number(user_part);
      if (!uid) {
        return make_error(ErrorDomain::kNotFound, "no user '" + std::string(user_part) +
                                                      "' in the workspace's /etc/passwd");
      }
      out.uid = *uid;
      out.gid = *uid;
      for (const auto& u : users) {
        if (u.uid == *uid) {
          entry = &u;
          break;
        }
      }
    }
  }
  if (entry != nullptr) {
    out.uid = entry->uid;
    out.gid = entry->gid;
    out.name = entry->name;
    if (!entry->home.empty()) out.home = entry->home;
    if (!entry->shell.empty()) out.shell = entry->shell;
  }
  if (!group_part.empty()) {
    const GroupEntry* g = nullptr;
    for (const auto& e : groups) {
      if (e.name == group_part) g = &e;
    }
    if (g != nullptr) {
      out.gid = g->gid;
    } else if (auto gid = number(group_part)) {
      out.gid = *gid;
    } else {
      return make_error(ErrorDomain::kNotFound,
                        "no group '" + std::string(group_part) + "' in the workspace's /etc/group");
    }
  }
  if (!out.name.empty()) {
    for (const auto& g : groups) {
      if (g.gid != out.gid &&
          std::find(g.members.begin(), g.members.end(), out.name) != g.members.end()) {
        out.groups.push_back(g.gid);
      }
    }
  }
  return out;
}

std::vector<std::string> exec_argv(const ExecPlan& p) {
  std::vector<std::string> argv = {p.runc, "--root", p.runc_root, "exec"};
  if (p.tty) argv.emplace_back("-t");
  argv.push_back(p.container_id);
  argv.insert(argv.end(), {p.inner_runtime, "--root", p.inner_root, "exec"});
  if (p.tty) argv.emplace_back("-t");
  argv.insert(argv.end(),
              {"--user", std::to_string(p.user.uid) + ":" + std::to_string(p.user.gid)});
  for (uint32_t g : p.user.groups)
    argv.insert(argv.end(), {"--additional-gids", std::to_string(g)});
  argv.insert(argv.end(), {"--cwd", p.cwd.empty() ? p.user.home : p.cwd});
  // What a login gives; the image's own environment (PATH, ...) comes from the inner spec, and
  // the client's --env entries come last so they win.
  std::vector<std::string> env = {"HOME=" + p.user.home};
  if (!p.user.name.empty()) {
    env.push_back("USER=" + p.user.name);
    env.push_back("LOGNAME=" + p.user.name);
  }
  env.push_back("SHELL=" + p.user.shell);
  env.insert(env.end(), p.env.begin(), p.env.end());
  for (const auto& e : env) argv.insert(argv.end(), {"--env", e});
  argv.push_back(p.inner_id);
  argv.insert(argv.end(), p.argv.begin(), p.argv.end());
  return argv;
}

std::vector<std::string> login_shell_argv(const SessionUser& user) { return {user.shell, "-l"}; }

std::vector<int> leftover_session_processes(const std::string& proc_root,
                                            const std::string& runc_root) {
  std::vector<int> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(proc_root, ec)) {
    const auto pid = number(entry.path().filename().string());
    if (!pid || *pid == static_cast<uint32_t>(::getpid())) continue;
    const auto cmdline = detail::read_file(entry.path().string() + "/cmdline", 64 << 10);
    if (!cmdline) continue;
    auto args = split(*cmdline, '\0');
    if (args.size() >= 5 && args[1] == "--root" && args[2] == runc_root && args[3] == "exec" &&
        std::filesystem::path(std::string(args[0])).filename() == "runc") {
      out.push_back(static_cast<int>(*pid));
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

ProcessTree read_process_tree(const std::string& proc_root) {
  ProcessTree children;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(proc_root, ec)) {
    const auto pid = number(entry.path().filename().string());
    if (!pid) continue;
    const auto stat = detail::read_file(entry.path().string() + "/stat", 4096);
    if (!stat) continue;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so from the last ')'.
    const auto close = stat->rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat->substr(close + 1));
    std::string state;
    int ppid = 0;
    if (rest >> state >> ppid) children.emplace(ppid, static_cast<int>(*pid));
  }
  return children;
}

std::vector<int> descendants(const ProcessTree& tree, int root) {
  std::vector<int> out;
  std::vector<int> frontier = {root};
  while (!frontier.empty()) {
    std::vector<int> next;
    for (int parent : frontier) {
      auto [lo, hi] = tree.equal_range(parent);
      for (auto it = lo; it != hi; ++it) {
        // A cycle cannot happen in a real /proc, but a bounded walk costs nothing.
        if (it->second == root || std::find(out.begin(), out.end(), it->second) != out.end()) {
          continue;
        }
        out.push_back(it->second);
        next.push_back(it->second);
      }
    }
    frontier = std::move(next);
  }
  return out;
}

std::vector<int> process_descendants(const std::string& proc_root, int root) {
  return descendants(read_process_tree(proc_root), root);
}

namespace {

// SIGKILL to `root` and everything below it, collected first, so nothing is reparented away
// between one kill and the next.
void kill_tree(int root, const ProcessTree& tree) {
  const auto below = descendants(tree, root);
  ::kill(root, SIGKILL);
  for (int pid : below) ::kill(pid, SIGKILL);
}

}  // namespace

// ---- one session, on the lane ----

struct SessionServer::Session {
  Session(asio::io_context& lane, uint64_t peer_window)
      : fc(peer_window, session::kDefaultWindow),
        live(std::chrono::milliseconds{2000}, Steady::now()),
        out(lane),
        err(lane),
        in(lane),
        exit_watch(lane) {}

  std::string key;  // "<user>.<session id>"
  std::string user;
  std::string workspace_id;
  std::string out_subject;
  bool tty = false;
  bool socket = false;  // a port session: out and in are one TCP connection
  session::FlowControl fc;
  session::Liveness live;
  Steady::time_point last_data = Steady::now();

  pid_t pid = -1;
  asio::posix::stream_descriptor out;         // stdout pipe, or the pty master
  asio::posix::stream_descriptor err;         // stderr pipe; closed with a tty
  asio::posix::stream_descriptor in;          // stdin pipe, or a dup of the pty master
  asio::posix::stream_descriptor exit_watch;  // a pidfd
  std::array<char, session::kMaxChunk> out_buf{};
  std::array<char, session::kMaxChunk> err_buf{};
  bool out_reading = false, err_reading = false;
  bool out_eof = false, err_eof = true;
  uint64_t reserved = 0;                 // window promised to reads in flight
  uint64_t bytes_out = 0, bytes_in = 0;  // data of this session, for its closing log line

  std::deque<std::string> to_write;
  bool writing = false;
  bool input_eof = false;  // close stdin once to_write is empty

  bool exited = false;
  int exit_code = 0;
  int exit_signal = 0;
  std::optional<Steady::time_point> drain_until;  // after the exit: output still owed
  std::optional<Steady::time_point> kill_at;      // hung up: SIGKILL the chain then
  bool ended = false;                             // the client was told (exit or error)
};

SessionServer::SessionServer(bus::ConnectionPtr conn, SessionServerConfig config, Lookup lookup)
    : conn_(std::move(conn)), config_(std::move(config)), lookup_(std::move(lookup)) {}

SessionServer::~SessionServer() { stop(); }

Status SessionServer::start() {
  leftovers_ = leftover_session_processes("/proc", config_.runc_root);
  const auto tree = leftovers_.empty() ? ProcessTree{} : read_process_tree("/proc");
  for (int pid : leftovers_) {
    spdlog::info("sessions: hanging up runc exec {}, a session of an agent before this one", pid);
    ::kill(pid, SIGHUP);
    for (int below : descendants(tree, pid)) ::kill(below, SIGHUP);
  }
  leftover_kill_at_ = Steady::now() + config_.hangup_grace;
  work_.emplace(lane_.get_executor());
  timer_ = std::make_unique<asio::steady_timer>(lane_);
  thread_ = std::thread([this] { lane_.run(); });
  asio::post(lane_, [this] { tick(); });
  auto open = conn_->subscribe(wire::session_open_wildcard(config_.node_id), "",
                               [this](bus::Message m) { on_open(m); });
  if (!open) return open.error();
  open_sub_ = std::move(*open);
  auto frames = conn_->subscribe(
      wire::session_in_wildcard(config_.node_id), "",
      [this](bus::Message m) { asio::post(lane_, [this, m = std::move(m)] { on_frame(m); }); });
  if (!frames) return frames.error();
  frame_sub_ = std::move(*frames);
  return {};
}

void SessionServer::stop() {
  if (!thread_.joinable()) return;
  if (open_sub_) open_sub_->unsubscribe();
  if (frame_sub_) frame_sub_->unsubscribe();
  std::promise<void> done;
  asio::post(lane_, [this, &done] {
    end_all("the agent of node " + config_.node_id + " is stopping");
    // What SIGHUP did not end within a moment is killed: the agent leaves no runc behind.
    const auto deadline = Steady::now() + std::chrono::seconds{1};
    for (auto& [key, s] : sessions_) {
      (void)key;
      while (s->pid > 0 && Steady::now() < deadline) {
        if (::waitpid(s->pid, nullptr, WNOHANG) == s->pid) s->pid = -1;
        if (s->pid > 0) std::this_thread::sleep_for(std::chrono::milliseconds{20});
      }
      if (s->pid > 0) {
        kill_tree(s->pid, read_process_tree("/proc"));
        ::waitpid(s->pid, nullptr, 0);
        s->pid = -1;
      }
    }
    sessions_.clear();
    done.set_value();
  });
  done.get_future().wait();
  timer_->cancel();
  work_.reset();
  lane_.stop();
  thread_.join();
}

SessionCounters SessionServer::counters() const {
  std::lock_guard lock(counters_mu_);
  return counters_;
}

void SessionServer::reply(const std::string& subject, const SessionOpened& answer) {
  if (subject.empty()) return;
  if (auto st = conn_->publish(subject, answer.SerializeAsString()); !st.ok()) {
    spdlog::warn("sessions: cannot answer an open on {}: {}", subject, st.error().message);
  }
}

void SessionServer::refuse(const std::string& reply_to, SessionOpened answer, std::string why,
                           bool failed) {
  {
    std::lock_guard lock(counters_mu_);
    ++(failed ? counters_.failed : counters_.refused);
  }
  answer.set_error(std::move(why));
  reply(reply_to, answer);
}

std::shared_ptr<SessionServer::Session> SessionServer::new_session(const SessionOpen& open,
                                                                   const std::string& user) {
  const uint64_t peer_window = open.window() == 0 ? session::kDefaultWindow : open.window();
  auto s = std::make_shared<Session>(lane_, peer_window);
  s->live = session::Liveness(config_.heartbeat, Steady::now());
  s->key = user + "." + open.session_id();
  s->user = user;
  s->workspace_id = open.workspace_id();
  s->out_subject = wire::session_out_subject(config_.node_id, user, open.session_id());
  return s;
}

void SessionServer::admit(const std::shared_ptr<Session>& s, const std::string& reply_to) {
  sessions_[s->key] = s;
  {
    std::lock_guard lock(counters_mu_);
    ++counters_.opened;
    counters_.open = static_cast<int>(sessions_.size());
  }
  SessionOpened answer;
  answer.set_window(session::kDefaultWindow);
  answer.set_heartbeat_ms(static_cast<uint32_t>(config_.heartbeat.count()));
  reply(reply_to, answer);
}

void SessionServer::on_open(const bus::Message& msg) {
  // cvm.v1.node.<node>.open.<user>: the last token is who asks, pinned by the server.
  const std::string user = msg.subject.substr(msg.subject.rfind('.') + 1);
  SessionOpen open;
  SessionOpened answer;
  auto refuse = [&](std::string why) { this->refuse(msg.reply, answer, std::move(why)); };
  if (!open.ParseFromString(msg.data)) return refuse("the request is not a cvm.v1.SessionOpen");
  if (!wire::is_valid_id(user)) return refuse("'" + user + "' is not a user name");
  if (!wire::is_valid_id(open.session_id())) {
    return refuse("'" + open.session_id() + "' is not a session id ([A-Za-z0-9_-], 1..128)");
  }
  if (!wire::is_valid_id(open.workspace_id())) {
    return refuse("'" + open.workspace_id() + "' is not a workspace id");
  }
  auto target = lookup_(open.workspace_id());
  if (!target) {
    answer.set_not_found(true);
    return refuse("workspace " + open.workspace_id() + " is not running on node " +
                  config_.node_id);
  }
  const auto access = session::may_enter(user, target->owner, config_.admins);
  if (!access.allowed) {
    answer.set_forbidden(true);
    spdlog::warn("sessions: {} may not enter workspace {}: {}", user, open.workspace_id(),
                 access.reason);
    return refuse(access.reason);
  }
  asio::post(lane_, [this, open = std::move(open), user, reply_to = msg.reply,
                     target = std::move(*target)]() mutable {
    open_on_lane(std::move(open), std::move(user), std::move(reply_to), std::move(target));
  });
}

namespace {

struct Spawned {
  pid_t pid = -1;
  detail::Fd pidfd, out, err, in;
};

// The size the agent asks for its session pipes.
constexpr size_t kPipeSize = 1 << 20;

// What more `fd` (non-blocking) has at once, read into `buf` up to `room` bytes: a read woken by
// the first bytes of a burst would otherwise send them alone and the rest a frame later. Stops
// once it is empty or `buf` full; an end of file or error is left for the next asynchronous read.
size_t top_up(int fd, char* buf, size_t room) {
  size_t got = 0;
  while (got < room) {
    const ssize_t n = ::read(fd, buf + got, room - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  return got;
}

Result<Spawned> spawn(const std::vector<std::string>& argv, bool tty, uint32_t rows,
                      uint32_t cols) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  posix_spawnattr_t attr;
  ::posix_spawnattr_init(&attr);
  sigset_t empty_mask;
  sigset_t default_signals;
  sigemptyset(&empty_mask);
  sigfillset(&default_signals);
  ::posix_spawnattr_setsigmask(&attr, &empty_mask);
  ::posix_spawnattr_setsigdefault(&attr, &default_signals);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;

  Spawned s;
  detail::Fd child_in, child_out, child_err;
  std::string slave_name;
  if (tty) {
    const int master = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) return sys_error("posix_openpt", errno);
    s.out = detail::Fd(master);
    char name[128];
    if (::grantpt(master) != 0 || ::unlockpt(master) != 0 ||
        ::ptsname_r(master, name, sizeof name) != 0) {
      return sys_error("pty", errno);
    }
    slave_name = name;
    // This pty only carries bytes to the outer runc, whose own terminal (and the inner one's below
    // it) does the line discipline the user sees: raw here, so that nothing is echoed, buffered
    // into lines or turned into signals twice, and each byte passes as soon as it comes.
    {
      detail::Fd slave(::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC));
      termios mode{};
      if (slave.get() < 0 || ::tcgetattr(slave.get(), &mode) != 0) return sys_error("pty", errno);
      ::cfmakeraw(&mode);
      if (::tcsetattr(slave.get(), TCSANOW, &mode) != 0) return sys_error("pty", errno);
    }
    winsize ws{};
    ws.ws_row = static_cast<unsigned short>(rows == 0 ? 24 : rows);
    ws.ws_col = static_cast<unsigned short>(cols == 0 ? 80 : cols);
    ::ioctl(master, TIOCSWINSZ, &ws);
    s.in = detail::Fd(::fcntl(master, F_DUPFD_CLOEXEC, 0));
    // A new session whose first terminal (opened without O_NOCTTY) becomes its controlling one:
    // the outer runc then gets SIGWINCH and SIGHUP from this pty.
    flags |= POSIX_SPAWN_SETSID;
    ::posix_spawn_file_actions_addopen(&actions, 0, slave_name.c_str(), O_RDWR, 0);
    ::posix_spawn_file_actions_adddup2(&actions, 0, 1);
    ::posix_spawn_file_actions_adddup2(&actions, 0, 2);
  } else {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return sys_error("pipe", errno);
    child_in = detail::Fd(p[0]);
    s.in = detail::Fd(p[1]);
    if (::pipe2(p, O_CLOEXEC) != 0) return sys_error("pipe", errno);
    s.out = detail::Fd(p[0]);
    child_out = detail::Fd(p[1]);
    if (::pipe2(p, O_CLOEXEC) != 0) return sys_error("pipe", errno);
    s.err = detail::Fd(p[0]);
    child_err = detail::Fd(p[1]);
    // A pipe holds 64 KiB by default: a stream then crosses the bus in frames of that size or
    // less, each with its own fixed cost. Room for a few whole frames lets each read take one.
    // Best effort: a node's pipe-max-size may be lower, and a smaller pipe only costs speed.
    for (int fd : {s.in.get(), s.out.get(), s.err.get()}) {
      (void)::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(kPipeSize));
    }
    ::posix_spawn_file_actions_adddup2(&actions, child_in.get(), 0);
    ::posix_spawn_file_actions_adddup2(&actions, child_out.get(), 1);
    ::posix_spawn_file_actions_adddup2(&actions, child_err.get(), 2);
  }
  ::posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  ::posix_spawnattr_setflags(&attr, flags);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (rc != 0) return sys_error("cannot start " + argv[0], rc);
  s.pid = pid;
  s.pidfd = detail::Fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (s.pidfd.get() < 0) {
    const int e = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return sys_error("pidfd_open", e);
  }
  return s;
}

}  // namespace

void SessionServer::open_on_lane(SessionOpen open, std::string user, std::string reply_to,
                                 SessionTarget target) {
  const std::string key = user + "." + open.session_id();
  auto refuse = [&](std::string why, bool failed) {
    this->refuse(reply_to, SessionOpened(), std::move(why), failed);
  };
  if (sessions_.contains(key)) return refuse("session " + open.session_id() + " is open", false);
  int in_workspace = 0;
  int by_user = 0;
  for (const auto& [k, s] : sessions_) {
    (void)k;
    in_workspace += s->workspace_id == open.workspace_id();
    by_user += s->user == user;
  }
  if (auto why = session::over_limit(in_workspace, by_user, config_.limits)) {
    return refuse(*why, false);
  }

  if (open.port() != 0) return open_port_on_lane(std::move(open), user, reply_to, target);

  auto who = resolve_session_user(open.user(), read_in_root(target.rootfs, "etc/passwd"),
                                  read_in_root(target.rootfs, "etc/group"), target.default_uid,
                                  target.default_gid);
  if (!who) return refuse(who.error().message, false);
  ExecPlan plan;
  plan.runc = config_.runc;
  plan.runc_root = config_.runc_root;
  plan.container_id = target.container_id;
  plan.inner_runtime = config_.inner_runtime;
  plan.inner_root = std::string(kSupervisorRuntimeRoot);
  plan.inner_id = std::string(kInnerContainerId);
  plan.tty = open.tty();
  plan.user = *who;
  plan.cwd = open.cwd();
  if (plan.cwd.empty() && !std::filesystem::is_directory(target.rootfs + plan.user.home)) {
    plan.cwd = "/";
  }
  if (open.tty()) plan.env.push_back("TERM=" + (open.term().empty() ? "xterm" : open.term()));
  plan.env.insert(plan.env.end(), open.env().begin(), open.env().end());
  plan.argv.assign(open.argv().begin(), open.argv().end());
  if (plan.argv.empty()) plan.argv = login_shell_argv(plan.user);

  auto spawned = spawn(exec_argv(plan), open.tty(), open.rows(), open.cols());
  if (!spawned) return refuse(spawned.error().message, true);

  auto s = new_session(open, user);
  s->tty = open.tty();
  s->pid = spawned->pid;
  // Asio owns the descriptors from here, and closes them.
  s->out.assign(spawned->out.release());
  s->in.assign(spawned->in.release());
  s->exit_watch.assign(spawned->pidfd.release());
  s->out.non_blocking(true);  // top_up() reads it directly
  if (!s->tty) {
    s->err.assign(spawned->err.release());
    s->err.non_blocking(true);
    s->err_eof = false;
  }
  spdlog::info("sessions: {} opened {} in workspace {} ({}{})", user, open.session_id(),
               open.workspace_id(), open.tty() ? "tty, " : "", plan.argv.front());
  admit(s, reply_to);

  read_output(s, false);
  read_output(s, true);
  s->exit_watch.async_wait(asio::posix::descriptor_base::wait_read,
                           [this, s](const boost::system::error_code& ec) {
                             if (ec) return;
                             on_exited(s);
                           });
}

void SessionServer::open_port_on_lane(SessionOpen open, const std::string& user,
                                      const std::string& reply_to, const SessionTarget& target) {
  auto refuse = [&](std::string why) { this->refuse(reply_to, SessionOpened(), std::move(why)); };
  if (open.port() > 65535) return refuse("port " + std::to_string(open.port()) + " is not a port");
  const int supervisor = container_init_pid(config_.runc_root, target.container_id);
  const int inner = supervisor > 0 ? find_inner_host_pid("/proc", supervisor) : 0;
  if (inner <= 0) return refuse("the workspace's init was not found");
  auto fd = connect_in_netns("/proc/" + std::to_string(inner) + "/ns/net",
                             static_cast<uint16_t>(open.port()));
  if (!fd) return refuse(fd.error().message);
  const int dup = ::fcntl(*fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) {
    ::close(*fd);
    return refuse("dup: " + std::string(std::strerror(errno)));
  }
  auto s = new_session(open, user);
  s->socket = true;
  s->out.assign(*fd);
  s->out.non_blocking(true);  // top_up() reads it directly
  s->in.assign(dup);
  spdlog::info("sessions: {} opened {} to port {} of workspace {}", user, open.session_id(),
               open.port(), open.workspace_id());
  admit(s, reply_to);
  read_output(s, false);
}

void SessionServer::send(const std::shared_ptr<Session>& s, SessionFrame frame) {
  auto numbered = s->fc.send(std::move(frame));
  if (!numbered) {
    spdlog::error("sessions: {}: {}", s->key, numbered.error().message);
    return;
  }
  s->live.sent(Steady::now());
  if (auto st = conn_->publish(s->out_subject, numbered->SerializeAsString()); !st.ok()) {
    spdlog::warn("sessions: {}: cannot send: {}", s->key, st.error().message);
  }
}

void SessionServer::read_output(const std::shared_ptr<Session>& s, bool errors) {
  bool& reading = errors ? s->err_reading : s->out_reading;
  bool& eof = errors ? s->err_eof : s->out_eof;
  if (reading || eof) return;
  // Once the client is gone, output is read and dropped: a process blocked on a full pipe would
  // never see its hangup.
  const uint64_t free =
      s->ended ? session::kMaxChunk : s->fc.can_send() - std::min(s->fc.can_send(), s->reserved);
  if (free == 0) return;  // the client's credit resumes it
  const size_t n = std::min<uint64_t>(free, session::kMaxChunk);
  const uint64_t reserve = s->ended ? 0 : n;
  s->reserved += reserve;
  reading = true;
  auto& desc = errors ? s->err : s->out;
  auto& buf = errors ? s->err_buf : s->out_buf;
  desc.async_read_some(
      asio::buffer(buf.data(), n),
      [this, s, errors, reserve, n](const boost::system::error_code& ec, size_t got) {
        bool& reading = errors ? s->err_reading : s->out_reading;
        bool& eof = errors ? s->err_eof : s->out_eof;
        reading = false;
        s->reserved -= reserve;
        // A pty master reads EIO once every holder of the slave is gone: that is
        // its end of file.
        if (ec || got == 0) {
          eof = true;
          boost::system::error_code ignored;
          (errors ? s->err : s->out).close(ignored);
          if (s->socket) {
            // The workspace's side closed the connection: nothing more comes.
            s->exited = true;
            s->drain_until = Steady::now();
          }
          maybe_finish(s);
          return;
        }
        if (s->ended) return read_output(s, errors);
        auto& buf = errors ? s->err_buf : s->out_buf;
        got += top_up((errors ? s->err : s->out).native_handle(), buf.data() + got, n - got);
        SessionFrame f;
        if (errors) {
          f.set_error_output(buf.data(), got);
        } else {
          f.set_output(buf.data(), got);
        }
        s->last_data = Steady::now();
        s->bytes_out += got;  // the session's own, on the lane
        {
          std::lock_guard lock(counters_mu_);
          counters_.bytes_out += got;
        }
        send(s, std::move(f));
        read_output(s, errors);
      });
}

void SessionServer::write_input(const std::shared_ptr<Session>& s) {
  if (s->writing || !s->in.is_open()) return;
  if (s->to_write.empty()) {
    if (s->input_eof) {
      if (s->tty) {
        // A terminal has no end of input to close: ^D is what a user would type.
        s->to_write.emplace_back("\x04");
        s->input_eof = false;
      } else {
        boost::system::error_code ignored;
        // A socket's other descriptor (out) keeps it open: only shutdown() sends the FIN.
        if (s->socket) ::shutdown(s->in.native_handle(), SHUT_WR);
        s->in.close(ignored);
        return;
      }
    } else {
      return;
    }
  }
  s->writing = true;
  asio::async_write(s->in, asio::buffer(s->to_write.front()),
                    [this, s](const boost::system::error_code& ec, size_t n) {
                      s->writing = false;
                      if (ec) {
                        // The process closed its stdin: what is still queued goes nowhere.
                        s->to_write.clear();
                        boost::system::error_code ignored;
                        s->in.close(ignored);
                        return;
                      }
                      s->to_write.pop_front();
                      if (auto credit = s->fc.consumed(n)) {
                        s->live.sent(Steady::now());
                        (void)conn_->publish(s->out_subject, credit->SerializeAsString());
                      }
                      write_input(s);
                    });
}

void SessionServer::on_frame(const bus::Message& msg) {
  // cvm.v1.node.<node>.session.<user>.<session>.in
  const auto tokens = split(msg.subject, '.');
  if (tokens.size() != 8) return;
  const std::string key = std::string(tokens[5]) + "." + std::string(tokens[6]);
  SessionFrame f;
  const bool parsed = f.ParseFromString(msg.data);
  auto it = sessions_.find(key);
  if (it == sessions_.end()) {
    // A client of a session this agent does not have (it ended, or the agent restarted): tell it,
    // unnumbered, so it stops at once instead of waiting for missed heartbeats.
    if (parsed && f.body_case() == SessionFrame::kHangup) return;
    SessionFrame gone;
    gone.set_error("node " + config_.node_id + " has no session " + std::string(tokens[6]) +
                   " (it ended, or the node's agent restarted)");
    (void)conn_->publish(wire::session_out_subject(config_.node_id, tokens[5], tokens[6]),
                         gone.SerializeAsString());
    return;
  }
  auto s = it->second;
  s->live.heard(Steady::now());
  if (!parsed) return end_session(s, "a frame is not a cvm.v1.SessionFrame", true);
  if (auto st = s->fc.receive(f); !st.ok()) return end_session(s, st.error().message, true);
  switch (f.body_case()) {
    case SessionFrame::kInput:
      if (f.input().empty() || !s->in.is_open()) break;
      s->last_data = Steady::now();
      s->bytes_in += f.input().size();  // the session's own, on the lane
      {
        std::lock_guard lock(counters_mu_);
        counters_.bytes_in += f.input().size();
      }
      s->to_write.push_back(std::move(*f.mutable_input()));
      write_input(s);
      break;
    case SessionFrame::kCredit:
      read_output(s, false);
      read_output(s, true);
      break;
    case SessionFrame::kResize:
      if (s->tty && s->out.is_open()) {
        winsize ws{};
        ws.ws_row = static_cast<unsigned short>(f.resize().rows());
        ws.ws_col = static_cast<unsigned short>(f.resize().cols());
        // The kernel sends SIGWINCH to the outer runc, whose terminal this is; each runc passes
        // the size on to its own pty.
        ::ioctl(s->out.native_handle(), TIOCSWINSZ, &ws);
      }
      break;
    case SessionFrame::kSignal:
      if (forwardable(f.signal()) && s->pid > 0 && !s->exited) ::kill(s->pid, f.signal());
      break;
    case SessionFrame::kStdinEof:
      s->input_eof = true;
      write_input(s);
      break;
    case SessionFrame::kHangup:
      hang_up(s);
      break;
    case SessionFrame::kError:
      spdlog::info("sessions: {}: the client ended it: {}", s->key, f.error());
      hang_up(s);
      break;
    default:
      break;
  }
}

void SessionServer::hang_up(const std::shared_ptr<Session>& s) {
  s->ended = true;  // nobody to tell
  if (s->socket) {
    boost::system::error_code ignored;
    s->in.close(ignored);
    s->out.close(ignored);  // the pending read ends, and with it the session
    return;
  }
  if (s->exited || s->kill_at) return;
  ::kill(s->pid, SIGHUP);
  boost::system::error_code ignored;
  s->in.close(ignored);
  s->kill_at = Steady::now() + config_.hangup_grace;
}

void SessionServer::end_session(const std::shared_ptr<Session>& s, const std::string& why,
                                bool failed) {
  if (!s->ended) {
    SessionFrame f;
    f.set_error(why);
    send(s, std::move(f));
    s->ended = true;
  }
  if (failed) {
    std::lock_guard lock(counters_mu_);
    ++counters_.failed;
  }
  spdlog::info("sessions: {} ends: {}", s->key, why);
  hang_up(s);
}

void SessionServer::on_exited(const std::shared_ptr<Session>& s) {
  int status = 0;
  if (::waitpid(s->pid, &status, WNOHANG) != s->pid) return;
  s->pid = -1;
  s->exited = true;
  if (WIFEXITED(status)) {
    s->exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    s->exit_signal = WTERMSIG(status);
    s->exit_code = 128 + s->exit_signal;
  }
  boost::system::error_code ignored;
  s->exit_watch.close(ignored);
  // A process's children may hold its output open: wait a little for the end of it, not forever.
  s->drain_until = Steady::now() + std::chrono::seconds{2};
  maybe_finish(s);
}

void SessionServer::maybe_finish(const std::shared_ptr<Session>& s) {
  if (!s->exited) return;
  const bool drained = s->out_eof && s->err_eof;
  // Output still owed waits for the client's credit however long that takes (a client that is
  // gone is hung up by the heartbeat check instead); the deadline is only for a pipe that some
  // child of the process keeps open while nothing more comes.
  if (!drained && (Steady::now() < *s->drain_until || (!s->ended && s->fc.can_send() == 0))) {
    return;
  }
  if (!s->ended) {
    SessionFrame f;
    f.mutable_exit()->set_code(s->exit_code);
    f.mutable_exit()->set_signal(s->exit_signal);
    send(s, std::move(f));
    s->ended = true;
  }
  boost::system::error_code ignored;
  s->out.close(ignored);
  s->err.close(ignored);
  s->in.close(ignored);
  spdlog::info("sessions: {} closed (exit {}): {} bytes out in {} frames, {} bytes in in {} frames",
               s->key, s->exit_code, s->bytes_out, s->fc.sent_frames(), s->bytes_in,
               s->fc.received_frames());
  sessions_.erase(s->key);
  std::lock_guard lock(counters_mu_);
  counters_.open = static_cast<int>(sessions_.size());
}

void SessionServer::tick() {
  const auto now = Steady::now();
  if (!leftovers_.empty() && now >= leftover_kill_at_) {
    // Only what is still a runc exec of this root: a pid that ended may have been reused.
    const auto still = leftover_session_processes("/proc", config_.runc_root);
    const auto tree = read_process_tree("/proc");
    for (int pid : leftovers_) {
      if (std::find(still.begin(), still.end(), pid) == still.end()) continue;
      spdlog::info(
          "sessions: runc exec {} of an agent before this one outlived its hangup; killing it",
          pid);
      kill_tree(pid, tree);
    }
    leftovers_.clear();
  }
  std::vector<std::shared_ptr<Session>> all;
  for (const auto& [k, s] : sessions_) {
    (void)k;
    all.push_back(s);
  }
  for (const auto& s : all) {
    if (s->exited) {
      maybe_finish(s);
      continue;
    }
    if (s->kill_at && now >= *s->kill_at && s->pid > 0) {
      spdlog::info("sessions: {}: still running {} s after the hangup; killing it", s->key,
                   std::chrono::duration_cast<std::chrono::seconds>(config_.hangup_grace).count());
      kill_tree(s->pid, read_process_tree("/proc"));
      s->kill_at.reset();
      continue;
    }
    if (s->ended) continue;
    if (s->live.gone(now)) {
      spdlog::info("sessions: {}: the client went silent; hanging up", s->key);
      hang_up(s);
    } else if (config_.limits.idle.count() > 0 && now - s->last_data >= config_.limits.idle) {
      end_session(s,
                  "idle for " + std::to_string(config_.limits.idle.count()) + " s: session ended",
                  false);
    } else if (s->live.heartbeat_due(now)) {
      SessionFrame f;
      f.set_heartbeat(true);
      send(s, std::move(f));
    }
  }
  timer_->expires_after(std::min(config_.heartbeat, std::chrono::milliseconds{500}));
  timer_->async_wait([this](const boost::system::error_code& ec) {
    if (!ec) tick();
  });
}

void SessionServer::end_workspace(const std::string& workspace_id, const std::string& why) {
  asio::post(lane_, [this, workspace_id, why] {
    std::vector<std::shared_ptr<Session>> hit;
    for (const auto& [k, s] : sessions_) {
      (void)k;
      if (s->workspace_id == workspace_id) hit.push_back(s);
    }
    for (const auto& s : hit) end_session(s, why, false);
  });
}

void SessionServer::end_all(const std::string& why) {
  std::vector<std::shared_ptr<Session>> all;
  for (const auto& [k, s] : sessions_) {
    (void)k;
    all.push_back(s);
  }
  for (const auto& s : all) end_session(s, why, false);
}

}  // namespace cvm::agent
