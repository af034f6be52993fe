#pragma once
// Runs a function on an io_context's thread (where a service lives: its state is confined to
// that thread) and hands its result back to the calling test or benchmark thread.

#include <future>
#include <utility>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

namespace cvm::test {

template <class F>
auto run_on(boost::asio::io_context& io, F f) -> decltype(f()) {
  std::packaged_task<decltype(f())()> task(std::move(f));
  auto fut = task.get_future();
  boost::asio::post(io, [&task] { task(); });
  return fut.get();
}

}  // namespace cvm::test
