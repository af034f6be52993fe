#pragma once
// The one adapter over cnats (libnats 3.4.1). Everything NATS-specific stays behind this header:
// natsStatus becomes cvm::Error here, every cnats object is owned by an RAII handle, and every
// callback that cnats runs on its own threads is re-posted onto the service's Boost.Asio executor,
// so service code is single-threaded.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "cvm/base/result.h"

namespace cvm::bus {

using Executor = boost::asio::any_io_executor;
using Headers = std::map<std::string, std::string>;

struct ConnectOptions {
  std::string url = "nats://127.0.0.1:4222";  // comma-separated list allowed
  std::string name;                           // client name shown by the server
  std::string user;                           // optional user/password auth
  std::string password;
  // Where this client's reply subjects live. Empty: inbox_prefix_for(user), so each user of a
  // least-privilege server configuration (deploy/nats) may subscribe to its own inboxes only.
  std::string inbox_prefix;
  std::chrono::milliseconds connect_timeout{2000};
  std::chrono::milliseconds reconnect_wait{250};
  int max_reconnect = -1;               // -1: forever; services must survive NATS restarts
  bool retry_on_failed_connect = true;  // start even when the server is not up yet
  // Write each message at once instead of batching for up to 1 ms: lower latency, more syscalls.
  bool send_asap = true;
  // cnats gives every asynchronous subscription its own delivery thread; with this, a small shared
  // pool delivers for all of them instead (a process with thousands of subscriptions: the fleet
  // simulator).
  bool shared_delivery_threads = false;
  // Called on the executor passed to Connection::connect.
  // on_connected: the first connection was made in the background (retry_on_failed_connect and
  // the server was not reachable when connect() returned).
  std::function<void()> on_connected;
  std::function<void()> on_disconnected;
  std::function<void()> on_reconnected;
  std::function<void()> on_closed;
  std::function<void(const Error&)> on_error;  // async errors (slow consumer, permissions)
};

// A core NATS message, copied out of cnats so that it can travel across threads.
struct Message {
  std::string subject;
  std::string reply;
  std::string data;
  Headers headers;
};

// "_INBOX_<user>" (characters that cannot be in a subject token become '_'); "" for no user, which
// keeps cnats' shared "_INBOX." prefix.
std::string inbox_prefix_for(std::string_view user);

// A message read back from a stream, with its place in it.
struct StreamMessage {
  Message message;
  uint64_t stream_sequence = 0;
  uint64_t pending = 0;  // messages on the subject still to come after this one, as of now
  int64_t timestamp_unix_ns = 0;
};

// Reads the messages a stream holds on one subject, oldest first, then those that arrive later,
// through an ordered ephemeral consumer: no gaps, no acks, and nothing left on the server when it
// goes away. Synchronous and for one thread: made for command-line tools that own their loop.
class StreamReader {
 public:
  ~StreamReader();
  StreamReader(const StreamReader&) = delete;
  StreamReader& operator=(const StreamReader&) = delete;
  // The next message, or nullopt when none arrived within `timeout`.
  Result<std::optional<StreamMessage>> next(std::chrono::milliseconds timeout);
  struct Impl;
  explicit StreamReader(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// What a stream's consumer has not yet done, for dashboards and backlog alerts.
struct ConsumerState {
  std::string name;
  std::string filter_subject;
  uint64_t pending = 0;      // stored messages not yet delivered
  uint64_t ack_pending = 0;  // delivered, not yet acknowledged
  uint64_t redelivered = 0;
  uint64_t waiting = 0;  // pull requests waiting: > 0 means someone is fetching
};

struct StreamState {
  uint64_t messages = 0;
  uint64_t bytes = 0;
  uint64_t first_sequence = 0;
  uint64_t last_sequence = 0;
  int64_t consumers = 0;
};

// An RAII core subscription: unsubscribes and frees when destroyed.
class Subscription {
 public:
  Subscription();
  ~Subscription();
  Subscription(Subscription&&) noexcept;
  Subscription& operator=(Subscription&&) noexcept;
  Subscription(const Subscription&) = delete;
  Subscription& operator=(const Subscription&) = delete;
  void unsubscribe();
  struct Impl;
  explicit Subscription(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// A message from a JetStream pull consumer. Owns the underlying natsMsg; ack/nak/term may be
// called from any thread, once.
class JsMessage {
 public:
  ~JsMessage();
  JsMessage(const JsMessage&) = delete;
  JsMessage& operator=(const JsMessage&) = delete;

  [[nodiscard]] std::string_view subject() const;
  [[nodiscard]] std::string_view data() const;
  [[nodiscard]] std::optional<std::string> header(const std::string& key) const;
  [[nodiscard]] uint64_t stream_sequence() const;
  [[nodiscard]] uint64_t num_delivered() const;  // 1 on first delivery
  // When the server stored it, and when this process fetched it (wall clock, ns since the epoch;
  // 0 when unknown): for latency breakdowns, on one machine.
  [[nodiscard]] int64_t stored_unix_ns() const;
  [[nodiscard]] int64_t fetched_unix_ns() const;

  Status ack();  // synchronous: returns once the server confirmed
  Status nak(std::chrono::milliseconds delay = std::chrono::milliseconds{0});
  // Asynchronous: sends the ack and returns without waiting for the server's confirmation. A lost
  // ack only means a redelivery after ack_wait, which callers must handle anyway.
  Status ack_async();
  Status term();         // never redeliver (poison messages)
  Status in_progress();  // extend the ack wait
  struct Impl;
  explicit JsMessage(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};
using JsMessagePtr = std::shared_ptr<JsMessage>;

enum class Retention { kLimits, kWorkQueue, kInterest };
enum class Storage { kFile, kMemory };

struct StreamConfig {
  std::string name;
  std::vector<std::string> subjects;
  Retention retention = Retention::kLimits;
  Storage storage = Storage::kFile;
  std::chrono::seconds max_age{0};  // 0: unlimited
  std::chrono::seconds duplicate_window{120};
  int replicas = 1;
  int64_t max_msgs = -1;
};

struct ConsumerConfig {
  std::string stream;
  std::string durable;
  std::string filter_subject;  // empty: every subject of the stream
  std::chrono::milliseconds ack_wait{30000};
  int max_deliver = -1;  // -1: unlimited
  int max_ack_pending = 1000;
};

struct PubAck {
  std::string stream;
  uint64_t sequence = 0;
  bool duplicate = false;  // the server had already stored this Nats-Msg-Id
};

// Options of Connection::js_publish_async.
struct AsyncPublish {
  std::string msg_id;  // Nats-Msg-Id (de-duplication), empty for none
  Headers headers;
  // Nats-Expected-Last-Subject-Sequence: the store is refused (kConflict) unless the last message
  // on the subject has this sequence. 0 is meaningful here: "no message on the subject yet".
  std::optional<uint64_t> expected_last_subject_sequence;
  std::chrono::milliseconds timeout{5000};  // no ack by then: kTimeout
};
using PubAckHandler = std::function<void(Result<PubAck>)>;
using ReplyHandler = std::function<void(Result<Message>)>;
using LastMessageHandler = std::function<void(Result<std::optional<StreamMessage>>)>;
using RevisionHandler = std::function<void(Result<uint64_t>)>;

// Runs a fetch loop on its own thread and posts each message to the executor. Stops (and joins)
// when destroyed; messages already posted stay valid (shared ownership).
class PullConsumer {
 public:
  ~PullConsumer();
  PullConsumer(const PullConsumer&) = delete;
  PullConsumer& operator=(const PullConsumer&) = delete;
  void stop();
  struct Impl;
  explicit PullConsumer(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

enum class KvOp { kPut, kDelete, kPurge };

struct KvEntry {
  std::string key;
  std::string value;
  uint64_t revision = 0;
  KvOp op = KvOp::kPut;
};

struct KvConfig {
  std::string bucket;
  int history = 1;
  std::chrono::seconds ttl{0};
  int replicas = 1;
  Storage storage = Storage::kFile;
};

// Runs kvWatcher_Next on its own thread; posts entries to the executor. The handler gets
// std::nullopt once, after the initial values were delivered. Stops when destroyed.
class KvWatch {
 public:
  ~KvWatch();
  KvWatch(const KvWatch&) = delete;
  KvWatch& operator=(const KvWatch&) = delete;
  void stop();
  struct Impl;
  explicit KvWatch(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

class KeyValue {
 public:
  ~KeyValue();
  KeyValue(KeyValue&&) noexcept;
  KeyValue& operator=(KeyValue&&) noexcept;
  KeyValue(const KeyValue&) = delete;
  KeyValue& operator=(const KeyValue&) = delete;

  [[nodiscard]] const std::string& bucket() const;
  // nullopt when the key does not exist or was deleted.
  Result<std::optional<KvEntry>> get(const std::string& key);
  Result<uint64_t> put(const std::string& key, std::string_view value);
  // Fails with ErrorDomain::kConflict when the key exists.
  Result<uint64_t> create(const std::string& key, std::string_view value);
  // Compare-and-set: fails with ErrorDomain::kConflict when the revision is not `expected`.
  Result<uint64_t> update(const std::string& key, std::string_view value, uint64_t expected);
  // Compare-and-set without waiting: `done` runs on the connection's executor with the new
  // revision, or kConflict when the key's last revision is not `expected`. Unlike update(),
  // `expected` counts delete markers, and 0 means "never written", so with 0 this is a create
  // that also fails over a deleted key (the revision of a delete marker is what a watcher sees).
  // Several may be in flight at once; they complete in any order.
  void update_async(const std::string& key, std::string_view value, uint64_t expected,
                    RevisionHandler done,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds{5000});
  Status erase(const std::string& key);  // a delete marker (watchers see KvOp::kDelete)
  Status purge(const std::string& key);
  Result<std::vector<std::string>> keys();
  Result<std::vector<KvEntry>> history(const std::string& key);
  // keys: a subject-style pattern, ">" for all.
  Result<std::unique_ptr<KvWatch>> watch(const std::string& keys,
                                         std::function<void(std::optional<KvEntry>)> handler);
  struct Impl;
  explicit KeyValue(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

class Connection {
 public:
  // Connects (or, with retry_on_failed_connect, starts connecting in the background). Every
  // handler given to this connection and the objects it makes runs on `executor`.
  static Result<std::shared_ptr<Connection>> connect(const ConnectOptions& options,
                                                     Executor executor);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  [[nodiscard]] bool connected() const;
  [[nodiscard]] const Executor& executor() const;

  Status publish(const std::string& subject, std::string_view data, const Headers& headers = {});
  Status flush(std::chrono::milliseconds timeout = std::chrono::milliseconds{2000});
  // Blocking request-reply; a timeout is kTimeout, "no responders" is kNotFound.
  Result<Message> request(const std::string& subject, std::string_view data,
                          std::chrono::milliseconds timeout);
  // queue may be empty.
  Result<Subscription> subscribe(const std::string& subject, const std::string& queue,
                                 std::function<void(Message)> handler);

  // JetStream.
  Status ensure_stream(const StreamConfig& config);  // create, or update to match: idempotent
  Result<PubAck> js_publish(const std::string& subject, std::string_view data,
                            const std::string& msg_id = {}, const Headers& headers = {},
                            std::chrono::milliseconds timeout = std::chrono::milliseconds{5000});
  // Publishes without waiting for the PubAck: `done` runs on the executor with the ack or the
  // error (kConflict for a failed expectation, kTimeout when no ack came in time). Many may be in
  // flight at once, so a service pipelines its writes instead of paying a round trip each.
  void js_publish_async(const std::string& subject, std::string_view data,
                        const AsyncPublish& options, PubAckHandler done);
  // Request-reply without blocking: `done` runs on the executor with the reply, kTimeout, or
  // kNotFound for "no responders".
  void request_async(const std::string& subject, std::string_view data,
                     std::chrono::milliseconds timeout, ReplyHandler done);
  // last_message() without blocking (the stream's message-get API), with the message's stream
  // sequence (for a KV subject: its revision, delete markers included): nullopt when the stream
  // holds no message on `subject`. `pending` and the timestamp are not filled in.
  void last_message_async(const std::string& stream, const std::string& subject,
                          std::chrono::milliseconds timeout, LastMessageHandler done);
  // Creates the durable consumer if missing and runs a fetch loop that posts to the executor.
  Result<std::unique_ptr<PullConsumer>> pull_consume(const ConsumerConfig& config,
                                                     std::function<void(JsMessagePtr)> handler,
                                                     int batch = 16);
  Result<KeyValue> ensure_kv(const KvConfig& config);  // create or bind: idempotent
  // The newest message stored in `stream` on `subject`, nullopt when there is none.
  Result<std::optional<Message>> last_message(const std::string& stream,
                                              const std::string& subject);
  // The message stored at `sequence` in `stream`; nullopt when there is none (never stored, or
  // acknowledged out of a work queue, or deleted).
  Result<std::optional<Message>> message_at(const std::string& stream, uint64_t sequence);
  // Reads `subject` in `stream` from its first stored message on (stream_reader.cpp).
  Result<std::unique_ptr<StreamReader>> read_stream(const std::string& stream,
                                                    const std::string& subject);
  Result<StreamState> stream_state(const std::string& stream);
  // Every consumer of `stream`, sorted by name.
  Result<std::vector<ConsumerState>> consumer_states(const std::string& stream);

  struct Impl;
  explicit Connection(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

using ConnectionPtr = std::shared_ptr<Connection>;

// Turns a natsStatus (and optional JetStream error code) into our Error. Exposed for tests.
Error nats_error(int status, std::string_view context, int js_code = 0);
// Whether an (asynchronous) error says messages were dropped because this client could not keep
// up: cnats' own pending limits, reported through ConnectOptions::on_error.
bool is_slow_consumer(const Error& error);

}  // namespace cvm::bus
