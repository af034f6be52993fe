#pragma once
// A small result type: a value or an Error. C++20 has no std::expected; this keeps one error
// style across every layer (library errors are translated into Error at the edge).

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace cvm {

// Where an error came from. For kNats, `code` is the natsStatus and js_code the JetStream API
// error code when the server gave one (e.g. 10071 wrong last sequence).
enum class ErrorDomain { kNats, kSystem, kTool, kInvalid, kNotFound, kConflict, kTimeout };

struct Error {
  ErrorDomain domain = ErrorDomain::kInvalid;
  int code = 0;
  int js_code = 0;
  std::string message;

  [[nodiscard]] bool is_conflict() const { return domain == ErrorDomain::kConflict; }
  [[nodiscard]] bool is_not_found() const { return domain == ErrorDomain::kNotFound; }
  [[nodiscard]] bool is_timeout() const { return domain == ErrorDomain::kTimeout; }
};

inline Error make_error(ErrorDomain domain, std::string message, int code = 0) {
  return Error{domain, code, 0, std::move(message)};
}

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}      // NOLINT: implicit
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT: implicit

  [[nodiscard]] bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  [[nodiscard]] const Error& error() const {
    assert(!ok());
    return std::get<1>(v_);
  }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT: implicit

  [[nodiscard]] bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  [[nodiscard]] const Error& error() const {
    assert(!ok_);
    return error_;
  }

 private:
  Error error_;
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace cvm
