// JetStream key-value buckets: CAS writes and watchers.

#include <atomic>
#include <condition_variable>
#include <thread>
#include <utility>

#include "internal.h"

namespace cvm::bus {

using detail::Core;

namespace {

KvEntry copy_entry(kvEntry* e) {
  KvEntry out;
  if (const char* key = kvEntry_Key(e); key != nullptr) out.key = key;
  if (const void* value = kvEntry_Value(e); value != nullptr) {
    out.value.assign(static_cast<const char*>(value), static_cast<size_t>(kvEntry_ValueLen(e)));
  }
  out.revision = kvEntry_Revision(e);
  switch (kvEntry_Operation(e)) {
    case kvOp_Delete:
      out.op = KvOp::kDelete;
      break;
    case kvOp_Purge:
      out.op = KvOp::kPurge;
      break;
    default:
      out.op = KvOp::kPut;
      break;
  }
  return out;
}

struct WatchDelivery {
  std::function<void(std::optional<KvEntry>)> handler;
  std::atomic<bool> active{true};
};

void destroy_store(kvStore* kv) {
  if (kv != nullptr) kvStore_Destroy(kv);
}

}  // namespace

// ---- KvWatch ----

struct KvWatch::Impl {
  std::shared_ptr<Core> core;
  std::shared_ptr<kvStore> kv;  // the watcher uses the store
  kvWatcher* watcher = nullptr;
  std::shared_ptr<WatchDelivery> delivery;
  std::string keys;
  std::string name;

  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable cv;
  std::thread thread;

  ~Impl() {
    stop();
    if (watcher != nullptr) kvWatcher_Destroy(watcher);
  }

  void stop() {
    delivery->active.store(false);
    {
      std::lock_guard lock(mu);
      if (stopping.exchange(true)) return;
      // Wakes a kvWatcher_Next that is waiting on the other thread. Under the lock: run() may
      // be replacing the watcher.
      kvWatcher_Stop(watcher);
    }
    cv.notify_all();
    if (thread.joinable()) thread.join();
  }

  // cnats gives up on an ordered consumer whose re-creation failed (e.g. it lost its connection
  // meanwhile): it unsubscribes it and the watcher answers "invalid subscription" forever. A watch
  // must not die silently, so a new one is made; it delivers the current values again, then
  // nullopt (a resync). Called on the watch thread only. Returns false when stopping.
  bool renew() {
    std::lock_guard lock(mu);
    if (stopping.load()) return false;
    kvWatcher* fresh = nullptr;
    const natsStatus s = kvStore_Watch(&fresh, kv.get(), keys.c_str(), nullptr);
    if (s != NATS_OK) {
      detail::report_error(*core, nats_error(s, "renew watch " + name));
      return true;
    }
    kvWatcher_Destroy(watcher);
    watcher = fresh;
    detail::report_error(*core,
                         make_error(ErrorDomain::kNats, "watch " + name + " renewed (resync)"));
    return true;
  }

  void post(std::optional<KvEntry> entry) {
    boost::asio::post(core->executor, [d = delivery, entry = std::move(entry)]() mutable {
      if (d->active.load()) d->handler(std::move(entry));
    });
  }

