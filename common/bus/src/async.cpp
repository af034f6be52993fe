// Asynchronous JetStream publishes (KV compare-and-set included), request-reply and message gets:
// the round trip overlaps with other work instead of blocking the service's only thread. Results
// are posted to the connection's executor, like every other callback of the adapter.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "internal.h"

namespace cvm::bus {
namespace detail {

namespace {

// "no message found" from the message-get API (cnats has no name for it).
constexpr int kNoMessageFound = 10037;

// Typed field reads of a JetStream API reply. json::value() throws when a field has another
// type; a reply we cannot read must become an error of the call, never an exception.
int64_t json_int(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}
std::string json_string(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// One request_async waiting for its reply. Its timer lives on the executor.
struct PendingRequest {
  explicit PendingRequest(const Executor& ex) : timer(ex) {}
  // On the executor only: the reply, the timeout or the send failure, whichever comes first.
  void finish(Result<Message> result) {
    if (finished) return;
    finished = true;
    timer.cancel();
    done(std::move(result));
  }
  ReplyHandler done;
  boost::asio::steady_timer timer;
  bool finished = false;
};

}  // namespace

struct AsyncOps {
  uint64_t id = 0;  // its key in live_ops()
  Executor executor;
  natsConnection* nc = nullptr;
  std::mutex mu;
  // js_PublishMsgAsync's ack handler is per context: a context of our own routes each ack to its
  // publish by the message pointer, which cnats hands back.
  jsCtx* js = nullptr;
  Status js_status;
  std::unordered_map<natsMsg*, PubAckHandler> pubs;
  // One wildcard inbox for every request_async of the connection, demultiplexed by the last token.
  natsSubscription* inbox = nullptr;
  Status inbox_status;
  std::string inbox_base;  // "<prefix>.<nuid>."
  uint64_t next_request = 0;
  std::unordered_map<uint64_t, std::shared_ptr<PendingRequest>> requests;
  bool closed = false;  // destroy_async_ops ran: nothing answers the requests left

