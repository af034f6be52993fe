// JetStream: streams, publish with de-duplication, durable pull consumers and their messages.

#include <atomic>
#include <condition_variable>
#include <set>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "internal.h"

namespace cvm::bus {

using detail::Core;

namespace {

int64_t to_nanos(std::chrono::nanoseconds d) { return d.count(); }

// What the posted handlers of a consumer share; cleared on stop so a handler posted just before
// stop() never runs after it.
struct Delivery {
  std::function<void(JsMessagePtr)> handler;
  std::atomic<bool> active{true};
};

// Creates the durable, or brings an existing one to `config` (an upgrade changed ack_wait, say).
Status ensure_consumer(jsCtx* js, const ConsumerConfig& config) {
  jsConsumerConfig cc;
  jsConsumerConfig_Init(&cc);
  cc.Durable = config.durable.c_str();
  // With a name, cnats (against a 2.9 server) creates through $JS.API.CONSUMER.CREATE.<stream>.
  // <name>.<filter>, a subject that permissions can pin to one filter, so a node agent's user can
  // be allowed its own work only (deploy/nats); the legacy DURABLE.CREATE subject carries no
  // filter.
  cc.Name = config.durable.c_str();
  cc.DeliverPolicy = js_DeliverAll;
  cc.AckPolicy = js_AckExplicit;
  cc.AckWait = to_nanos(config.ack_wait);
  cc.MaxDeliver = config.max_deliver;
  cc.MaxAckPending = config.max_ack_pending;
  if (!config.filter_subject.empty()) cc.FilterSubject = config.filter_subject.c_str();

  jsConsumerInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_AddConsumer(&raw, js, config.stream.c_str(), &cc, nullptr, &jerr);
  detail::ConsumerInfoHandle info(raw);
  if (s != NATS_OK && jerr != JSStreamNotFoundErr) {
    raw = nullptr;
    jerr = static_cast<jsErrCode>(0);
    s = js_UpdateConsumer(&raw, js, config.stream.c_str(), &cc, nullptr, &jerr);
    detail::ConsumerInfoHandle updated(raw);
  }
  if (s != NATS_OK) {
    return nats_error(s, "create consumer " + config.durable + " on " + config.stream, jerr);
  }
  return {};
}

}  // namespace

// ---- JsMessage ----

struct JsMessage::Impl {
  // The connection the acknowledgements go out on; a message that outlives it fails its acks
  // cleanly ("connection closed").
  std::shared_ptr<Core> core;
  detail::MsgHandle msg;
  uint64_t stream_sequence = 0;
  uint64_t num_delivered = 0;
  int64_t stored_unix_ns = 0;
  // Taken on the fetching thread, before the hand-off to the executor.
  int64_t fetched_unix_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
  // Ack, nak and term end the delivery: later ones are no-ops, as in cnats. Header reads share
  // the lock because cnats' header cache is not thread safe.
  mutable std::mutex mu;
  bool settled = false;

  Impl(std::shared_ptr<Core> c, natsMsg* m) : core(std::move(c)), msg(m) {
    // Parsed from the $JS.ACK reply subject; needs no subscription.
    jsMsgMetaData* raw = nullptr;
    if (natsMsg_GetMetaData(&raw, msg.get()) == NATS_OK) {
      detail::MetaDataHandle meta(raw);
      stream_sequence = meta->Sequence.Stream;
      num_delivered = meta->NumDelivered;
      stored_unix_ns = meta->Timestamp;
    }
  }