  void run() {
    constexpr int64_t kNextTimeoutMs = 500;
    constexpr auto kRetryDelay = std::chrono::milliseconds{250};
    natsStatus last_reported = NATS_OK;
    while (!stopping.load()) {
      kvEntry* raw = nullptr;
      const natsStatus s = kvWatcher_Next(&raw, watcher, kNextTimeoutMs);
      if (s == NATS_OK) {
        // cnats returns one NULL entry: the initial values have all been delivered.
        if (raw == nullptr) {
          post(std::nullopt);
        } else {
          detail::KvEntryHandle entry(raw);
          post(copy_entry(raw));
        }
        last_reported = NATS_OK;
        continue;
      }
      if (s == NATS_TIMEOUT) continue;
      if (stopping.load()) break;
      if (s == NATS_INVALID_SUBSCRIPTION) {
        if (!renew()) break;
        last_reported = NATS_OK;
        std::unique_lock lock(mu);
        cv.wait_for(lock, kRetryDelay, [&] { return stopping.load(); });
        continue;
      }
      if (s != last_reported) {
        detail::report_error(*core, nats_error(s, "watch " + name));
        last_reported = s;
      }
      std::unique_lock lock(mu);
      cv.wait_for(lock, kRetryDelay, [&] { return stopping.load(); });
    }
  }
};

KvWatch::KvWatch(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvWatch::~KvWatch() = default;
void KvWatch::stop() { impl_->stop(); }

// ---- KeyValue ----

KeyValue::KeyValue(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KeyValue::~KeyValue() = default;
KeyValue::KeyValue(KeyValue&&) noexcept = default;
KeyValue& KeyValue::operator=(KeyValue&&) noexcept = default;

const std::string& KeyValue::bucket() const { return impl_->bucket; }

Result<std::optional<KvEntry>> KeyValue::get(const std::string& key) {
  kvEntry* raw = nullptr;
  const natsStatus s = kvStore_Get(&raw, impl_->kv.get(), key.c_str());
  detail::KvEntryHandle entry(raw);
  if (s == NATS_NOT_FOUND) return std::optional<KvEntry>{};
  if (s != NATS_OK) return nats_error(s, "get " + impl_->bucket + "/" + key);
  KvEntry out = copy_entry(raw);
  if (out.op != KvOp::kPut) return std::optional<KvEntry>{};
  return std::optional<KvEntry>(std::move(out));
}

Result<uint64_t> KeyValue::put(const std::string& key, std::string_view value) {
  uint64_t rev = 0;
  const natsStatus s =
      kvStore_Put(&rev, impl_->kv.get(), key.c_str(), value.data(), static_cast<int>(value.size()));
  if (s != NATS_OK) return nats_error(s, "put " + impl_->bucket + "/" + key);
  return rev;
}

Result<uint64_t> KeyValue::create(const std::string& key, std::string_view value) {
  uint64_t rev = 0;
  const natsStatus s = kvStore_Create(&rev, impl_->kv.get(), key.c_str(), value.data(),
                                      static_cast<int>(value.size()));
  if (s != NATS_OK) return nats_error(s, "create " + impl_->bucket + "/" + key);
  return rev;
}

Result<uint64_t> KeyValue::update(const std::string& key, std::string_view value,
                                  uint64_t expected) {
  uint64_t rev = 0;
  const natsStatus s = kvStore_Update(&rev, impl_->kv.get(), key.c_str(), value.data(),
                                      static_cast<int>(value.size()), expected);
  if (s != NATS_OK) {
    return nats_error(
        s, "update " + impl_->bucket + "/" + key + " at revision " + std::to_string(expected));
  }
  return rev;
}

Status KeyValue::erase(const std::string& key) {
  const natsStatus s = kvStore_Delete(impl_->kv.get(), key.c_str());
  if (s != NATS_OK) return nats_error(s, "delete " + impl_->bucket + "/" + key);
  return {};
}

Status KeyValue::purge(const std::string& key) {
  const natsStatus s = kvStore_Purge(impl_->kv.get(), key.c_str(), nullptr);
  if (s != NATS_OK) return nats_error(s, "purge " + impl_->bucket + "/" + key);
  return {};
}

Result<std::vector<std::string>> KeyValue::keys() {
  detail::KeysList list;
  const natsStatus s = kvStore_Keys(list.get(), impl_->kv.get(), nullptr);
  std::vector<std::string> out;
  if (s == NATS_NOT_FOUND) return out;  // an empty bucket is not an error for us
  if (s != NATS_OK) return nats_error(s, "keys of " + impl_->bucket);
  for (int i = 0; i < list->Count; ++i) out.emplace_back(list->Keys[i]);
  return out;
}

Result<std::vector<KvEntry>> KeyValue::history(const std::string& key) {
  detail::EntryList list;
  const natsStatus s = kvStore_History(list.get(), impl_->kv.get(), key.c_str(), nullptr);
  std::vector<KvEntry> out;
  if (s == NATS_NOT_FOUND) return out;
  if (s != NATS_OK) return nats_error(s, "history of " + impl_->bucket + "/" + key);
  for (int i = 0; i < list->Count; ++i) out.push_back(copy_entry(list->Entries[i]));
  return out;
}

Result<std::unique_ptr<KvWatch>> KeyValue::watch(
    const std::string& keys, std::function<void(std::optional<KvEntry>)> handler) {
  kvWatcher* watcher = nullptr;
  const natsStatus s = kvStore_Watch(&watcher, impl_->kv.get(), keys.c_str(), nullptr);
  if (s != NATS_OK) return nats_error(s, "watch " + impl_->bucket + "/" + keys);
  auto impl = std::make_unique<KvWatch::Impl>();
  impl->core = impl_->core;
  impl->kv = impl_->kv;
  impl->watcher = watcher;
  impl->delivery = std::make_shared<WatchDelivery>();
  impl->delivery->handler = std::move(handler);
  impl->keys = keys;
  impl->name = impl_->bucket + "/" + keys;
  auto* raw_impl = impl.get();
  impl->thread = std::thread([raw_impl] { raw_impl->run(); });
  return std::make_unique<KvWatch>(std::move(impl));
}

// ---- Connection: buckets ----

Result<KeyValue> Connection::ensure_kv(const KvConfig& config) {
  kvConfig cfg;
  kvConfig_Init(&cfg);
  cfg.Bucket = config.bucket.c_str();
  cfg.History = static_cast<uint8_t>(config.history);
  cfg.TTL = std::chrono::duration_cast<std::chrono::nanoseconds>(config.ttl).count();
  cfg.StorageType = config.storage == Storage::kMemory ? js_MemoryStorage : js_FileStorage;
  cfg.Replicas = config.replicas;

  kvStore* raw = nullptr;
  natsStatus s = js_CreateKeyValue(&raw, impl_->core->js, &cfg);
  if (s != NATS_OK) {
    // It exists with another config, or another process created it first: bind to it.
    const Error create_error = nats_error(s, "create bucket " + config.bucket);
    raw = nullptr;
    s = js_KeyValue(&raw, impl_->core->js, config.bucket.c_str());
    if (s != NATS_OK) return create_error;
  }
  auto impl = std::make_unique<KeyValue::Impl>();
  impl->core = impl_->core;
  impl->bucket = config.bucket;
  impl->kv = std::shared_ptr<kvStore>(raw, destroy_store);
  return KeyValue(std::move(impl));
}

}  // namespace cvm::bus
