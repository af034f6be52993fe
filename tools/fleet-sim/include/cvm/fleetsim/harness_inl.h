#pragma once
// Template parts of harness.h.

#include <pthread.h>

#include <future>
#include <utility>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

namespace cvm::fleetsim {

template <class Service, class Make>
Status Harness::host(Hosted<Service>& h, const std::string& name, Make&& make,
                     bool shared_delivery) {
  auto conn = bus::Connection::connect(
      {.url = url_, .name = name, .shared_delivery_threads = shared_delivery}, h.io.get_executor());
  if (!conn) return conn.error();
  h.conn = *conn;
  h.service = make(h);
  std::promise<Status> started;
  h.thread = std::thread([&h, &started, name] {
    // Named, so that top -H / perf show where the CPU goes (15 characters at most).
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    boost::asio::post(h.io, [&h, &started] { started.set_value(h.service->start()); });
    auto guard = boost::asio::make_work_guard(h.io);
    h.io.run();
  });
  auto st = started.get_future().get();
  h.running = true;
  if (!st) unhost(h);
  return st;
}

template <class Service>
void Harness::unhost(Hosted<Service>& h) {
  if (!h.running) return;
  h.running = false;
  boost::asio::post(h.io, [&h] {
    h.service->stop();
    h.io.stop();
  });
  if (h.thread.joinable()) h.thread.join();
  h.service.reset();
  h.conn.reset();
}

template <class Service, class Fn>
auto Harness::run_on(Hosted<Service>& h, Fn&& fn) -> decltype(fn(std::declval<Service&>())) {
  using R = decltype(fn(std::declval<Service&>()));
  std::packaged_task<R()> task([&] { return fn(*h.service); });
  auto result = task.get_future();
  boost::asio::post(h.io, [&task] { task(); });
  return result.get();
}

template <class Fn>
auto Harness::on_fleet(Fn&& fn) -> decltype(fn(std::declval<Fleet&>())) {
  return run_on(*fleet_, std::forward<Fn>(fn));
}

template <class Fn>
auto Harness::on_scheduler(size_t i, Fn&& fn)
    -> decltype(fn(std::declval<scheduler::SchedulerService&>())) {
  return run_on(*schedulers_.at(i), std::forward<Fn>(fn));
}

}  // namespace cvm::fleetsim