  // Sends one acknowledgement body ("+ACK", "-NAK", "+TERM", "+WPI") to the message's $JS.ACK
  // subject; with `confirm`, as a request the server answers once it has applied it.
  Status send(std::string_view body, const char* what, bool final, bool confirm = false) {
    std::lock_guard lock(mu);
    if (settled) return {};
    const char* reply = natsMsg_GetReply(msg.get());
    if (reply == nullptr || *reply == '\0') {
      return make_error(ErrorDomain::kInvalid, std::string(what) + ": not a JetStream message");
    }
    natsStatus st = NATS_OK;
    if (confirm) {
      natsMsg* answer = nullptr;
      st = natsConnection_Request(&answer, core->nc, reply, body.data(),
                                  static_cast<int>(body.size()), 5000);
      natsMsg_Destroy(answer);
    } else {
      st = natsConnection_Publish(core->nc, reply, body.data(), static_cast<int>(body.size()));
    }
    if (st != NATS_OK) return nats_error(st, what);
    if (final) settled = true;
    return {};
  }
};

JsMessage::JsMessage(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
JsMessage::~JsMessage() = default;

std::string_view JsMessage::subject() const {
  const char* subject = natsMsg_GetSubject(impl_->msg.get());
  return subject != nullptr ? std::string_view(subject) : std::string_view();
}

std::string_view JsMessage::data() const {
  const char* data = natsMsg_GetData(impl_->msg.get());
  if (data == nullptr) return {};
  return {data, static_cast<size_t>(natsMsg_GetDataLength(impl_->msg.get()))};
}

std::optional<std::string> JsMessage::header(const std::string& key) const {
  std::lock_guard lock(impl_->mu);
  const char* value = nullptr;
  if (natsMsgHeader_Get(impl_->msg.get(), key.c_str(), &value) != NATS_OK || value == nullptr) {
    return std::nullopt;
  }
  return std::string(value);
}

uint64_t JsMessage::stream_sequence() const { return impl_->stream_sequence; }
uint64_t JsMessage::num_delivered() const { return impl_->num_delivered; }
int64_t JsMessage::stored_unix_ns() const { return impl_->stored_unix_ns; }
int64_t JsMessage::fetched_unix_ns() const { return impl_->fetched_unix_ns; }

Status JsMessage::ack() { return impl_->send("+ACK", "ack", true, /*confirm=*/true); }

Status JsMessage::ack_async() { return impl_->send("+ACK", "ack", true); }

Status JsMessage::nak(std::chrono::milliseconds delay) {
  if (delay.count() <= 0) return impl_->send("-NAK", "nak", true);
  const std::string body =
      "-NAK {\"delay\":" +
      std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(delay).count()) + "}";
  return impl_->send(body, "nak", true);
}

Status JsMessage::term() { return impl_->send("+TERM", "term", true); }

Status JsMessage::in_progress() { return impl_->send("+WPI", "in progress", false); }

// ---- PullConsumer ----

// The fetch loop speaks the pull protocol itself instead of calling natsSubscription_Fetch: the
// Fetch of cnats 3.4.1 (Debian 12's) can return more messages than the batch it was asked for,
// written past the end of its own array (seen as heap corruption in fault tests, with a list of
// 22 messages from a batch of 16). Here every pull request has its own reply subject under one
// wildcard inbox, so each status answer (408 expired, 409 refused) is matched to its request,
// and at most two requests wait at the server at a time.
struct PullConsumer::Impl {
  std::shared_ptr<Core> core;
  std::shared_ptr<detail::SubHandle> sub;  // the inbox: "<inbox prefix>.<token>.*", synchronous
  std::string inbox;                       // "<inbox prefix>.<token>."
  std::string next_subject;                // $JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>
  std::shared_ptr<Delivery> delivery;
  ConsumerConfig config;
  std::string name;
  int batch = 16;

  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable cv;
  std::thread thread;

  ~Impl() { stop(); }

  void stop() {
    delivery->active.store(false);
    {
      std::lock_guard lock(mu);
      stopping.store(true);
    }
    cv.notify_all();
    if (thread.joinable()) thread.join();
  }

  // A pull request the server may still be answering.
  struct Request {
    uint64_t id = 0;
    int remaining = 0;
    std::chrono::steady_clock::time_point gone;  // by then the server has surely let it go
  };

