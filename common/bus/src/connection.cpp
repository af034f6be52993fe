// Core NATS: connecting, callbacks hopping onto the executor, publish, request, subscribe.

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <utility>

#include "internal.h"

// Workaround for a cnats 3.4.1 bug (docs/reliability.md, "Slow-consumer cut"). When an ordered
// consumer (every kvStore_Watch is one) detects a gap or missed heartbeats, cnats spawns a thread
// running _recreateOrderedCons; if re-subscribing fails there (the connection is broken: a
// slow-consumer cut, a server restart) that thread reaches natsThread_Detach(NULL) +
// natsThread_Destroy(NULL), because it only reads its own natsThread handle on the success path.
// natsThread_Detach dereferences its argument: SIGSEGV. cnats calls it through the PLT, so this
// definition (exported from the executable, see CMakeLists.txt) takes precedence over libnats' own.
// A NULL handle is only ever passed by that thread about itself, and nobody will join it (its
// handle is lost with the freed closure), so detaching the calling thread is what the call meant.
extern "C" void natsThread_Detach(void* thread) {
  if (thread == nullptr) {
    static_cast<void>(pthread_detach(pthread_self()));
    return;
  }
  using DetachFn = void (*)(void*);
  static const auto real = reinterpret_cast<DetachFn>(dlsym(RTLD_NEXT, "natsThread_Detach"));
  if (real != nullptr) real(thread);
}

namespace cvm::bus {
namespace detail {
namespace {

// cnats runs these on its own callback thread; user code must only ever run on the executor.
void on_connected_cb(natsConnection* /*nc*/, void* closure) {
  auto* cb = static_cast<ConnCallbacks*>(closure);
  cb->post(cb->on_connected);
}

void on_disconnected_cb(natsConnection* /*nc*/, void* closure) {
  auto* cb = static_cast<ConnCallbacks*>(closure);
  cb->post(cb->on_disconnected);
}

void on_reconnected_cb(natsConnection* /*nc*/, void* closure) {
  auto* cb = static_cast<ConnCallbacks*>(closure);
  cb->post(cb->on_reconnected);
}

void on_closed_cb(natsConnection* /*nc*/, void* closure) {
  auto* cb = static_cast<ConnCallbacks*>(closure);
  cb->post(cb->on_closed);
  // Notify while holding the lock: once it is released the waiter may free `cb`, and this
  // function touches nothing of it afterwards.
  std::lock_guard lock(cb->mu);
  cb->closed = true;
  cb->cv.notify_all();
}

void on_error_cb(natsConnection* /*nc*/, natsSubscription* /*sub*/, natsStatus err, void* closure) {
  auto* cb = static_cast<ConnCallbacks*>(closure);
  cb->post_error(nats_error(err, "asynchronous NATS error"));
}

std::vector<std::string> split_urls(const std::string& urls) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= urls.size()) {
    size_t end = urls.find(',', start);
    if (end == std::string::npos) end = urls.size();
    std::string url = urls.substr(start, end - start);
    const auto first = url.find_first_not_of(" \t");
    const auto last = url.find_last_not_of(" \t");
    if (first != std::string::npos) out.push_back(url.substr(first, last - first + 1));
    start = end + 1;
  }
  return out;
}

// The closure of one core subscription. cnats holds one shared_ptr (freed by the
// on-complete callback, after which cnats never calls us again); the Subscription holds another.
struct SubState {
  Executor executor;
  std::function<void(Message)> handler;
  std::atomic<bool> active{true};
};

void on_sub_msg(natsConnection* /*nc*/, natsSubscription* /*sub*/, natsMsg* msg, void* closure) {
  const auto& state = *static_cast<std::shared_ptr<SubState>*>(closure);
  MsgHandle owned(msg);
  boost::asio::post(state->executor, [state, m = copy_message(msg)]() mutable {
    // A handler posted just before unsubscribe() must not run after it.
    if (state->active.load()) state->handler(std::move(m));
  });
}

void on_sub_complete(void* closure) { delete static_cast<std::shared_ptr<SubState>*>(closure); }

}  // namespace

