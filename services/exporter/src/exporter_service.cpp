#include "cvm/exporter/exporter_service.h"

#include <set>

#include <prometheus/counter.h>
#include <spdlog/spdlog.h>

#include "cvm/base/wire.h"
#include "cvm/service/streams.h"

namespace cvm::exporter {

ExporterService::ExporterService(boost::asio::io_context& io, bus::ConnectionPtr conn,
                                 telemetry::Metrics& metrics, Clock& clock, ExporterConfig config)
    : io_(io), conn_(std::move(conn)), metrics_(metrics), clock_(clock), config_(config) {
  read_errors_ = &metrics_.counter("cvm_exporter_read_errors_total",
                                   "Failed reads of consumer states from NATS.");
  for (const auto& f : cluster_families()) {
    families_[f.name] =
        &prometheus::BuildGauge().Name(f.name).Help(f.help).Register(metrics_.registry());
  }
}

ExporterService::~ExporterService() { stop(); }

Status ExporterService::start() {
  stopped_ = false;
  auto nodes = conn_->ensure_kv(service::nodes_bucket());
  if (!nodes) return nodes.error();
  auto leases = conn_->ensure_kv(service::gpu_leases_bucket());
  if (!leases) return leases.error();
  // Watches deliver every current value first, then changes: no polling of whole buckets.
  auto nw = nodes->watch(">", [this](std::optional<bus::KvEntry> e) {
    if (!e) return;
    if (e->op != bus::KvOp::kPut) {
      snapshot_.nodes.erase(e->key);
      return;
    }
    cvm::v1::NodeStatus n;
    if (n.ParseFromString(e->value)) {
      snapshot_.nodes[e->key] = std::move(n);
    } else {
      spdlog::warn("cvm_nodes/{} is not a NodeStatus; ignored", e->key);
    }
  });
  if (!nw) return nw.error();
  auto lw = leases->watch(">", [this](std::optional<bus::KvEntry> e) {
    if (!e) return;
    if (e->op != bus::KvOp::kPut) {
      snapshot_.leases.erase(e->key);
      return;
    }
    cvm::v1::GpuLease l;
    if (l.ParseFromString(e->value)) {
      snapshot_.leases[e->key] = std::move(l);
    } else {
      spdlog::warn("cvm_gpu_leases/{} is not a GpuLease; ignored", e->key);
    }
  });
  if (!lw) return lw.error();
  nodes_watch_ = std::move(*nw);
  leases_watch_ = std::move(*lw);
  timer_.emplace(io_);
  refresh();
  spdlog::info("cvm-exporter: watching {} and {}, refreshing every {} ms", wire::kBucketNodes,
               wire::kBucketGpuLeases, config_.interval.count());
  return {};
}

void ExporterService::stop() {
  stopped_ = true;
  if (timer_) timer_->cancel();
  nodes_watch_.reset();
  leases_watch_.reset();
}

void ExporterService::schedule() {
  if (stopped_ || !timer_) return;
  timer_->expires_after(config_.interval);
  timer_->async_wait([this](const boost::system::error_code& ec) {
    if (!ec) refresh();
  });
}

void ExporterService::refresh() {
  auto builds = conn_->consumer_states(std::string(wire::kStreamBuilds));
  auto work = conn_->consumer_states(std::string(wire::kStreamNodeWork));
  snapshot_.consumers_ok = builds.ok() && work.ok();
  if (snapshot_.consumers_ok) {
    snapshot_.build_consumers = std::move(*builds);
    snapshot_.work_consumers = std::move(*work);
  } else {
    // Stale backlog numbers would hide a backlog: drop them until a read succeeds.
    read_errors_->Increment();
    spdlog::warn("cannot read consumer states: {}",
                 (builds.ok() ? work.error() : builds.error()).message);
  }
  publish(cluster_samples(snapshot_, clock_.now_unix_ms(), config_.lost_after.count()));
  schedule();
}

void ExporterService::publish(const std::vector<Sample>& samples) {
  std::map<std::string, std::set<std::map<std::string, std::string>>> seen;
  for (const auto& s : samples) {
    auto fam = families_.find(s.name);
    if (fam == families_.end()) continue;
    auto& series = series_[s.name];
    auto it = series.find(s.labels);
    if (it == series.end()) it = series.emplace(s.labels, &fam->second->Add(s.labels)).first;
    it->second->Set(s.value);
    seen[s.name].insert(s.labels);
  }
  for (auto& [name, series] : series_) {
    for (auto it = series.begin(); it != series.end();) {
      if (seen[name].count(it->first) == 0) {
        families_[name]->Remove(it->second);
        it = series.erase(it);
      } else {
        ++it;
      }
    }
  }
}

}  // namespace cvm::exporter
