// Reading streams back: an ordered ephemeral consumer over one subject (history, then live), and
// the state of streams and their consumers. Synchronous on purpose: its users (cvmctl, the cluster
// exporter) own their loop, and nothing here runs a callback.

#include <algorithm>
#include <utility>

#include "internal.h"

namespace cvm::bus {

namespace {

using ConsumerListHandle = detail::CHandle<jsConsumerInfoList, jsConsumerInfoList_Destroy>;

bool is_token_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

}  // namespace

std::string inbox_prefix_for(std::string_view user) {
  if (user.empty()) return {};
  std::string prefix = "_INBOX_";
  for (char c : user) prefix += is_token_char(c) ? c : '_';
  return prefix;
}

struct StreamReader::Impl {
  // Keeps the connection's cnats objects alive for as long as the subscription.
  std::shared_ptr<detail::Core> core;
  std::unique_ptr<detail::SubHandle> sub;
};

StreamReader::StreamReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StreamReader::~StreamReader() = default;

Result<std::optional<StreamMessage>> StreamReader::next(std::chrono::milliseconds timeout) {
  natsMsg* raw = nullptr;
  const natsStatus s = natsSubscription_NextMsg(&raw, impl_->sub->sub, timeout.count());
  if (s == NATS_TIMEOUT) return std::optional<StreamMessage>{};
  if (s != NATS_OK) return nats_error(s, "read stream");
  detail::MsgHandle msg(raw);
  StreamMessage out;
  out.message = detail::copy_message(msg.get());
  jsMsgMetaData* meta_raw = nullptr;
  if (natsMsg_GetMetaData(&meta_raw, msg.get()) == NATS_OK) {
    detail::MetaDataHandle meta(meta_raw);
    out.stream_sequence = meta->Sequence.Stream;
    out.pending = meta->NumPending;
    out.timestamp_unix_ns = meta->Timestamp;
  }
  return std::optional<StreamMessage>(std::move(out));
}

Result<std::unique_ptr<StreamReader>> Connection::read_stream(const std::string& stream,
                                                              const std::string& subject) {
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Ordered = true;
  so.Config.DeliverPolicy = js_DeliverAll;
  natsSubscription* sub = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s =
      js_SubscribeSync(&sub, impl_->core->js, subject.c_str(), nullptr, &so, &jerr);
  if (s != NATS_OK) return nats_error(s, "read " + subject + " in " + stream, jerr);
  auto impl = std::make_unique<StreamReader::Impl>();
  impl->core = impl_->core;
  impl->sub = std::make_unique<detail::SubHandle>(sub);
  return std::make_unique<StreamReader>(std::move(impl));
}

Result<StreamState> Connection::stream_state(const std::string& stream) {
  jsStreamInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_GetStreamInfo(&raw, impl_->core->js, stream.c_str(), nullptr, &jerr);
  detail::StreamInfoHandle info(raw);
  if (s != NATS_OK) return nats_error(s, "state of stream " + stream, jerr);
  StreamState out;
  out.messages = info->State.Msgs;
  out.bytes = info->State.Bytes;
  out.first_sequence = info->State.FirstSeq;
  out.last_sequence = info->State.LastSeq;
  out.consumers = info->State.Consumers;
  return out;
}

Result<std::vector<ConsumerState>> Connection::consumer_states(const std::string& stream) {
  jsConsumerInfoList* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_Consumers(&raw, impl_->core->js, stream.c_str(), nullptr, &jerr);
  ConsumerListHandle list(raw);
  // A stream without consumers answers "not found" for the list, not for the stream.
  if (s == NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) return std::vector<ConsumerState>{};
  if (s != NATS_OK) return nats_error(s, "consumers of stream " + stream, jerr);
  std::vector<ConsumerState> out;
  for (int i = 0; i < list->Count; ++i) {
    const jsConsumerInfo* ci = list->List[i];
    ConsumerState c;
    c.name = ci->Name != nullptr ? ci->Name : "";
    if (ci->Config != nullptr && ci->Config->FilterSubject != nullptr) {
      c.filter_subject = ci->Config->FilterSubject;
    }
    c.pending = ci->NumPending;
    c.ack_pending = static_cast<uint64_t>(std::max<int64_t>(ci->NumAckPending, 0));
    c.redelivered = static_cast<uint64_t>(std::max<int64_t>(ci->NumRedelivered, 0));
    c.waiting = static_cast<uint64_t>(std::max<int64_t>(ci->NumWaiting, 0));
    out.push_back(std::move(c));
  }
  std::sort(out.begin(), out.end(),
            [](const ConsumerState& a, const ConsumerState& b) { return a.name < b.name; });
  return out;
}

}  // namespace cvm::bus
