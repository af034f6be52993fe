#include "durable_nodes.h"

#include <future>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include "cvm/base/clock.h"
#include "cvm/base/wire.h"
#include "cvm/service/events.h"
#include "cvm/service/streams.h"
#include "cvm/v1/build.pb.h"
#include "cvm/v1/node.pb.h"

namespace cvm::fault {

using namespace std::chrono_literals;

namespace {
int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}
}  // namespace

DurableNodes::DurableNodes(DurableNodesConfig config) : config_(std::move(config)) {}

DurableNodes::~DurableNodes() {
  boost::asio::post(io_, [this] {
    if (timer_) timer_->cancel();
    for (auto& n : nodes_) n->consumer.reset();
    io_.stop();
  });
  if (thread_.joinable()) thread_.join();
}

Status DurableNodes::start() {
  auto conn = bus::Connection::connect({.url = config_.nats_url, .name = "durable-nodes"},
                                       io_.get_executor());
  if (!conn) return conn.error();
  conn_ = *conn;
  thread_ = std::thread([this] {
    auto guard = boost::asio::make_work_guard(io_);
    io_.run();
  });
  std::promise<Status> started;
  boost::asio::post(io_, [this, &started] {
    auto st = [this]() -> Status {
      if (auto st = service::ensure_streams(*conn_); !st) return st;
      auto nodes = conn_->ensure_kv(service::nodes_bucket());
      if (!nodes) return nodes.error();
      nodes_kv_ = std::make_unique<bus::KeyValue>(std::move(*nodes));
      auto ws = conn_->ensure_kv(service::workspaces_bucket());
      if (!ws) return ws.error();
      workspaces_kv_ = std::make_unique<bus::KeyValue>(std::move(*ws));
      for (int i = 0; i < config_.nodes; ++i) {
        auto node = std::make_unique<Node>();
        node->id = config_.prefix + "-" + std::to_string(i);
        nodes_.push_back(std::move(node));
      }
      heartbeat();
      for (auto& n : nodes_) {
        bus::ConsumerConfig cc;
        cc.stream = std::string(wire::kStreamNodeWork);
        cc.durable = wire::agent_durable(n->id);
        cc.filter_subject = wire::node_work_subject(n->id);
        cc.ack_wait = 10s;
        Node* raw = n.get();
        auto c = conn_->pull_consume(cc, [this, raw](bus::JsMessagePtr m) { on_work(*raw, m); });
        if (!c) return c.error();
        n->consumer = std::move(*c);
      }
      timer_ = std::make_unique<boost::asio::steady_timer>(io_);
      return {};
    }();
    started.set_value(st);
    if (!st) return;
    // Heartbeats keep the nodes live for the scheduler, through server restarts too.
    schedule_heartbeat();
  });
  return started.get_future().get();
}

std::map<std::string, std::string> DurableNodes::launched_builds() {
  std::promise<std::map<std::string, std::string>> copy;
  boost::asio::post(io_, [this, &copy] { copy.set_value(build_node_); });
  return copy.get_future().get();
}

void DurableNodes::schedule_heartbeat() {
  timer_->expires_after(config_.heartbeat);
  timer_->async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    heartbeat();
    schedule_heartbeat();
  });
}

void DurableNodes::heartbeat() {
  for (auto& n : nodes_) {
    cvm::v1::NodeStatus s;
    s.set_node_id(n->id);
    auto* host = s.mutable_host();
    host->set_kernel_version("6.1.0-fault");
    host->set_idmapped_mounts(true);
    host->set_kernel_headers(true);
    host->set_virtualization("simulated VM");
    auto* rt = s.mutable_runtime();
    rt->set_runtime("sysbox-runc");
    rt->set_sysbox(true);
    rt->set_ready(true);
    s.mutable_capacity()->set_cpu_millicores(config_.cpu_millicores);
    s.mutable_capacity()->set_memory_bytes(config_.memory_bytes);
    s.mutable_allocated()->set_cpu_millicores(n->used_cpu);
    s.mutable_allocated()->set_memory_bytes(n->used_memory);
    s.set_workspaces(static_cast<uint32_t>(n->workspaces.size()));
    s.set_heartbeat_unix_ms(now_ms());
    s.set_started_unix_ms(now_ms());
    s.set_agent_version("fault-durable-node");
    (void)nodes_kv_->put(n->id, s.SerializeAsString());  // a missed beat is retried next tick
  }
}

void DurableNodes::on_work(Node& node, const bus::JsMessagePtr& msg) {
  cvm::v1::NodeAssignment a;
  if (!a.ParseFromString(std::string(msg->data())) || a.request().transition() != cvm::v1::START) {
    (void)msg->term();
    return;
  }
  const auto& req = a.request();
  const uint64_t cpu = req.resources().cpu_millicores() ? req.resources().cpu_millicores() : 1000;
  const uint64_t mem =
      req.resources().memory_bytes() ? req.resources().memory_bytes() : 512ULL << 20;
  if (!node.workspaces.contains(req.workspace_id())) {
    if (auto it = build_node_.find(req.build_id());
        it != build_node_.end() && it->second != node.id) {
      ++launched_twice_;
    }
    if (node.used_cpu + cpu > config_.cpu_millicores ||
        node.used_memory + mem > config_.memory_bytes) {
      ++over_capacity_;
    }
    node.used_cpu += cpu;
    node.used_memory += mem;
    node.workspaces.insert(req.workspace_id());
    build_node_[req.build_id()] = node.id;
    ++launched_;
  }
  SystemClock clock;
  auto e = service::make_event(req.build_id(), req.workspace_id(), cvm::v1::RUNNING, clock,
                               "fault-durable-node");
  e.set_node_id(node.id);
  if (auto ack = service::publish_event(*conn_, e); !ack) {
    (void)msg->nak(200ms);  // the server is away: the assignment comes back
    return;
  }
  cvm::v1::WorkspaceRecord r;
  r.set_workspace_id(req.workspace_id());
  r.set_node_id(node.id);
  r.set_build_id(req.build_id());
  r.set_phase(cvm::v1::RUNNING);
  r.set_desired(cvm::v1::START);
  *r.mutable_resources() = req.resources();
  r.set_lease_id(a.lease_id());
  r.set_updated_unix_ms(now_ms());
  if (auto put = workspaces_kv_->put(req.workspace_id(), r.SerializeAsString()); !put) {
    (void)msg->nak(200ms);
    return;
  }
  (void)msg->ack();
}

}  // namespace cvm::fault
