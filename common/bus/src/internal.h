#pragma once
// Shared between the adapter's translation units only: RAII handles for cnats objects and the
// connection core that subscriptions, consumers and buckets keep alive.

#include <nats/nats.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include <boost/asio/post.hpp>

#include "cvm/bus/bus.h"

namespace cvm::bus::detail {

// unique_ptr with a cnats destroy function as deleter.
template <class T, void (*Destroy)(T*)>
struct CDeleter {
  void operator()(T* p) const {
    if (p != nullptr) Destroy(p);
  }
};
template <class T, void (*Destroy)(T*)>
using CHandle = std::unique_ptr<T, CDeleter<T, Destroy>>;

using OptionsHandle = CHandle<natsOptions, natsOptions_Destroy>;
using MsgHandle = CHandle<natsMsg, natsMsg_Destroy>;
using KvEntryHandle = CHandle<kvEntry, kvEntry_Destroy>;
using StreamInfoHandle = CHandle<jsStreamInfo, jsStreamInfo_Destroy>;
using ConsumerInfoHandle = CHandle<jsConsumerInfo, jsConsumerInfo_Destroy>;
using PubAckHandle = CHandle<jsPubAck, jsPubAck_Destroy>;
using MetaDataHandle = CHandle<jsMsgMetaData, jsMsgMetaData_Destroy>;
using KvStoreHandle = CHandle<kvStore, kvStore_Destroy>;

// List structs live on the stack; their contents are freed by a *_Destroy(list*) call.
template <class L, void (*Destroy)(L*)>
class ListGuard {
 public:
  ListGuard() = default;
  ~ListGuard() { Destroy(&list_); }
  ListGuard(const ListGuard&) = delete;
  ListGuard& operator=(const ListGuard&) = delete;
  L* get() { return &list_; }
  L* operator->() { return &list_; }

 private:
  L list_{};
};
using MsgList = ListGuard<natsMsgList, natsMsgList_Destroy>;
using KeysList = ListGuard<kvKeysList, kvKeysList_Destroy>;
using EntryList = ListGuard<kvEntryList, kvEntryList_Destroy>;

// A natsSubscription that unsubscribes and frees itself; shared because JetStream messages point
// at their subscription (cnats does not retain it for them).
struct SubHandle {
  natsSubscription* sub = nullptr;
  explicit SubHandle(natsSubscription* s) : sub(s) {}
  ~SubHandle();
  SubHandle(const SubHandle&) = delete;
  SubHandle& operator=(const SubHandle&) = delete;
};

// The closure handed to cnats' connection callbacks. It must outlive every callback cnats may
// still run, so it is freed only after the closed callback (always the last one) has run.
struct ConnCallbacks {
  Executor executor;
  std::function<void()> on_connected;
  std::function<void()> on_disconnected;
  std::function<void()> on_reconnected;
  std::function<void()> on_closed;
  std::function<void(const Error&)> on_error;

  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;

  void post(const std::function<void()>& fn) const {
    if (fn) boost::asio::post(executor, fn);
  }
  void post_error(const Error& error) const {
    if (on_error) boost::asio::post(executor, [fn = on_error, error] { fn(error); });
  }
};

struct AsyncOps;  // async.cpp: asynchronous JetStream publishes and requests

// Owns the connection and its JetStream context. Connection closes it; the objects made from it
// (subscriptions, consumers, buckets) share it so their cnats pointers stay valid until the last
// of them is gone, and their calls then fail cleanly with "connection closed".
class Core {
 public:
  Core(Executor executor, std::unique_ptr<ConnCallbacks> callbacks);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  void close();  // idempotent; waits (bounded) for cnats' closed callback

  Executor executor;
  natsConnection* nc = nullptr;
  jsCtx* js = nullptr;
  std::unique_ptr<ConnCallbacks> callbacks;
  std::string inbox_prefix;  // as configured for this connection ("" for cnats' "_INBOX")
  // Made on first use (async.cpp); released after the connection is destroyed, and freed once no
  // cnats callback still uses it (see destroy_async_ops).
  std::shared_ptr<AsyncOps> async_ops();

 private:
  std::mutex close_mu_;
  bool close_called_ = false;
  std::mutex async_mu_;
  std::shared_ptr<AsyncOps> async_;
  friend void destroy_async_ops(Core& core);
};

// Called by ~Core once cnats is done with the connection.
void destroy_async_ops(Core& core);

// Posts an async error (fetch loop, watcher) to the connection's on_error, if any.
void report_error(const Core& core, const Error& error);

// "<inbox prefix>.<unique token>.": a wildcard inbox of its own under the connection's prefix
// (cnats' inbox is "_INBOX.<nuid>"), so least-privilege users (deploy/nats) may receive on it;
// `fallback` names it should cnats fail to make a nuid.
std::string unique_inbox(const std::string& inbox_prefix, const char* fallback);

}  // namespace cvm::bus::detail

namespace cvm::bus {

struct Connection::Impl {
  std::shared_ptr<detail::Core> core;
};

struct KeyValue::Impl {
  std::shared_ptr<detail::Core> core;
  std::string bucket;
  std::shared_ptr<kvStore> kv;  // shared with watchers
};

}  // namespace cvm::bus

namespace cvm::bus::detail {

// Copies a cnats message (subject, reply, data, headers) into a Message that owns its bytes.
Message copy_message(natsMsg* msg);
// Builds a natsMsg carrying headers; cnats only takes headers through natsMsg.
Result<MsgHandle> make_msg(const std::string& subject, std::string_view data,
                           const Headers& headers);

}  // namespace cvm::bus::detail
