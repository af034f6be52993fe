#include "cvm/agent/cpu_pinning.h"

#include <algorithm>
#include <charconv>
#include <map>

namespace cvm::agent {

namespace {

std::optional<int> parse_cpu(std::string_view s) {
  int v = -1;
  const auto* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  if (ec != std::errc() || p != end || v < 0 || s.empty()) return std::nullopt;
  return v;
}

}  // namespace

std::optional<std::vector<int>> parse_cpu_list(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  std::vector<int> out;
  if (text.empty()) return out;
  // A bound on what one range may expand to: no node has more CPUs than this.
  constexpr int kMaxCpu = 1 << 16;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    const size_t dash = item.find('-');
    const auto lo = parse_cpu(item.substr(0, dash));
    const auto hi = dash == std::string_view::npos ? lo : parse_cpu(item.substr(dash + 1));
    if (!lo || !hi || *hi < *lo || *hi >= kMaxCpu) return std::nullopt;
    for (int c = *lo; c <= *hi; ++c) out.push_back(c);
    start = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string format_cpu_list(std::vector<int> cpus) {
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(cpus[i]);
    if (j > i) out += '-' + std::to_string(cpus[j]);
    i = j + 1;
  }
  return out;
}

std::vector<int> choose_cpus(const std::vector<int>& node_cpus, uint64_t millicores,
                             const std::vector<std::vector<int>>& pinned) {
  if (millicores == 0 || node_cpus.empty()) return {};
  const size_t want = std::min<size_t>((millicores + 999) / 1000, node_cpus.size());
  std::map<int, int> use;
  for (const auto& list : pinned) {
    for (int c : list) ++use[c];
  }
  std::vector<int> order = node_cpus;
  std::sort(order.begin(), order.end());
  order.erase(std::unique(order.begin(), order.end()), order.end());
  auto load = [&](int c) {
    const auto it = use.find(c);
    return it == use.end() ? 0 : it->second;
  };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load(a) < load(b); });
  order.resize(std::min(want, order.size()));
  std::sort(order.begin(), order.end());
  return order;
}

}  // namespace cvm::agent