  template <class Fn, class R>
  void post(Fn done, R result) {
    boost::asio::post(executor, [done = std::move(done), result = std::move(result)]() mutable {
      done(std::move(result));
    });
  }
};

namespace {

// cnats calls on_pub_ack and on_reply on its own threads, and one call may still be running (or
// about to start, its message already dequeued) when the connection is closed and destroyed:
// natsConnection_Close does not wait for a subscription's callback in flight, and neither does
// jsCtx_Destroy for the context's reply subscription (the "double free" once seen at the end of
// a 3-replica fleet-sim run fits a callback that used AsyncOps after ~Core deleted it). So the
// closure handed to cnats is a key, not a pointer: a callback looks its AsyncOps up here and holds
// it while it runs; destroy_async_ops takes the key out first, and a late callback finds nothing
// and only frees its message.
std::mutex& live_ops_mu() {
  static std::mutex mu;
  return mu;
}
std::unordered_map<uint64_t, std::weak_ptr<AsyncOps>>& live_ops() {
  static std::unordered_map<uint64_t, std::weak_ptr<AsyncOps>> ops;
  return ops;
}
void* ops_key(uint64_t id) { return reinterpret_cast<void*>(static_cast<uintptr_t>(id)); }
std::shared_ptr<AsyncOps> find_ops(void* closure) {
  std::lock_guard lock(live_ops_mu());
  const auto it = live_ops().find(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(closure)));
  return it == live_ops().end() ? nullptr : it->second.lock();
}

void on_pub_ack(jsCtx* /*js*/, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
  const auto ops = find_ops(closure);
  if (!ops) {
    natsMsg_Destroy(msg);  // the connection is gone; the handler owns the message
    return;
  }
  PubAckHandler done;
  {
    std::lock_guard lock(ops->mu);
    if (auto it = ops->pubs.find(msg); it != ops->pubs.end()) {
      done = std::move(it->second);
      ops->pubs.erase(it);
    }
  }
  if (done) {
    if (pa != nullptr) {
      ops->post(std::move(done), Result<PubAck>(PubAck{pa->Stream != nullptr ? pa->Stream : "",
                                                       pa->Sequence, pa->Duplicate}));
    } else {
      const char* subject = natsMsg_GetSubject(msg);
      Error e = nats_error(
          pae != nullptr ? pae->Err : NATS_ERR,
          std::string("publish to stream subject ") + (subject != nullptr ? subject : ""),
          pae != nullptr ? pae->ErrCode : 0);
      if (pae != nullptr && pae->ErrText != nullptr) e.message += std::string(": ") + pae->ErrText;
      ops->post(std::move(done), Result<PubAck>(std::move(e)));
    }
  }
  natsMsg_Destroy(msg);  // the handler owns it (cnats' contract for jsPubAckHandler)
}

void on_reply(natsConnection* /*nc*/, natsSubscription* /*sub*/, natsMsg* msg, void* closure) {
  MsgHandle owned(msg);
  const auto ops = find_ops(closure);
  if (!ops) return;  // the connection is gone
  const std::string_view subject(natsMsg_GetSubject(msg));
  const auto dot = subject.rfind('.');
  uint64_t id = 0;
  for (char c : subject.substr(dot == std::string_view::npos ? 0 : dot + 1)) {
    if (c < '0' || c > '9') return;
    id = id * 10 + static_cast<uint64_t>(c - '0');
  }
  std::shared_ptr<PendingRequest> pending;
  {
    std::lock_guard lock(ops->mu);
    auto it = ops->requests.find(id);
    if (it == ops->requests.end()) return;  // timed out already
    pending = std::move(it->second);
    ops->requests.erase(it);
  }
  Result<Message> result = natsMsg_IsNoResponders(msg)
                               ? Result<Message>(nats_error(NATS_NO_RESPONDERS, "request"))
                               : Result<Message>(copy_message(msg));
  boost::asio::post(ops->executor, [pending, result = std::move(result)]() mutable {
    pending->finish(std::move(result));
  });
}

}  // namespace

// Minimal base64 (RFC 4648, padding optional) for the message-get API's "data" and "hdrs".
std::string base64_decode(std::string_view in) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  out.reserve(in.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    const int v = value(c);
    if (v < 0) continue;  // padding, whitespace
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

// "NATS/1.0\r\nKey: Value\r\n...\r\n\r\n"
Headers parse_headers(std::string_view block) {
  Headers out;
  size_t pos = block.find("\r\n");
  while (pos != std::string_view::npos) {
    pos += 2;
    const size_t end = block.find("\r\n", pos);
    const std::string_view line =
        block.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
    if (line.empty()) break;
    if (const auto colon = line.find(':'); colon != std::string_view::npos) {
      std::string_view v = line.substr(colon + 1);
      while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
      out[std::string(line.substr(0, colon))] = std::string(v);
    }
    pos = end;
  }
  return out;
}

void destroy_async_ops(Core& core) {
  std::shared_ptr<AsyncOps> ops;
  {
    std::lock_guard lock(core.async_mu_);
    ops = std::exchange(core.async_, nullptr);
  }
  if (ops == nullptr) return;
  {
    std::lock_guard lock(live_ops_mu());
    live_ops().erase(ops->id);
  }
  if (ops->inbox != nullptr) natsSubscription_Destroy(ops->inbox);
  if (ops->js != nullptr) jsCtx_Destroy(ops->js);
  // What waits for an answer is dropped here, on the destroying thread, not on a cnats thread by a
  // late callback (a request's timer belongs to the executor, which may be gone by then).
  std::unordered_map<natsMsg*, PubAckHandler> pubs;
  std::unordered_map<uint64_t, std::shared_ptr<PendingRequest>> requests;
  {
    std::lock_guard lock(ops->mu);
    ops->closed = true;
    pubs.swap(ops->pubs);
    requests.swap(ops->requests);
  }
  // ops is freed here, or by the last callback still holding it.
}

std::shared_ptr<AsyncOps> Core::async_ops() {
  std::lock_guard lock(async_mu_);
  if (async_ != nullptr) return async_;
  auto ops = std::make_shared<AsyncOps>();
  {
    static uint64_t next_id = 0;
    std::lock_guard live(live_ops_mu());
    ops->id = ++next_id;
    live_ops().emplace(ops->id, ops);
  }
  void* const key = ops_key(ops->id);
  ops->executor = executor;
  ops->nc = nc;
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.PublishAsync.AckHandler = on_pub_ack;
  jo.PublishAsync.AckHandlerClosure = key;
  jo.PublishAsync.MaxPending = 8192;
  natsStatus s = natsConnection_JetStream(&ops->js, nc, &jo);
  if (s != NATS_OK) ops->js_status = nats_error(s, "create asynchronous JetStream context");

  ops->inbox_base = detail::unique_inbox(inbox_prefix, "async");
  s = natsConnection_Subscribe(&ops->inbox, nc, (ops->inbox_base + "*").c_str(), on_reply, key);
  if (s != NATS_OK) ops->inbox_status = nats_error(s, "subscribe to the reply inbox");
  async_ = ops;
  return ops;
}

}  // namespace detail

// ---- Connection ----

namespace detail {
namespace {

void publish_async(Core& core, const std::string& subject, std::string_view data,
                   const AsyncPublish& options, PubAckHandler done) {
  const auto ops_ptr = core.async_ops();
  auto& ops = *ops_ptr;
  if (!ops.js_status.ok()) return ops.post(std::move(done), Result<PubAck>(ops.js_status.error()));
  auto msg = make_msg(subject, data, options.headers);
  if (!msg) return ops.post(std::move(done), Result<PubAck>(msg.error()));
  if (options.expected_last_subject_sequence) {
    // Set by hand: cnats' ExpectLastSubjectSeq option leaves 0 out ("not set").
    const std::string seq = std::to_string(*options.expected_last_subject_sequence);
    const natsStatus s =
        natsMsgHeader_Set(msg->get(), "Nats-Expected-Last-Subject-Sequence", seq.c_str());
    if (s != NATS_OK) {
      return ops.post(std::move(done), Result<PubAck>(nats_error(s, "set expected sequence")));
    }
  }
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = options.timeout.count();
  if (!options.msg_id.empty()) po.MsgId = options.msg_id.c_str();

  natsMsg* raw = msg->release();
  natsMsg* const key = raw;
  {
    // Registered first: the ack may come back before js_PublishMsgAsync returns.
    std::lock_guard lock(ops.mu);
    ops.pubs[key] = std::move(done);
  }
  const natsStatus s = js_PublishMsgAsync(ops.js, &raw, &po);
  if (s == NATS_OK) return;
  PubAckHandler failed;
  {
    std::lock_guard lock(ops.mu);
    if (auto it = ops.pubs.find(key); it != ops.pubs.end()) {
      failed = std::move(it->second);
      ops.pubs.erase(it);
    }
  }
  natsMsg_Destroy(raw);  // no-op when cnats kept it
  if (failed) {
    ops.post(std::move(failed),
             Result<PubAck>(nats_error(s, "publish to stream subject " + subject)));
  }
}

}  // namespace
}  // namespace detail

void Connection::js_publish_async(const std::string& subject, std::string_view data,
                                  const AsyncPublish& options, PubAckHandler done) {
  detail::publish_async(*impl_->core, subject, data, options, std::move(done));
}

void Connection::request_async(const std::string& subject, std::string_view data,
                               std::chrono::milliseconds timeout, ReplyHandler done) {
  const auto ops_ptr = impl_->core->async_ops();
  auto& ops = *ops_ptr;
  if (!ops.inbox_status.ok()) {
    return ops.post(std::move(done), Result<Message>(ops.inbox_status.error()));
  }
  auto pending = std::make_shared<detail::PendingRequest>(ops.executor);
  pending->done = std::move(done);
  uint64_t id = 0;
  {
    std::lock_guard lock(ops.mu);
    id = ++ops.next_request;
    ops.requests[id] = pending;
  }
  pending->timer.expires_after(timeout);
  // Weak: a timer can fire after the connection (and its AsyncOps) went away.
  pending->timer.async_wait([weak = std::weak_ptr<detail::AsyncOps>(ops_ptr), id,
                             pending](const boost::system::error_code& ec) {
    if (ec) return;  // the reply came first
    if (const auto live = weak.lock()) {
      std::lock_guard lock(live->mu);
      // Not there: the reply is on its way, unless the connection went away.
      if (live->requests.erase(id) == 0 && !live->closed) return;
    }
    pending->finish(Result<Message>(nats_error(NATS_TIMEOUT, "request")));
  });
  const std::string reply = ops.inbox_base + std::to_string(id);
  const natsStatus s = natsConnection_PublishRequest(
      impl_->core->nc, subject.c_str(), reply.c_str(), data.data(), static_cast<int>(data.size()));
  if (s == NATS_OK) return;
  {
    std::lock_guard lock(ops.mu);
    if (ops.requests.erase(id) == 0) return;
  }
  boost::asio::post(ops.executor, [pending, err = nats_error(s, "request to " + subject)] {
    pending->finish(Result<Message>(err));
  });
}

void Connection::last_message_async(const std::string& stream, const std::string& subject,
                                    std::chrono::milliseconds timeout, LastMessageHandler done) {
  const std::string body = nlohmann::json{{"last_by_subj", subject}}.dump();
  request_async(
      "$JS.API.STREAM.MSG.GET." + stream, body, timeout,
      [done = std::move(done), stream, subject](Result<Message> reply) {
        using Out = Result<std::optional<StreamMessage>>;
        const std::string what = "last message of " + subject + " in " + stream;
        if (!reply) {
          Error e = reply.error();
          e.message = what + ": " + e.message;
          return done(Out(std::move(e)));
        }
        auto j = nlohmann::json::parse(reply->data, nullptr, false);
        if (j.is_discarded() || !j.is_object()) {
          return done(Out(make_error(ErrorDomain::kNats, what + ": unreadable reply")));
        }
        if (auto err = j.find("error"); err != j.end() && err->is_object()) {
          const int code = static_cast<int>(detail::json_int(*err, "code"));
          const int js_code = static_cast<int>(detail::json_int(*err, "err_code"));
          if (js_code == detail::kNoMessageFound ||
              (code == 404 && js_code != JSStreamNotFoundErr)) {
            return done(Out(std::optional<StreamMessage>{}));
          }
          return done(Out(nats_error(NATS_ERR, what, js_code)));
        }
        auto m = j.find("message");
        if (m == j.end() || !m->is_object()) {
          return done(Out(make_error(ErrorDomain::kNats, what + ": no message in the reply")));
        }
        StreamMessage out;
        out.message.subject = detail::json_string(*m, "subject");
        out.message.data = detail::base64_decode(detail::json_string(*m, "data"));
        if (auto h = m->find("hdrs"); h != m->end() && h->is_string()) {
          out.message.headers = detail::parse_headers(detail::base64_decode(h->get<std::string>()));
        }
        out.stream_sequence =
            static_cast<uint64_t>(std::max<int64_t>(0, detail::json_int(*m, "seq")));
        done(Out(std::optional<StreamMessage>(std::move(out))));
      });
}

// ---- KeyValue ----

void KeyValue::update_async(const std::string& key, std::string_view value, uint64_t expected,
                            RevisionHandler done, std::chrono::milliseconds timeout) {
  AsyncPublish options;
  options.expected_last_subject_sequence = expected;
  options.timeout = timeout;
  detail::publish_async(*impl_->core, "$KV." + impl_->bucket + "." + key, value, options,
                        [done = std::move(done)](Result<PubAck> ack) {
                          if (!ack) return done(Result<uint64_t>(ack.error()));
                          done(Result<uint64_t>(ack->sequence));
                        });
}

}  // namespace cvm::bus
