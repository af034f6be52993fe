#include "cvm/telemetry/metrics.h"

#include <exception>
#include <string>

#include <prometheus/exposer.h>

namespace cvm::telemetry {

const std::vector<double>& latency_buckets() {
  static const std::vector<double> buckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                              0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                              1,      2.5,     5,      10,    30};
  return buckets;
}

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {}
Metrics::~Metrics() = default;

Status Metrics::listen(const std::string& host_port) {
  if (host_port.empty() || host_port == "off") return {};
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(host_port);
    exposer_->RegisterCollectable(registry_);
  } catch (const std::exception& e) {
    return make_error(ErrorDomain::kSystem,
                      "cannot serve metrics on " + host_port + ": " + e.what());
  }
  return {};
}

int Metrics::port() const {
  if (!exposer_) return 0;
  const auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

prometheus::Counter& Metrics::counter(const std::string& name, const std::string& help,
                                      const Labels& labels) {
  auto& fam = counters_[name];
  if (fam == nullptr) fam = &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_);
  return fam->Add(labels);
}

prometheus::Gauge& Metrics::gauge(const std::string& name, const std::string& help,
                                  const Labels& labels) {
  auto& fam = gauges_[name];
  if (fam == nullptr) fam = &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
  return fam->Add(labels);
}

prometheus::Histogram& Metrics::histogram(const std::string& name, const std::string& help,
                                          const Labels& labels,
                                          const std::vector<double>& buckets) {
  auto& fam = histograms_[name];
  if (fam == nullptr) {
    fam = &prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_);
  }
  return fam->Add(labels, buckets);
}

}  // namespace cvm::telemetry