  void run() {
    // How long the server keeps a request waiting; bounds how long a lost request (a server
    // restart forgets them) delays the next.
    constexpr auto kExpires = std::chrono::milliseconds{500};
    constexpr auto kGrace = std::chrono::milliseconds{500};
    constexpr auto kRetryDelay = std::chrono::milliseconds{250};
    // Fetches to a consumer that was deleted (by an operator, or lost with the server's store)
    // just time out: look for it now and then while idle, and put it back.
    constexpr auto kCheckEvery = std::chrono::seconds{2};
    auto last_check = std::chrono::steady_clock::now();
    auto last_message = last_check;
    std::vector<Request> requests;
    uint64_t next_id = 0;
    natsStatus last_reported = NATS_OK;
    std::vector<JsMessagePtr> ready;
    // Disconnected and the reconnect buffer full, or closed: report once per kind of failure,
    // then wait a little and keep trying.
    const auto report_and_wait = [&](natsStatus s) {
      if (s != last_reported) {
        detail::report_error(*core, nats_error(s, "fetch from consumer " + name));
        last_reported = s;
      }
      std::unique_lock lock(mu);
      cv.wait_for(lock, kRetryDelay, [&] { return stopping.load(); });
    };
    while (!stopping.load()) {
      const auto now = std::chrono::steady_clock::now();
      std::erase_if(requests, [&](const Request& r) { return r.remaining <= 0 || now >= r.gone; });
      int credit = 0;
      for (const auto& r : requests) credit += r.remaining;
      if (requests.size() < 2 && credit <= batch / 2) {
        const uint64_t id = ++next_id;
        const std::string body =
            "{\"batch\":" + std::to_string(batch) + ",\"expires\":" +
            std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(kExpires).count()) +
            "}";
        const std::string reply = inbox + std::to_string(id);
        const natsStatus s =
            natsConnection_PublishRequest(core->nc, next_subject.c_str(), reply.c_str(),
                                          body.data(), static_cast<int>(body.size()));
        if (s == NATS_OK) {
          requests.push_back({id, batch, now + kExpires + kGrace});
          last_reported = NATS_OK;
        } else {
          if (stopping.load()) break;
          report_and_wait(s);
          continue;
        }
      }

      // Wait briefly: stop() and the requests' bookkeeping must not wait on the server.
      natsMsg* raw = nullptr;
      const natsStatus s = natsSubscription_NextMsg(&raw, sub->sub, 100);
      if (s == NATS_OK) {
        detail::MsgHandle m(raw);
        on_message(std::move(m), requests, ready);
        // Take whatever else is queued already, up to a batch, before handing over: one post per
        // batch, not per message, wakes the executor's thread once.
        int queued = 0;
        while (ready.size() < static_cast<size_t>(batch) &&
               natsSubscription_GetPending(sub->sub, &queued, nullptr) == NATS_OK && queued > 0) {
          natsMsg* more = nullptr;
          if (natsSubscription_NextMsg(&more, sub->sub, 10) != NATS_OK) break;
          on_message(detail::MsgHandle(more), requests, ready);
        }
        if (!ready.empty()) {
          last_message = std::chrono::steady_clock::now();
          boost::asio::post(core->executor, [d = delivery, msgs = std::exchange(ready, {})] {
            for (const auto& msg : msgs) {
              if (!d->active.load()) return;
              d->handler(msg);
            }
          });
        }
        continue;
      }
      if (s == NATS_TIMEOUT) {
        const auto t = std::chrono::steady_clock::now();
        if (t - last_message >= kCheckEvery && t - last_check >= kCheckEvery) {
          last_check = t;
          restore_if_missing();
        }
        continue;
      }
      if (stopping.load()) break;
      report_and_wait(s);
    }
  }

  // A message on the inbox: a stream message (counted against the oldest request still owed
  // messages) or a status answer to one request (it ends that request).
  void on_message(detail::MsgHandle m, std::vector<Request>& requests,
                  std::vector<JsMessagePtr>& ready) {
    const char* status = nullptr;
    if (natsMsg_GetDataLength(m.get()) == 0 &&
        natsMsgHeader_Get(m.get(), "Status", &status) == NATS_OK && status != nullptr) {
      const std::string_view subject(natsMsg_GetSubject(m.get()));
      uint64_t id = 0;
      if (subject.starts_with(inbox)) {
        for (char c : subject.substr(inbox.size())) {
          if (c < '0' || c > '9') break;
          id = id * 10 + static_cast<uint64_t>(c - '0');
        }
      }
      std::erase_if(requests, [&](const Request& r) { return r.id == id; });
      const std::string_view code(status);
      // 404/408: nothing there, or the request expired: the normal end of an idle request.
      if (code != "404" && code != "408") {
        const char* description = nullptr;
        natsMsgHeader_Get(m.get(), "Description", &description);
        detail::report_error(
            *core, make_error(ErrorDomain::kNats, "fetch from consumer " + name + ": " +
                                                      std::string(code) + " " +
                                                      (description != nullptr ? description : "")));
      }
      return;
    }
    for (auto& r : requests) {
      if (r.remaining > 0) {
        --r.remaining;
        break;
      }
    }
    ready.push_back(
        std::make_shared<JsMessage>(std::make_unique<JsMessage::Impl>(core, m.release())));
  }