Message copy_message(natsMsg* msg) {
  Message out;
  if (const char* subject = natsMsg_GetSubject(msg); subject != nullptr) out.subject = subject;
  if (const char* reply = natsMsg_GetReply(msg); reply != nullptr) out.reply = reply;
  if (const char* data = natsMsg_GetData(msg); data != nullptr) {
    out.data.assign(data, static_cast<size_t>(natsMsg_GetDataLength(msg)));
  }
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
    for (int i = 0; i < count; ++i) {
      const char* value = nullptr;
      if (natsMsgHeader_Get(msg, keys[i], &value) == NATS_OK) {
        out.headers[keys[i]] = value != nullptr ? value : "";
      }
    }
    // The array is ours to free; the strings belong to the message.
    std::free(static_cast<void*>(keys));
  }
  return out;
}

Result<MsgHandle> make_msg(const std::string& subject, std::string_view data,
                           const Headers& headers) {
  natsMsg* raw = nullptr;
  natsStatus s =
      natsMsg_Create(&raw, subject.c_str(), nullptr, data.data(), static_cast<int>(data.size()));
  if (s != NATS_OK) return nats_error(s, "create message for " + subject);
  MsgHandle msg(raw);
  for (const auto& [key, value] : headers) {
    s = natsMsgHeader_Set(msg.get(), key.c_str(), value.c_str());
    if (s != NATS_OK) return nats_error(s, "set header " + key);
  }
  return msg;
}

SubHandle::~SubHandle() {
  if (sub == nullptr) return;
  // Fails harmlessly when the connection is already closed; Destroy is still required.
  natsSubscription_Unsubscribe(sub);
  natsSubscription_Destroy(sub);
}

Core::Core(Executor ex, std::unique_ptr<ConnCallbacks> cbs)
    : executor(std::move(ex)), callbacks(std::move(cbs)) {}

void Core::close() {
  {
    std::lock_guard lock(close_mu_);
    if (close_called_) return;
    close_called_ = true;
  }
  if (nc == nullptr) return;
  natsConnection_Close(nc);
  std::unique_lock lock(callbacks->mu);
  callbacks->cv.wait_for(lock, std::chrono::seconds{5}, [&] { return callbacks->closed; });
}

Core::~Core() {
  close();
  if (js != nullptr) jsCtx_Destroy(js);
  if (nc == nullptr) {  // cnats never saw the closure
    destroy_async_ops(*this);
    return;
  }
  natsConnection_Destroy(nc);
  destroy_async_ops(*this);
  bool closed = false;
  {
    std::lock_guard lock(callbacks->mu);
    closed = callbacks->closed;
  }
  // Without the closed callback we cannot know that cnats is done with the closure: leaking a
  // few bytes beats a use-after-free on its callback thread.
  if (!closed) static_cast<void>(callbacks.release());
}

void report_error(const Core& core, const Error& error) { core.callbacks->post_error(error); }

std::string unique_inbox(const std::string& inbox_prefix, const char* fallback) {
  std::string token = fallback;
  natsInbox* made = nullptr;
  if (natsInbox_Create(&made) == NATS_OK) {
    const std::string_view text(made);
    token = std::string(text.substr(text.rfind('.') + 1));
    natsInbox_Destroy(made);
  }
  return (inbox_prefix.empty() ? std::string("_INBOX") : inbox_prefix) + "." + token + ".";
}

}  // namespace detail

using detail::Core;

// ---- Subscription ----

struct Subscription::Impl {
  std::shared_ptr<Core> core;
  std::shared_ptr<detail::SubState> state;
  std::unique_ptr<detail::SubHandle> sub;

  ~Impl() {
    state->active.store(false);
    sub.reset();
  }
};

