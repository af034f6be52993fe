#pragma once
// Prometheus metrics through prometheus-cpp. One Metrics object per process owns the registry and,
// when a listen address is given, the HTTP exposer serving /metrics.

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "cvm/base/result.h"

namespace prometheus {
class Exposer;
}

namespace cvm::telemetry {

using Labels = std::map<std::string, std::string>;

// Latency buckets in seconds, from 100 µs to 30 s: placement decisions are sub-millisecond while
// container launches take seconds, and both go into histograms of this shape.
const std::vector<double>& latency_buckets();

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Starts serving /metrics on HOST:PORT ("" or "off": no HTTP server). Port 0 picks a free port.
  Status listen(const std::string& host_port);
  // The bound port once listening (tests use port 0).
  [[nodiscard]] int port() const;

  prometheus::Registry& registry() { return *registry_; }
  std::shared_ptr<prometheus::Registry> registry_ptr() { return registry_; }

  // Families are created once per name; calling again with the same name returns the same one.
  prometheus::Counter& counter(const std::string& name, const std::string& help,
                               const Labels& labels = {});
  prometheus::Gauge& gauge(const std::string& name, const std::string& help,
                           const Labels& labels = {});
  prometheus::Histogram& histogram(const std::string& name, const std::string& help,
                                   const Labels& labels = {},
                                   const std::vector<double>& buckets = latency_buckets());

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::map<std::string, prometheus::Family<prometheus::Counter>*> counters_;
  std::map<std::string, prometheus::Family<prometheus::Gauge>*> gauges_;
  std::map<std::string, prometheus::Family<prometheus::Histogram>*> histograms_;
};

}  // namespace cvm::telemetry