  void restore_if_missing() {
    jsConsumerInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s = js_GetConsumerInfo(&raw, core->js, config.stream.c_str(),
                                            config.durable.c_str(), nullptr, &jerr);
    detail::ConsumerInfoHandle info(raw);
    // Anything but "not found" (disconnected, say) is for the reconnect logic, not for us.
    if (s == NATS_OK || jerr != JSConsumerNotFoundErr) return;
    detail::report_error(*core,
                         nats_error(s, "consumer " + name + " disappeared; re-creating", jerr));
    if (auto created = ensure_consumer(core->js, config); !created.ok()) {
      detail::report_error(*core, created.error());
    }
  }
};

PullConsumer::PullConsumer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PullConsumer::~PullConsumer() = default;
void PullConsumer::stop() { impl_->stop(); }

// ---- Connection: JetStream ----

namespace {

// The settings ensure_stream manages; what the server fills in by itself is not compared.
bool same_stream_config(const jsStreamConfig& a, const jsStreamConfig& b) {
  if (a.Retention != b.Retention || a.Storage != b.Storage || a.MaxAge != b.MaxAge ||
      a.Duplicates != b.Duplicates || a.MaxMsgs != b.MaxMsgs || a.Replicas != b.Replicas ||
      a.SubjectsLen != b.SubjectsLen) {
    return false;
  }
  std::set<std::string_view> want;
  for (int i = 0; i < b.SubjectsLen; ++i) want.insert(b.Subjects[i]);
  for (int i = 0; i < a.SubjectsLen; ++i) {
    if (!want.contains(a.Subjects[i])) return false;
  }
  return true;
}

}  // namespace

Status Connection::ensure_stream(const StreamConfig& config) {
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  cfg.Name = config.name.c_str();
  std::vector<const char*> subjects;
  for (const auto& subject : config.subjects) subjects.push_back(subject.c_str());
  cfg.Subjects = subjects.data();
  cfg.SubjectsLen = static_cast<int>(subjects.size());
  switch (config.retention) {
    case Retention::kLimits:
      cfg.Retention = js_LimitsPolicy;
      break;
    case Retention::kWorkQueue:
      cfg.Retention = js_WorkQueuePolicy;
      break;
    case Retention::kInterest:
      cfg.Retention = js_InterestPolicy;
      break;
  }
  cfg.Storage = config.storage == Storage::kMemory ? js_MemoryStorage : js_FileStorage;
  cfg.MaxAge = to_nanos(config.max_age);
  cfg.Duplicates = to_nanos(config.duplicate_window);
  cfg.Replicas = config.replicas;
  cfg.MaxMsgs = config.max_msgs;

  // An existing stream may have been tuned by an operator (3 replicas on a cluster): keep its
  // replica count, and leave it alone when the rest already matches, so a service never undoes
  // that and a client without update permission (a node agent) still starts. Looking first also
  // keeps a replica count the server cannot honour from failing the create of a stream that is
  // already there.
  auto reconcile_existing = [&](const jsStreamConfig& have) -> Status {
    cfg.Replicas = have.Replicas;
    if (same_stream_config(have, cfg)) return {};
    jsStreamInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s = js_UpdateStream(&raw, impl_->core->js, &cfg, nullptr, &jerr);
    detail::StreamInfoHandle updated(raw);
    if (s != NATS_OK) return nats_error(s, "update stream " + config.name, jerr);
    return {};
  };
  auto lookup = [&]() -> Result<detail::StreamInfoHandle> {
    jsStreamInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s =
        js_GetStreamInfo(&raw, impl_->core->js, config.name.c_str(), nullptr, &jerr);
    detail::StreamInfoHandle info(raw);
    if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr) return detail::StreamInfoHandle{};
    if (s != NATS_OK) return nats_error(s, "inspect stream " + config.name, jerr);
    return info;
  };

  auto current = lookup();
  if (!current) return current.error();
  if (*current && (*current)->Config != nullptr) return reconcile_existing(*(*current)->Config);

  jsStreamInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_AddStream(&raw, impl_->core->js, &cfg, nullptr, &jerr);
  detail::StreamInfoHandle info(raw);
  if (s == NATS_OK) return {};
  // Another process created it between the look and the create. The server says so as "name
  // already in use" or, when the other create is still being applied, as "subjects overlap with
  // an existing stream" (seen in CI, BusJetStream.EnsureStreamIsSafeConcurrently): either way,
  // look again by name; a different stream that overlaps stays an error.
  if (jerr != JSStreamNameExistErr && jerr != JSStreamSubjectOverlapErr) {
    return nats_error(s, "create stream " + config.name, jerr);
  }
  auto now = lookup();
  if (!now) return now.error();
  if (*now && (*now)->Config != nullptr) return reconcile_existing(*(*now)->Config);
  return nats_error(s, "create stream " + config.name, jerr);
}

