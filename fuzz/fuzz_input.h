#pragma once
// How the targets cut one fuzz input into parts. The framing is deliberately trivial (a flags
// byte, length-prefixed strings, then the rest) so the seed corpora stay readable and the fuzzer's
// mutations land mostly in the payload that the service would have read from the bus.

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace cvm::fuzz {

class Input {
 public:
  Input(const uint8_t* data, size_t size) : rest_(reinterpret_cast<const char*>(data), size) {}

  // One byte, 0 once the input is exhausted.
  uint8_t byte() {
    if (rest_.empty()) return 0;
    const auto b = static_cast<uint8_t>(rest_.front());
    rest_.remove_prefix(1);
    return b;
  }
  // A string of up to 255 bytes, its length in the first byte.
  std::string_view short_string() {
    const size_t n = std::min<size_t>(byte(), rest_.size());
    const std::string_view s = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return s;
  }
  // Everything not yet taken.
  std::string_view rest() {
    const std::string_view s = rest_;
    rest_ = {};
    return s;
  }

 private:
  std::string_view rest_;
};

// The service code parses with ParseFromArray / ParseFromString; both end in the same parser.
template <class Message>
bool parse(Message& m, std::string_view bytes) {
  return m.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

}  // namespace cvm::fuzz