Subscription::Subscription() = default;
Subscription::Subscription(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Subscription::~Subscription() = default;
Subscription::Subscription(Subscription&&) noexcept = default;
Subscription& Subscription::operator=(Subscription&&) noexcept = default;
void Subscription::unsubscribe() { impl_.reset(); }

// ---- Connection ----

Connection::Connection(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Connection::~Connection() {
  if (impl_) impl_->core->close();
}

Result<std::shared_ptr<Connection>> Connection::connect(const ConnectOptions& options,
                                                        Executor executor) {
  auto callbacks = std::make_unique<detail::ConnCallbacks>();
  callbacks->executor = executor;
  callbacks->on_connected = options.on_connected;
  callbacks->on_disconnected = options.on_disconnected;
  callbacks->on_reconnected = options.on_reconnected;
  callbacks->on_closed = options.on_closed;
  callbacks->on_error = options.on_error;
  void* closure = callbacks.get();

  natsOptions* raw = nullptr;
  natsStatus s = natsOptions_Create(&raw);
  if (s != NATS_OK) return nats_error(s, "create NATS options");
  detail::OptionsHandle opts(raw);

  const auto urls = detail::split_urls(options.url);
  std::vector<const char*> servers;
  for (const auto& url : urls) servers.push_back(url.c_str());
  if (servers.empty()) return make_error(ErrorDomain::kInvalid, "no NATS URL given");

  s = natsOptions_SetServers(opts.get(), servers.data(), static_cast<int>(servers.size()));
  if (s == NATS_OK && !options.name.empty())
    s = natsOptions_SetName(opts.get(), options.name.c_str());
  if (s == NATS_OK && !options.user.empty()) {
    s = natsOptions_SetUserInfo(opts.get(), options.user.c_str(), options.password.c_str());
  }
  // A per-user inbox prefix lets the server's permissions confine each user's replies to its own
  // inboxes (deploy/nats): with the shared "_INBOX." one, any user could read any other's.
  if (const auto prefix =
          options.inbox_prefix.empty() ? inbox_prefix_for(options.user) : options.inbox_prefix;
      s == NATS_OK && !prefix.empty()) {
    s = natsOptions_SetCustomInboxPrefix(opts.get(), prefix.c_str());
  }
  if (s == NATS_OK) s = natsOptions_SetTimeout(opts.get(), options.connect_timeout.count());
  if (s == NATS_OK) s = natsOptions_SetAllowReconnect(opts.get(), true);
  if (s == NATS_OK) s = natsOptions_SetMaxReconnect(opts.get(), options.max_reconnect);
  if (s == NATS_OK) s = natsOptions_SetReconnectWait(opts.get(), options.reconnect_wait.count());
  // Publishes made while reconnecting are buffered up to this size instead of failing at once.
  if (s == NATS_OK) s = natsOptions_SetReconnectBufSize(opts.get(), 8 * 1024 * 1024);
  // A burst (a restart replaying a stream) must not turn into slow-consumer drops.
  if (s == NATS_OK) s = natsOptions_SetMaxPendingMsgs(opts.get(), 1 << 20);
  // cnats' flusher otherwise waits up to 1 ms to batch writes; every control-plane step is a
  // small request or a JetStream publish awaiting its ack, so that wait is pure latency (measured:
  // request-reply p50 ~990 us batched vs ~190 us with SendAsap on loopback).
  if (s == NATS_OK && options.send_asap) s = natsOptions_SetSendAsap(opts.get(), true);
  if (s == NATS_OK && options.shared_delivery_threads) {
    s = natsOptions_UseGlobalMessageDelivery(opts.get(), true);
  }
  if (s == NATS_OK)
    s = natsOptions_SetDisconnectedCB(opts.get(), detail::on_disconnected_cb, closure);
  if (s == NATS_OK)
    s = natsOptions_SetReconnectedCB(opts.get(), detail::on_reconnected_cb, closure);
  if (s == NATS_OK) s = natsOptions_SetClosedCB(opts.get(), detail::on_closed_cb, closure);
  if (s == NATS_OK) s = natsOptions_SetErrorHandler(opts.get(), detail::on_error_cb, closure);
  if (s == NATS_OK && options.retry_on_failed_connect) {
    s = natsOptions_SetRetryOnFailedConnect(opts.get(), true, detail::on_connected_cb, closure);
  }
  if (s != NATS_OK) return nats_error(s, "set NATS options");

  auto core = std::make_shared<Core>(std::move(executor), std::move(callbacks));
  natsConnection* nc = nullptr;
  s = natsConnection_Connect(&nc, opts.get());
  // With retry on failed connect, cnats keeps connecting in the background: not an error.
  if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
    return nats_error(s, "connect to " + options.url);
  }
  core->nc = nc;
  core->inbox_prefix =
      options.inbox_prefix.empty() ? inbox_prefix_for(options.user) : options.inbox_prefix;
  s = natsConnection_JetStream(&core->js, core->nc, nullptr);
  if (s != NATS_OK) return nats_error(s, "create JetStream context");

  auto impl = std::make_unique<Impl>();
  impl->core = std::move(core);
  return std::make_shared<Connection>(std::move(impl));
}

bool Connection::connected() const {
  return natsConnection_Status(impl_->core->nc) == NATS_CONN_STATUS_CONNECTED;
}

const Executor& Connection::executor() const { return impl_->core->executor; }

Status Connection::publish(const std::string& subject, std::string_view data,
                           const Headers& headers) {
  natsStatus s = NATS_OK;
  if (headers.empty()) {
    s = natsConnection_Publish(impl_->core->nc, subject.c_str(), data.data(),
                               static_cast<int>(data.size()));
  } else {
    auto msg = detail::make_msg(subject, data, headers);
    if (!msg) return msg.error();
    s = natsConnection_PublishMsg(impl_->core->nc, msg->get());
  }
  if (s != NATS_OK) return nats_error(s, "publish to " + subject);
  return {};
}

Status Connection::flush(std::chrono::milliseconds timeout) {
  const natsStatus s = natsConnection_FlushTimeout(impl_->core->nc, timeout.count());
  if (s != NATS_OK) return nats_error(s, "flush");
  return {};
}

Result<Message> Connection::request(const std::string& subject, std::string_view data,
                                    std::chrono::milliseconds timeout) {
  natsMsg* reply = nullptr;
  const natsStatus s = natsConnection_Request(&reply, impl_->core->nc, subject.c_str(), data.data(),
                                              static_cast<int>(data.size()), timeout.count());
  if (s != NATS_OK) return nats_error(s, "request to " + subject);
  detail::MsgHandle owned(reply);
  return detail::copy_message(reply);
}

Result<Subscription> Connection::subscribe(const std::string& subject, const std::string& queue,
                                           std::function<void(Message)> handler) {
  auto state = std::make_shared<detail::SubState>();
  state->executor = impl_->core->executor;
  state->handler = std::move(handler);
  auto* closure = new std::shared_ptr<detail::SubState>(state);

  natsSubscription* raw = nullptr;
  natsStatus s = queue.empty()
                     ? natsConnection_Subscribe(&raw, impl_->core->nc, subject.c_str(),
                                                detail::on_sub_msg, closure)
                     : natsConnection_QueueSubscribe(&raw, impl_->core->nc, subject.c_str(),
                                                     queue.c_str(), detail::on_sub_msg, closure);
  if (s != NATS_OK) {
    delete closure;  // no subscription, so cnats never calls back
    return nats_error(s, "subscribe to " + subject);
  }
  auto sub = std::make_unique<detail::SubHandle>(raw);
  s = natsSubscription_SetOnCompleteCB(raw, detail::on_sub_complete, closure);
  if (s != NATS_OK) {
    // The subscription closed underneath us (connection closed): cnats may still be delivering,
    // so the closure is leaked rather than freed under its feet.
    return nats_error(s, "subscribe to " + subject);
  }
  auto impl = std::make_unique<Subscription::Impl>();
  impl->core = impl_->core;
  impl->state = std::move(state);
  impl->sub = std::move(sub);
  return Subscription(std::move(impl));
}

}  // namespace cvm::bus