Result<PubAck> Connection::js_publish(const std::string& subject, std::string_view data,
                                      const std::string& msg_id, const Headers& headers,
                                      std::chrono::milliseconds timeout) {
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = timeout.count();
  // cnats sends this as the Nats-Msg-Id header, which the stream de-duplicates on.
  if (!msg_id.empty()) po.MsgId = msg_id.c_str();

  jsPubAck* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = NATS_OK;
  if (headers.empty()) {
    s = js_Publish(&raw, impl_->core->js, subject.c_str(), data.data(),
                   static_cast<int>(data.size()), &po, &jerr);
  } else {
    auto msg = detail::make_msg(subject, data, headers);
    if (!msg) return msg.error();
    s = js_PublishMsg(&raw, impl_->core->js, msg->get(), &po, &jerr);
  }
  detail::PubAckHandle ack(raw);
  if (s != NATS_OK) return nats_error(s, "publish to stream subject " + subject, jerr);
  return PubAck{ack->Stream != nullptr ? ack->Stream : "", ack->Sequence, ack->Duplicate};
}

Result<std::unique_ptr<PullConsumer>> Connection::pull_consume(
    const ConsumerConfig& config, std::function<void(JsMessagePtr)> handler, int batch) {
  // The consumer is made here and only pulled from: nothing deletes it when the loop stops, so
  // its position survives restarts of the service.
  if (auto created = ensure_consumer(impl_->core->js, config); !created.ok()) {
    return created.error();
  }

  const std::string inbox = detail::unique_inbox(impl_->core->inbox_prefix, "pull");
  natsSubscription* sub = nullptr;
  const natsStatus s = natsConnection_SubscribeSync(&sub, impl_->core->nc, (inbox + "*").c_str());
  if (s != NATS_OK) return nats_error(s, "subscribe to the pull inbox of " + config.durable);
  // Bounded by the requests (two batches at most); never dropped as a slow consumer.
  natsSubscription_SetPendingLimits(sub, -1, -1);

  auto impl = std::make_unique<PullConsumer::Impl>();
  impl->core = impl_->core;
  impl->sub = std::make_shared<detail::SubHandle>(sub);
  impl->inbox = inbox;
  impl->next_subject = "$JS.API.CONSUMER.MSG.NEXT." + config.stream + "." + config.durable;
  impl->delivery = std::make_shared<Delivery>();
  impl->delivery->handler = std::move(handler);
  impl->config = config;
  impl->name = config.stream + "/" + config.durable;
  impl->batch = batch > 0 ? batch : 1;
  auto* raw_impl = impl.get();
  impl->thread = std::thread([raw_impl] { raw_impl->run(); });
  return std::make_unique<PullConsumer>(std::move(impl));
}

Result<std::optional<Message>> Connection::last_message(const std::string& stream,
                                                        const std::string& subject) {
  natsMsg* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s =
      js_GetLastMsg(&raw, impl_->core->js, stream.c_str(), subject.c_str(), nullptr, &jerr);
  detail::MsgHandle msg(raw);
  if (s == NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) return std::optional<Message>{};
  if (s != NATS_OK) return nats_error(s, "last message of " + subject + " in " + stream, jerr);
  return std::optional<Message>(detail::copy_message(msg.get()));
}

Result<std::optional<Message>> Connection::message_at(const std::string& stream,
                                                      uint64_t sequence) {
  natsMsg* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_GetMsg(&raw, impl_->core->js, stream.c_str(), sequence, nullptr, &jerr);
  detail::MsgHandle msg(raw);
  if (s == NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) return std::optional<Message>{};
  if (s != NATS_OK) {
    return nats_error(s, "message " + std::to_string(sequence) + " in " + stream, jerr);
  }
  return std::optional<Message>(detail::copy_message(msg.get()));
}

}  // namespace cvm::bus
