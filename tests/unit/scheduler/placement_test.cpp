#include "cvm/scheduler/placement.h"

#include <gtest/gtest.h>

#include <string>

namespace cvm::scheduler {
namespace {

// "n" + std::to_string(i) spelled so that GCC 12 at -O3 does not take the string's insert at 0 for
// an overlapping memcpy (a known GCC 12 -Wrestrict false positive).
std::string numbered(const char* prefix, int i) {
  std::string s(prefix);
  s += std::to_string(i);
  return s;
}

constexpr int64_t kNow = 1'700'000'000'000;
constexpr uint64_t kGiB = 1ULL << 30;

// A node that passes every filter for any request: live, ready, SELinux off, shiftfs, headers,
// bare metal, 16 cores, 64 GiB, nothing allocated, no GPUs.
class NodeBuilder {
 public:
  explicit NodeBuilder(std::string id) {
    s_.set_node_id(std::move(id));
    s_.set_heartbeat_unix_ms(kNow);
    s_.mutable_runtime()->set_ready(true);
    auto* host = s_.mutable_host();
    host->set_shiftfs_loaded(true);
    host->set_kernel_headers(true);
    host->set_bare_metal(true);
    s_.mutable_capacity()->set_cpu_millicores(16'000);
    s_.mutable_capacity()->set_memory_bytes(64 * kGiB);
  }
  NodeBuilder& heartbeat(int64_t ms) {
    s_.set_heartbeat_unix_ms(ms);
    return *this;
  }
  NodeBuilder& runtime_ready(bool v) {
    s_.mutable_runtime()->set_ready(v);
    return *this;
  }
  NodeBuilder& selinux(bool enabled, bool enforcing) {
    s_.mutable_host()->set_selinux_enabled(enabled);
    s_.mutable_host()->set_selinux_enforcing(enforcing);
    return *this;
  }
  NodeBuilder& shiftfs(bool loaded, bool available, bool idmapped) {
    s_.mutable_host()->set_shiftfs_loaded(loaded);
    s_.mutable_host()->set_shiftfs_module_available(available);
    s_.mutable_host()->set_idmapped_mounts(idmapped);
    return *this;
  }
  NodeBuilder& kernel_headers(bool v) {
    s_.mutable_host()->set_kernel_headers(v);
    return *this;
  }
  NodeBuilder& bare_metal(bool v) {
    s_.mutable_host()->set_bare_metal(v);
    if (!v) s_.mutable_host()->set_virtualization("Google Compute Engine");
    return *this;
  }
  NodeBuilder& capacity(uint64_t cpu, uint64_t mem) {
    s_.mutable_capacity()->set_cpu_millicores(cpu);
    s_.mutable_capacity()->set_memory_bytes(mem);
    return *this;
  }
  NodeBuilder& allocated(uint64_t cpu, uint64_t mem) {
    s_.mutable_allocated()->set_cpu_millicores(cpu);
    s_.mutable_allocated()->set_memory_bytes(mem);
    return *this;
  }
  NodeBuilder& gpu(std::string uuid, uint32_t minor, uint64_t mem, bool healthy = true,
                   cvm::v1::GpuVendor vendor = cvm::v1::NVIDIA) {
    auto* g = s_.add_gpus();
    g->set_uuid(std::move(uuid));
    g->set_minor(minor);
    g->set_memory_bytes(mem);
    g->set_healthy(healthy);
    g->set_vendor(vendor);
    return *this;
  }
  const cvm::v1::NodeStatus& status() const { return s_; }
  operator const cvm::v1::NodeStatus&() const { return s_; }  // NOLINT: test sugar

 private:
  cvm::v1::NodeStatus s_;
};

PlacementOptions opts(cvm::v1::ScoringStrategy strategy = cvm::v1::BINPACK) {
  PlacementOptions o;
  o.now_unix_ms = kNow;
  o.strategy = strategy;
  return o;
}

PlacementRequest cvm_request() {
  PlacementRequest r;
  r.cpu_millicores = 1000;
  r.memory_bytes = 1 * kGiB;
  return r;
}

PlacementRequest cached_cvm(bool auto_load) {
  PlacementRequest r = cvm_request();
  r.caching = true;
  r.auto_load_shiftfs = auto_load;
  return r;
}

PlacementRequest gpu_request(uint32_t count, uint64_t min_mem = 0) {
  PlacementRequest r = cvm_request();
  r.gpu_count = count;
  r.gpu_min_memory_bytes = min_mem;
  return r;
}

size_t rejected(const PlacementDecision& d, Filter f) {
  return d.stats.rejected[static_cast<size_t>(f)];
}

// Places the request on an index holding only `node` and expects it to be refused by `filter`.
void expect_single_rejection(const NodeBuilder& node, const PlacementRequest& request,
                             Filter filter, cvm::v1::Reason reason) {
  NodeIndex index;
  index.upsert(node);
  const auto d = place(index, request, opts());
  ASSERT_FALSE(d.ok()) << filter_id(filter);
  EXPECT_EQ(rejected(d, filter), 1u) << d.message;
  EXPECT_EQ(d.reason, reason) << d.message;
  EXPECT_EQ(d.message, "0/1 nodes fit: 1 " + std::string(filter_text(filter)));
  EXPECT_TRUE(d.candidates.empty());
}

void expect_fits(const NodeBuilder& node, const PlacementRequest& request) {
  NodeIndex index;
  index.upsert(node);
  const auto d = place(index, request, opts());
  ASSERT_TRUE(d.ok()) << d.message;
  EXPECT_EQ(d.best().node_id, node.status().node_id());
}

// --- defaults and settings ---------------------------------------------------------------------

TEST(Defaults, ZeroCpuAndMemoryMeanTheDefaults) {
  EXPECT_EQ(kDefaultCpuMillicores, 1000u);
  EXPECT_EQ(kDefaultMemoryBytes, 512ULL * 1024 * 1024);
  EXPECT_EQ(effective_cpu(0), 1000u);
  EXPECT_EQ(effective_memory(0), 512ULL * 1024 * 1024);
  EXPECT_EQ(effective_cpu(250), 250u);
  EXPECT_EQ(effective_memory(7), 7u);
  const auto r = reservation_for(PlacementRequest{});
  EXPECT_EQ(r.cpu_millicores, 1000u);
  EXPECT_EQ(r.memory_bytes, 512ULL * 1024 * 1024);
  EXPECT_EQ(r.gpus, 0u);
}

TEST(Defaults, ZeroRequestNeedsDefaultRoom) {
  PlacementRequest r;  // zero cpu and memory
  // Exactly the defaults free: fits.
  expect_fits(NodeBuilder("n").capacity(1000, kDefaultMemoryBytes), r);
  // One millicore short of the default.
  expect_single_rejection(NodeBuilder("n").capacity(999, kGiB), r, Filter::kCpu,
                          cvm::v1::NO_ELIGIBLE_NODE);
  // One byte short of the default.
  expect_single_rejection(NodeBuilder("n").capacity(1000, kDefaultMemoryBytes - 1), r,
                          Filter::kMemory, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Settings, MissingKeyMeansDocumentedDefaults) {
  const auto s = effective_settings(nullptr);
  EXPECT_TRUE(s.cvm_enabled);
  EXPECT_TRUE(s.default_to_cvm);
  EXPECT_FALSE(s.caching);
  EXPECT_FALSE(s.auto_load_shiftfs);
  EXPECT_EQ(s.scoring, cvm::v1::BINPACK);
}

TEST(Settings, UnsetOptionalsKeepTheirOnDefault) {
  cvm::v1::InfrastructureSettings in;
  in.set_caching(true);
  const auto s = effective_settings(&in);
  EXPECT_TRUE(s.cvm_enabled);
  EXPECT_TRUE(s.default_to_cvm);
  EXPECT_TRUE(s.caching);
}

TEST(Settings, ExplicitValuesWin) {
  cvm::v1::InfrastructureSettings in;
  in.set_cvm_enabled(false);
  in.set_default_to_cvm(false);
  in.set_auto_load_shiftfs(true);
  in.set_scoring(cvm::v1::SPREAD);
  const auto s = effective_settings(&in);
  EXPECT_FALSE(s.cvm_enabled);
  EXPECT_FALSE(s.default_to_cvm);
  EXPECT_TRUE(s.auto_load_shiftfs);
  EXPECT_EQ(s.scoring, cvm::v1::SPREAD);
}

TEST(MakeRequest, CopiesResourcesAndSettings) {
  cvm::v1::BuildRequest b;
  b.mutable_resources()->set_cpu_millicores(1500);
  b.mutable_resources()->set_memory_bytes(3 * kGiB);
  b.mutable_resources()->mutable_gpu()->set_count(2);
  b.mutable_resources()->mutable_gpu()->set_vendor(cvm::v1::NVIDIA);
  b.mutable_resources()->mutable_gpu()->set_min_memory_bytes(16 * kGiB);
  EffectiveSettings s;
  s.caching = true;
  s.auto_load_shiftfs = true;
  const auto r = make_placement_request(b, s);
  EXPECT_EQ(r.cpu_millicores, 1500u);
  EXPECT_EQ(r.memory_bytes, 3 * kGiB);
  EXPECT_EQ(r.gpu_count, 2u);
  EXPECT_EQ(r.gpu_vendor, cvm::v1::NVIDIA);
  EXPECT_EQ(r.gpu_min_memory_bytes, 16 * kGiB);
  EXPECT_TRUE(r.cvm);
  EXPECT_TRUE(r.cvm_enabled);
  EXPECT_TRUE(r.caching);
  EXPECT_TRUE(r.auto_load_shiftfs);
}

TEST(MakeRequest, UseCvmOverridesTheDefault) {
  cvm::v1::BuildRequest b;
  EffectiveSettings s;
  EXPECT_TRUE(make_placement_request(b, s).cvm);  // default to CVM
  s.default_to_cvm = false;
  EXPECT_FALSE(make_placement_request(b, s).cvm);
  b.set_use_cvm(true);
  EXPECT_TRUE(make_placement_request(b, s).cvm);
  s.default_to_cvm = true;
  b.set_use_cvm(false);
  EXPECT_FALSE(make_placement_request(b, s).cvm);
}

TEST(MakeRequest, DisabledCvmsMakePlainContainersUnlessAskedExplicitly) {
  cvm::v1::BuildRequest b;
  EffectiveSettings s;
  s.cvm_enabled = false;
  s.default_to_cvm = true;  // meaningless while CVMs are off
  auto r = make_placement_request(b, s);
  EXPECT_FALSE(r.cvm);
  EXPECT_FALSE(check_request(r).has_value());
  b.set_use_cvm(true);
  r = make_placement_request(b, s);
  EXPECT_TRUE(r.cvm);
  ASSERT_TRUE(check_request(r).has_value());
  EXPECT_EQ(check_request(r)->reason, cvm::v1::CVM_DISABLED);
}

// --- request-level rules -----------------------------------------------------------------------

TEST(RequestRules, CvmDisabled) {
  NodeIndex index;
  index.upsert(NodeBuilder("n1"));
  PlacementRequest r = cvm_request();
  r.cvm_enabled = false;
  const auto d = place(index, r, opts());
  EXPECT_EQ(d.reason, cvm::v1::CVM_DISABLED);
  EXPECT_FALSE(d.message.empty());
  EXPECT_EQ(d.stats.evaluated, 0u);  // decided before any node
  r.cvm = false;
  EXPECT_TRUE(place(index, r, opts()).ok());
}

TEST(RequestRules, AmdGpuIsUnsupported) {
  NodeIndex index;
  index.upsert(NodeBuilder("n1").gpu("GPU-a", 0, 16 * kGiB));
  PlacementRequest r = gpu_request(1);
  r.gpu_vendor = cvm::v1::AMD;
  const auto d = place(index, r, opts());
  EXPECT_EQ(d.reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  EXPECT_NE(d.message.find("AMD"), std::string::npos) << d.message;
  EXPECT_EQ(d.stats.evaluated, 0u);
}

TEST(RequestRules, AmdVendorWithoutGpusIsIgnored) {
  PlacementRequest r = cvm_request();
  r.gpu_vendor = cvm::v1::AMD;  // count 0: no GPU asked for
  EXPECT_FALSE(check_request(r).has_value());
}

TEST(RequestRules, UnspecifiedAndNvidiaVendorsAreAccepted) {
  PlacementRequest r = gpu_request(1);
  EXPECT_FALSE(check_request(r).has_value());
  r.gpu_vendor = cvm::v1::NVIDIA;
  EXPECT_FALSE(check_request(r).has_value());
}

TEST(RequestRules, GpuWithCachingIsUnsupported) {
  PlacementRequest r = gpu_request(1);
  r.caching = true;
  const auto d = place(NodeIndex{}, r, opts());
  EXPECT_EQ(d.reason, cvm::v1::GPU_WITH_CACHING_UNSUPPORTED);
}

TEST(RequestRules, GpuWithCachingIsFineForPlainContainers) {
  PlacementRequest r = gpu_request(1);
  r.caching = true;
  r.cvm = false;  // Caching only applies to CVMs
  EXPECT_FALSE(check_request(r).has_value());
  expect_fits(NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB), r);
}

TEST(RequestRules, OrderCvmDisabledThenVendorThenCaching) {
  PlacementRequest r = gpu_request(1);
  r.gpu_vendor = cvm::v1::AMD;
  r.caching = true;
  r.cvm_enabled = false;
  EXPECT_EQ(check_request(r)->reason, cvm::v1::CVM_DISABLED);
  r.cvm_enabled = true;
  EXPECT_EQ(check_request(r)->reason, cvm::v1::GPU_VENDOR_UNSUPPORTED);
  r.gpu_vendor = cvm::v1::NVIDIA;
  EXPECT_EQ(check_request(r)->reason, cvm::v1::GPU_WITH_CACHING_UNSUPPORTED);
}

TEST(RequestRules, CheckedEvenWithNoNodes) {
  PlacementRequest r = cvm_request();
  r.cvm_enabled = false;
  EXPECT_EQ(place(NodeIndex{}, r, opts()).reason, cvm::v1::CVM_DISABLED);
}

// --- each filter -------------------------------------------------------------------------------

TEST(Filters, IdsAndTextsAreStableAndDistinct) {
  EXPECT_EQ(filter_id(Filter::kNodeLive), "node-live");
  EXPECT_EQ(filter_id(Filter::kRuntimeReady), "runtime-ready");
  EXPECT_EQ(filter_id(Filter::kSelinuxEnforcing), "selinux-enforcing");
  EXPECT_EQ(filter_id(Filter::kSelinuxEnabled), "selinux-enabled");
  EXPECT_EQ(filter_id(Filter::kCachingShiftfs), "caching-shiftfs");
  EXPECT_EQ(filter_id(Filter::kKernelHeaders), "kernel-headers");
  EXPECT_EQ(filter_id(Filter::kGpuBareMetal), "gpu-bare-metal");
  EXPECT_EQ(filter_id(Filter::kGpuAvailable), "gpu-available");
  EXPECT_EQ(filter_id(Filter::kCpu), "cpu");
  EXPECT_EQ(filter_id(Filter::kMemory), "memory");
  EXPECT_EQ(filter_text(Filter::kSelinuxEnforcing), "SELinux enforcing");
  EXPECT_EQ(filter_text(Filter::kGpuBareMetal), "GPU requires bare metal");
  EXPECT_EQ(filter_text(Filter::kMemory), "insufficient memory");
  for (size_t i = 0; i < kFilterCount; ++i) {
    for (size_t j = i + 1; j < kFilterCount; ++j) {
      EXPECT_NE(filter_id(static_cast<Filter>(i)), filter_id(static_cast<Filter>(j)));
      EXPECT_NE(filter_text(static_cast<Filter>(i)), filter_text(static_cast<Filter>(j)));
    }
  }
}

TEST(Filters, CapacityFilters) {
  EXPECT_TRUE(is_capacity_filter(Filter::kCpu));
  EXPECT_TRUE(is_capacity_filter(Filter::kMemory));
  EXPECT_TRUE(is_capacity_filter(Filter::kGpuAvailable));
  EXPECT_FALSE(is_capacity_filter(Filter::kGpuBareMetal));
  EXPECT_FALSE(is_capacity_filter(Filter::kNodeLive));
  EXPECT_FALSE(is_capacity_filter(Filter::kSelinuxEnforcing));
}

TEST(Filters, NodeLive) {
  expect_single_rejection(NodeBuilder("n").heartbeat(kNow - 60'000), cvm_request(),
                          Filter::kNodeLive, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, NodeLiveTtlBoundary) {
  const int64_t ttl = kDefaultLivenessTtlMs;
  expect_fits(NodeBuilder("n").heartbeat(kNow - ttl), cvm_request());  // exactly the TTL: live
  expect_single_rejection(NodeBuilder("n").heartbeat(kNow - ttl - 1), cvm_request(),
                          Filter::kNodeLive, cvm::v1::NO_ELIGIBLE_NODE);
  // A heartbeat from a clock slightly ahead is live.
  expect_fits(NodeBuilder("n").heartbeat(kNow + 5'000), cvm_request());
}

TEST(Filters, NodeLiveCustomTtl) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").heartbeat(kNow - 2'000));
  PlacementOptions o = opts();
  o.liveness_ttl_ms = 2'000;
  EXPECT_TRUE(place(index, cvm_request(), o).ok());
  o.liveness_ttl_ms = 1'999;
  EXPECT_EQ(rejected(place(index, cvm_request(), o), Filter::kNodeLive), 1u);
  o.liveness_ttl_ms = 2'000;
  o.now_unix_ms = kNow + 1;  // time passes, nothing else changes
  EXPECT_EQ(rejected(place(index, cvm_request(), o), Filter::kNodeLive), 1u);
}

TEST(Filters, LivenessAppliesToPlainContainersToo) {
  PlacementRequest r = cvm_request();
  r.cvm = false;
  expect_single_rejection(NodeBuilder("n").heartbeat(0), r, Filter::kNodeLive,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, RuntimeReady) {
  expect_single_rejection(NodeBuilder("n").runtime_ready(false), cvm_request(),
                          Filter::kRuntimeReady, cvm::v1::NO_ELIGIBLE_NODE);
  PlacementRequest plain = cvm_request();
  plain.cvm = false;
  expect_single_rejection(NodeBuilder("n").runtime_ready(false), plain, Filter::kRuntimeReady,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, SelinuxEnforcing) {
  expect_single_rejection(NodeBuilder("n").selinux(true, true), cvm_request(),
                          Filter::kSelinuxEnforcing, cvm::v1::NO_ELIGIBLE_NODE);
  // Enforcing reported without "enabled" is still enforcing.
  expect_single_rejection(NodeBuilder("n").selinux(false, true), cvm_request(),
                          Filter::kSelinuxEnforcing, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, SelinuxPermissiveIsStillIneligible) {
  expect_single_rejection(NodeBuilder("n").selinux(true, false), cvm_request(),
                          Filter::kSelinuxEnabled, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, SelinuxDoesNotMatterForPlainContainers) {
  PlacementRequest r = cvm_request();
  r.cvm = false;
  expect_fits(NodeBuilder("n").selinux(true, true), r);
}

TEST(Filters, CachingNeedsShiftfsOrIdmappedMounts) {
  const auto none = NodeBuilder("n").shiftfs(false, false, false);
  expect_single_rejection(none, cached_cvm(false), Filter::kCachingShiftfs,
                          cvm::v1::NO_ELIGIBLE_NODE);
  expect_fits(NodeBuilder("n").shiftfs(true, false, false), cached_cvm(false));
  expect_fits(NodeBuilder("n").shiftfs(false, true, false), cached_cvm(false));
  expect_fits(NodeBuilder("n").shiftfs(false, false, true), cached_cvm(false));
}

TEST(Filters, ShiftfsNotNeededWithoutCachingOrForPlainContainers) {
  const auto none = NodeBuilder("n").shiftfs(false, false, false).kernel_headers(false);
  expect_fits(none, cvm_request());
  PlacementRequest plain = cached_cvm(true);
  plain.cvm = false;
  expect_fits(none, plain);
}

TEST(Filters, AutoLoadShiftfsNeedsKernelHeaders) {
  expect_single_rejection(NodeBuilder("n").kernel_headers(false), cached_cvm(true),
                          Filter::kKernelHeaders, cvm::v1::NO_ELIGIBLE_NODE);
  expect_fits(NodeBuilder("n").kernel_headers(false), cached_cvm(false));
}

TEST(Filters, AutoLoadWithoutCachingNeedsNoHeaders) {
  // The mount table marks Auto-load "n/a" while Caching is off: nothing is loaded, so no headers.
  PlacementRequest r = cvm_request();
  r.auto_load_shiftfs = true;
  expect_fits(NodeBuilder("n").kernel_headers(false), r);
}

TEST(Filters, GpuRequiresBareMetal) {
  expect_single_rejection(NodeBuilder("n").bare_metal(false).gpu("GPU-a", 0, 16 * kGiB),
                          gpu_request(1), Filter::kGpuBareMetal, cvm::v1::GPU_REQUIRES_BARE_METAL);
}

TEST(Filters, BareMetalNotNeededWithoutGpus) {
  expect_fits(NodeBuilder("n").bare_metal(false), cvm_request());
}

TEST(Filters, GpuBareMetalAppliesToPlainContainers) {
  PlacementRequest r = gpu_request(1);
  r.cvm = false;
  expect_single_rejection(NodeBuilder("n").bare_metal(false).gpu("GPU-a", 0, 16 * kGiB), r,
                          Filter::kGpuBareMetal, cvm::v1::GPU_REQUIRES_BARE_METAL);
}

TEST(Filters, GpuCount) {
  const auto two = NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB).gpu("GPU-b", 1, 16 * kGiB);
  expect_fits(two, gpu_request(2));
  expect_single_rejection(two, gpu_request(3), Filter::kGpuAvailable, cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(NodeBuilder("n"), gpu_request(1), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, UnhealthyGpusDoNotCount) {
  const auto n = NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB).gpu("GPU-b", 1, 16 * kGiB, false);
  expect_fits(n, gpu_request(1));
  expect_single_rejection(n, gpu_request(2), Filter::kGpuAvailable, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, AmdGpusOnTheNodeDoNotCount) {
  const auto n = NodeBuilder("n")
                     .gpu("GPU-a", 0, 16 * kGiB)
                     .gpu("AMD-b", 1, 16 * kGiB, true, cvm::v1::AMD)
                     .gpu("X-c", 2, 16 * kGiB, true, cvm::v1::GPU_VENDOR_UNSPECIFIED);
  expect_fits(n, gpu_request(1));
  expect_single_rejection(n, gpu_request(2), Filter::kGpuAvailable, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, GpuMinMemory) {
  const auto n = NodeBuilder("n").gpu("GPU-small", 0, 8 * kGiB).gpu("GPU-big", 1, 40 * kGiB);
  expect_fits(n, gpu_request(1, 40 * kGiB));  // exactly the minimum fits
  expect_fits(n, gpu_request(2, 8 * kGiB));
  expect_single_rejection(n, gpu_request(2, 16 * kGiB), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(n, gpu_request(1, 40 * kGiB + 1), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, GpuMinMemoryIsExactToTheByte) {
  // The index keeps GPU sizes in MiB for its fast checks; the decision must stay byte-exact.
  const uint64_t odd = 16 * kGiB + 100;
  const auto n = NodeBuilder("n").gpu("GPU-a", 0, odd);
  expect_fits(n, gpu_request(1, odd));
  expect_single_rejection(n, gpu_request(1, odd + 1), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
  const auto mixed = NodeBuilder("m").gpu("GPU-a", 0, 8 * kGiB).gpu("GPU-b", 1, odd);
  expect_fits(mixed, gpu_request(1, odd));
  expect_single_rejection(mixed, gpu_request(1, odd + 1), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, GpuMinMemoryIgnoredWithoutGpus) {
  PlacementRequest r = cvm_request();
  r.gpu_min_memory_bytes = 80 * kGiB;  // count 0
  expect_fits(NodeBuilder("n"), r);
}

TEST(Filters, LeasedGpusDoNotCount) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB).gpu("GPU-b", 1, 16 * kGiB));
  EXPECT_TRUE(place(index, gpu_request(2), opts()).ok());
  index.set_gpu_leased("n", "GPU-a", true);
  EXPECT_EQ(rejected(place(index, gpu_request(2), opts()), Filter::kGpuAvailable), 1u);
  EXPECT_TRUE(place(index, gpu_request(1), opts()).ok());
  index.set_gpu_leased("n", "GPU-a", false);
  EXPECT_TRUE(place(index, gpu_request(2), opts()).ok());
}

TEST(Filters, LeasedBigGpuLeavesOnlySmallOnes) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").gpu("GPU-small", 0, 8 * kGiB).gpu("GPU-big", 1, 40 * kGiB));
  index.set_gpu_leased("n", "GPU-big", true);
  EXPECT_EQ(rejected(place(index, gpu_request(1, 16 * kGiB), opts()), Filter::kGpuAvailable), 1u);
  EXPECT_TRUE(place(index, gpu_request(1, 8 * kGiB), opts()).ok());
}

TEST(Filters, LeasesSeenBeforeRegistrationAndKeptAcrossUpserts) {
  NodeIndex index;
  index.set_gpu_leased("n", "GPU-a", true);  // the lease watch can run ahead of the node watch
  const auto node = NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB);
  index.upsert(node);
  EXPECT_FALSE(place(index, gpu_request(1), opts()).ok());
  index.upsert(node);  // heartbeat
  EXPECT_FALSE(place(index, gpu_request(1), opts()).ok());
  index.set_gpu_leased("n", "GPU-a", false);
  EXPECT_TRUE(place(index, gpu_request(1), opts()).ok());
}

TEST(Filters, Cpu) {
  expect_single_rejection(NodeBuilder("n").capacity(4000, 64 * kGiB).allocated(3500, 0),
                          cvm_request(), Filter::kCpu, cvm::v1::NO_ELIGIBLE_NODE);
  expect_fits(NodeBuilder("n").capacity(4000, 64 * kGiB).allocated(3000, 0), cvm_request());
}

TEST(Filters, Memory) {
  expect_single_rejection(NodeBuilder("n").capacity(4000, 4 * kGiB).allocated(0, 3 * kGiB + 1),
                          cvm_request(), Filter::kMemory, cvm::v1::NO_ELIGIBLE_NODE);
  expect_fits(NodeBuilder("n").capacity(4000, 4 * kGiB).allocated(0, 3 * kGiB), cvm_request());
}

TEST(Filters, OverAllocatedNodeHasNoRoom) {
  // An agent may report more allocated than capacity (e.g. capacity shrank): no room, no wrap.
  expect_single_rejection(NodeBuilder("n").capacity(1000, 64 * kGiB).allocated(5000, 0),
                          cvm_request(), Filter::kCpu, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, NodeWithoutReportedCapacityHasNoRoom) {
  expect_single_rejection(NodeBuilder("n").capacity(0, 0), cvm_request(), Filter::kCpu,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, FirstRejectingFilterCountsTheNode) {
  // Fails everything: counted once, under the first filter of the pipeline.
  const auto bad = NodeBuilder("n")
                       .heartbeat(0)
                       .runtime_ready(false)
                       .selinux(true, true)
                       .shiftfs(false, false, false)
                       .kernel_headers(false)
                       .bare_metal(false)
                       .capacity(0, 0);
  expect_single_rejection(bad, gpu_request(1), Filter::kNodeLive, cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(
      NodeBuilder(bad.status().node_id()).runtime_ready(false).selinux(true, true), cvm_request(),
      Filter::kRuntimeReady, cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(NodeBuilder("n").selinux(true, true).shiftfs(false, false, false),
                          cached_cvm(false), Filter::kSelinuxEnforcing, cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(NodeBuilder("n").shiftfs(false, false, false).kernel_headers(false),
                          cached_cvm(true), Filter::kCachingShiftfs, cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(NodeBuilder("n").bare_metal(false).capacity(0, 0), gpu_request(1),
                          Filter::kGpuBareMetal, cvm::v1::GPU_REQUIRES_BARE_METAL);
  expect_single_rejection(NodeBuilder("n").capacity(0, 0), gpu_request(1), Filter::kGpuAvailable,
                          cvm::v1::NO_ELIGIBLE_NODE);
  expect_single_rejection(NodeBuilder("n").capacity(0, 0), cvm_request(), Filter::kCpu,
                          cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Filters, GpuMemoryShortfallDoesNotHideCpuOrder) {
  // GPUs fit, cpu does not: the node is counted under cpu, not GPUs.
  expect_single_rejection(NodeBuilder("n").capacity(500, 64 * kGiB).gpu("GPU-a", 0, 40 * kGiB),
                          gpu_request(1, 16 * kGiB), Filter::kCpu, cvm::v1::NO_ELIGIBLE_NODE);
}

// --- message and reason ------------------------------------------------------------------------

TEST(Message, NoNodesRegistered) {
  const auto d = place(NodeIndex{}, cvm_request(), opts());
  EXPECT_EQ(d.reason, cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(d.message, "0/0 nodes fit: no nodes registered");
  EXPECT_EQ(d.stats.nodes, 0u);
}

TEST(Message, KubeSchedulerStyleSortedByCountThenName) {
  NodeIndex index;
  int i = 0;
  auto id = [&] { return numbered("n", i++); };
  for (int k = 0; k < 5; ++k) index.upsert(NodeBuilder(id()).selinux(true, true));
  for (int k = 0; k < 4; ++k) index.upsert(NodeBuilder(id()).bare_metal(false));
  for (int k = 0; k < 3; ++k) index.upsert(NodeBuilder(id()).capacity(16'000, 1));
  const auto d = place(index, gpu_request(0), opts());
  ASSERT_TRUE(d.ok());  // no GPU asked: the cloud VMs fit

  NodeIndex gpu_index;
  i = 0;
  for (int k = 0; k < 5; ++k) {
    gpu_index.upsert(NodeBuilder(id()).selinux(true, true).gpu(numbered("G", k), 0, kGiB));
  }
  for (int k = 0; k < 4; ++k) gpu_index.upsert(NodeBuilder(id()).bare_metal(false));
  for (int k = 0; k < 3; ++k) {
    gpu_index.upsert(NodeBuilder(id()).capacity(16'000, 1).gpu(numbered("H", k), 0, kGiB));
  }
  const auto f = place(gpu_index, gpu_request(1), opts());
  EXPECT_EQ(f.reason, cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(
      f.message,
      "0/12 nodes fit: 5 SELinux enforcing, 4 GPU requires bare metal, 3 insufficient memory");
  EXPECT_EQ(f.stats.nodes, 12u);
  EXPECT_EQ(f.stats.evaluated, 12u);
  EXPECT_EQ(f.stats.feasible, 0u);
}

TEST(Message, EqualCountsSortByName) {
  PlacementStats s;
  s.nodes = 6;
  s.rejected[static_cast<size_t>(Filter::kMemory)] = 2;
  s.rejected[static_cast<size_t>(Filter::kCpu)] = 2;
  s.rejected[static_cast<size_t>(Filter::kRuntimeReady)] = 2;
  EXPECT_EQ(rejection_message(s),
            "0/6 nodes fit: 2 insufficient cpu, 2 insufficient memory, 2 runtime not ready");
}

TEST(Message, SingleFilter) {
  PlacementStats s;
  s.nodes = 3;
  s.rejected[static_cast<size_t>(Filter::kNodeLive)] = 3;
  EXPECT_EQ(rejection_message(s), "0/3 nodes fit: 3 node not live");
}

TEST(Reason, AllBareMetalRejectionsGiveGpuRequiresBareMetal) {
  NodeIndex index;
  for (int k = 0; k < 3; ++k) index.upsert(NodeBuilder(numbered("vm", k)).bare_metal(false));
  const auto d = place(index, gpu_request(1), opts());
  EXPECT_EQ(d.reason, cvm::v1::GPU_REQUIRES_BARE_METAL);
  EXPECT_EQ(d.message, "0/3 nodes fit: 3 GPU requires bare metal");
}

TEST(Reason, OnlyCapacityRejectionsAreStillNoEligibleNode) {
  NodeIndex index;
  index.upsert(NodeBuilder("a").capacity(100, 64 * kGiB).gpu("G1", 0, kGiB));
  index.upsert(NodeBuilder("b").capacity(16'000, 1).gpu("G2", 0, kGiB));
  index.upsert(NodeBuilder("c"));  // no GPUs
  const auto d = place(index, gpu_request(1), opts());
  EXPECT_EQ(d.reason, cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(d.message,
            "0/3 nodes fit: 1 insufficient GPUs, 1 insufficient cpu, 1 insufficient memory");
}

TEST(Reason, BareMetalMixedWithCapacityIsNoEligibleNode) {
  NodeIndex index;
  index.upsert(NodeBuilder("vm").bare_metal(false));
  index.upsert(NodeBuilder("full").gpu("G1", 0, kGiB).capacity(100, 64 * kGiB));
  EXPECT_EQ(place(index, gpu_request(1), opts()).reason, cvm::v1::NO_ELIGIBLE_NODE);
}

TEST(Reason, CapabilityMixedWithCapacityIsNoEligibleNode) {
  NodeIndex index;
  index.upsert(NodeBuilder("se").selinux(true, true));
  index.upsert(NodeBuilder("full").capacity(100, 64 * kGiB));
  const auto d = place(index, cvm_request(), opts());
  EXPECT_EQ(d.reason, cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(d.message, "0/2 nodes fit: 1 SELinux enforcing, 1 insufficient cpu");
}

// --- scoring -----------------------------------------------------------------------------------

NodeIndex three_loads() {
  NodeIndex index;
  // Same capacity, 10%, 50%, 80% used.
  index.upsert(NodeBuilder("low").capacity(10'000, 10 * kGiB).allocated(1'000, 1 * kGiB));
  index.upsert(NodeBuilder("mid").capacity(10'000, 10 * kGiB).allocated(5'000, 5 * kGiB));
  index.upsert(NodeBuilder("high").capacity(10'000, 10 * kGiB).allocated(8'000, 8 * kGiB));
  return index;
}

TEST(Scoring, BinpackPrefersTheFullestNodeAfterPlacement) {
  const auto d = place(three_loads(), cvm_request(), opts(cvm::v1::BINPACK));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.best().node_id, "high");
  // (8000+1000)/10000 and (8+1)/10 GiB -> 0.9
  EXPECT_NEAR(d.best().utilization, 0.9, 1e-9);
}

TEST(Scoring, SpreadPrefersTheEmptiestNode) {
  const auto d = place(three_loads(), cvm_request(), opts(cvm::v1::SPREAD));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.best().node_id, "low");
  EXPECT_NEAR(d.best().utilization, 0.2, 1e-9);
}

TEST(Scoring, BinpackSkipsNodesTheRequestDoesNotFit) {
  NodeIndex index = three_loads();
  PlacementRequest r = cvm_request();
  r.cpu_millicores = 3'000;  // does not fit "high" any more
  EXPECT_EQ(place(index, r, opts()).best().node_id, "mid");
}

TEST(Scoring, UtilizationAveragesCpuAndMemoryFractions) {
  NodeIndex index;
  // cpu nearly full, memory empty vs both half: (0.9 + 0.1)/2 = 0.5 < 0.6.
  index.upsert(NodeBuilder("cpu-heavy").capacity(10'000, 10 * kGiB).allocated(8'000, 0));
  index.upsert(NodeBuilder("balanced").capacity(10'000, 10 * kGiB).allocated(5'000, 5 * kGiB));
  auto d = place(index, cvm_request(), opts(cvm::v1::BINPACK));
  EXPECT_EQ(d.best().node_id, "balanced");
  EXPECT_NEAR(d.best().utilization, 0.6, 1e-9);
  d = place(index, cvm_request(), opts(cvm::v1::SPREAD));
  EXPECT_EQ(d.best().node_id, "cpu-heavy");
  EXPECT_NEAR(d.best().utilization, 0.5, 1e-9);
}

TEST(Scoring, TiesGoToTheSmallestNodeIdWhateverTheInsertOrder) {
  for (auto strategy : {cvm::v1::BINPACK, cvm::v1::SPREAD}) {
    NodeIndex index;
    index.upsert(NodeBuilder("node-c"));
    index.upsert(NodeBuilder("node-a"));
    index.upsert(NodeBuilder("node-b"));
    PlacementOptions o = opts(strategy);
    for (uint64_t offset = 0; offset < 3; ++offset) {
      o.start_offset = offset;
      EXPECT_EQ(place(index, cvm_request(), o).best().node_id, "node-a");
    }
  }
}

TEST(Scoring, RankedCandidatesBestFirst) {
  PlacementOptions o = opts(cvm::v1::BINPACK);
  o.max_candidates = 2;
  auto d = place(three_loads(), cvm_request(), o);
  ASSERT_EQ(d.candidates.size(), 2u);
  EXPECT_EQ(d.candidates[0].node_id, "high");
  EXPECT_EQ(d.candidates[1].node_id, "mid");
  o.max_candidates = 10;
  o.strategy = cvm::v1::SPREAD;
  d = place(three_loads(), cvm_request(), o);
  ASSERT_EQ(d.candidates.size(), 3u);
  EXPECT_EQ(d.candidates[0].node_id, "low");
  EXPECT_EQ(d.candidates[1].node_id, "mid");
  EXPECT_EQ(d.candidates[2].node_id, "high");
  EXPECT_EQ(d.stats.feasible, 3u);
}

TEST(Scoring, ZeroMaxCandidatesMeansOne) {
  PlacementOptions o = opts();
  o.max_candidates = 0;
  EXPECT_EQ(place(three_loads(), cvm_request(), o).candidates.size(), 1u);
}

TEST(Scoring, CandidateSlotMatchesTheIndex) {
  const NodeIndex index = three_loads();
  const auto d = place(index, cvm_request(), opts());
  EXPECT_EQ(d.best().slot, *index.slot_of("high"));
}

// --- in-flight reservations --------------------------------------------------------------------

TEST(Reservations, CountedAgainstRoom) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").capacity(2'000, 2 * kGiB));
  const auto r = cvm_request();  // 1000m, 1 GiB
  ASSERT_TRUE(index.reserve("b1", "n", reservation_for(r)));
  EXPECT_TRUE(place(index, r, opts()).ok());
  ASSERT_TRUE(index.reserve("b2", "n", reservation_for(r)));
  const auto d = place(index, r, opts());
  EXPECT_EQ(d.reason, cvm::v1::NO_ELIGIBLE_NODE);
  EXPECT_EQ(d.message, "0/1 nodes fit: 1 insufficient cpu");
  EXPECT_TRUE(index.release("b1"));
  EXPECT_TRUE(place(index, r, opts()).ok());
  EXPECT_EQ(index.reservations(), 1u);
}

TEST(Reservations, MemoryOnly) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").capacity(64'000, 2 * kGiB));
  ASSERT_TRUE(index.reserve("b1", "n", Reservation{0, 2 * kGiB, 0}));
  EXPECT_EQ(rejected(place(index, cvm_request(), opts()), Filter::kMemory), 1u);
  const NodeRecord* rec = index.find("n");
  ASSERT_NE(rec, nullptr);
  EXPECT_EQ(rec->reserved_memory_bytes, 2 * kGiB);
}

TEST(Reservations, GpusReservedInFlight) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").gpu("GPU-a", 0, 16 * kGiB).gpu("GPU-b", 1, 16 * kGiB));
  ASSERT_TRUE(index.reserve("b1", "n", reservation_for(gpu_request(1))));
  EXPECT_TRUE(place(index, gpu_request(1), opts()).ok());
  EXPECT_EQ(rejected(place(index, gpu_request(2), opts()), Filter::kGpuAvailable), 1u);
  // With a minimum memory the slower check counts reservations too.
  EXPECT_EQ(rejected(place(index, gpu_request(2, 16 * kGiB), opts()), Filter::kGpuAvailable), 1u);
  EXPECT_TRUE(place(index, gpu_request(1, 16 * kGiB), opts()).ok());
}

TEST(Reservations, ChangeScoring) {
  NodeIndex index;
  index.upsert(NodeBuilder("a").capacity(10'000, 10 * kGiB));
  index.upsert(NodeBuilder("b").capacity(10'000, 10 * kGiB));
  EXPECT_EQ(place(index, cvm_request(), opts()).best().node_id, "a");  // tie
  ASSERT_TRUE(index.reserve("b1", "b", Reservation{1000, kGiB, 0}));
  EXPECT_EQ(place(index, cvm_request(), opts(cvm::v1::BINPACK)).best().node_id, "b");
  EXPECT_EQ(place(index, cvm_request(), opts(cvm::v1::SPREAD)).best().node_id, "a");
}

TEST(Reservations, SurviveHeartbeats) {
  NodeIndex index;
  const auto node = NodeBuilder("n").capacity(1'000, 64 * kGiB);
  index.upsert(node);
  ASSERT_TRUE(index.reserve("b1", "n", reservation_for(cvm_request())));
  index.upsert(node);
  EXPECT_FALSE(place(index, cvm_request(), opts()).ok());
}

TEST(Reservations, UnknownNodeOrDuplicateIdRefused) {
  NodeIndex index;
  index.upsert(NodeBuilder("n"));
  EXPECT_FALSE(index.reserve("b1", "missing", Reservation{1, 1, 0}));
  EXPECT_TRUE(index.reserve("b1", "n", Reservation{1, 1, 0}));
  EXPECT_FALSE(index.reserve("b1", "n", Reservation{1, 1, 0}));
  EXPECT_FALSE(index.release("nope"));
  EXPECT_TRUE(index.release("b1"));
  EXPECT_FALSE(index.release("b1"));
}

TEST(Reservations, DroppedWithTheNode) {
  NodeIndex index;
  const auto node = NodeBuilder("n").capacity(1'000, 64 * kGiB);
  index.upsert(node);
  index.upsert(NodeBuilder("other"));
  ASSERT_TRUE(index.reserve("b1", "n", reservation_for(cvm_request())));
  ASSERT_TRUE(index.reserve("b2", "other", reservation_for(cvm_request())));
  EXPECT_TRUE(index.remove("n"));
  EXPECT_EQ(index.reservations(), 1u);
  EXPECT_FALSE(index.release("b1"));
  index.upsert(node);  // comes back: empty again
  EXPECT_EQ(index.find("n")->reserved_cpu_millicores, 0u);
}

// --- the index ---------------------------------------------------------------------------------

TEST(NodeIndex, UpsertReplacesInPlace) {
  NodeIndex index;
  const NodeSlot a = index.upsert(NodeBuilder("a"), 5);
  const NodeSlot b = index.upsert(NodeBuilder("b"), 6);
  EXPECT_NE(a, b);
  EXPECT_EQ(index.upsert(NodeBuilder("a").capacity(2'000, kGiB), 9), a);
  EXPECT_EQ(index.size(), 2u);
  const NodeRecord* rec = index.find("a");
  ASSERT_NE(rec, nullptr);
  EXPECT_EQ(rec->revision, 9u);
  EXPECT_EQ(rec->capacity_cpu_millicores, 2'000u);
  EXPECT_EQ(rec->capacity_memory_bytes, kGiB);
  EXPECT_EQ(index.slot_of("b"), b);
  EXPECT_EQ(index.find("zz"), nullptr);
  EXPECT_FALSE(index.slot_of("zz").has_value());
}

TEST(NodeIndex, RemoveFreesTheSlotForReuse) {
  NodeIndex index;
  index.upsert(NodeBuilder("a"));
  const NodeSlot b = index.upsert(NodeBuilder("b"));
  index.upsert(NodeBuilder("c"));
  EXPECT_TRUE(index.remove("b"));
  EXPECT_FALSE(index.remove("b"));
  EXPECT_EQ(index.size(), 2u);
  EXPECT_EQ(index.find("b"), nullptr);
  EXPECT_EQ(index.upsert(NodeBuilder("d")), b);
  EXPECT_EQ(index.find("d")->node_id, "d");
}

TEST(NodeIndex, RemovedNodesAreNotPlacedOrCounted) {
  NodeIndex index;
  index.upsert(NodeBuilder("a").capacity(10'000, 10 * kGiB).allocated(9'000, 0));
  index.upsert(NodeBuilder("b"));
  index.remove("a");
  const auto d = place(index, cvm_request(), opts());
  EXPECT_EQ(d.best().node_id, "b");
  EXPECT_EQ(d.stats.nodes, 1u);
  EXPECT_EQ(d.stats.evaluated, 1u);
  index.remove("b");
  EXPECT_EQ(place(index, cvm_request(), opts()).message, "0/0 nodes fit: no nodes registered");
}

TEST(NodeIndex, GpusKeptSortedByMinor) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").gpu("GPU-c", 2, kGiB).gpu("GPU-a", 0, kGiB).gpu("GPU-b", 1, kGiB));
  const auto& gpus = index.find("n")->gpus;
  ASSERT_EQ(gpus.size(), 3u);
  EXPECT_EQ(gpus[0].uuid, "GPU-a");
  EXPECT_EQ(gpus[2].uuid, "GPU-c");
}

TEST(NodeIndex, CapabilityChangeOnHeartbeatTakesEffect) {
  NodeIndex index;
  index.upsert(NodeBuilder("n").selinux(true, true));
  EXPECT_FALSE(place(index, cvm_request(), opts()).ok());
  index.upsert(NodeBuilder("n"));
  EXPECT_TRUE(place(index, cvm_request(), opts()).ok());
}

// --- sampling ----------------------------------------------------------------------------------

NodeIndex identical(int n) {
  NodeIndex index;
  for (int i = 0; i < n; ++i) {
    char id[16];
    std::snprintf(id, sizeof id, "n%04d", i);
    index.upsert(NodeBuilder(id));
  }
  return index;
}

TEST(Sampling, Log2StopsAfterEnoughFeasibleNodes) {
  const NodeIndex index = identical(1000);
  PlacementOptions o = opts();
  o.sampling = Sampling::kLog2;
  const auto d = place(index, cvm_request(), o);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.stats.feasible, 10u);  // ⌈log₂ 1000⌉
  // Filtering runs in small blocks, so it may look a little past the stopping point.
  EXPECT_GE(d.stats.evaluated, 10u);
  EXPECT_LE(d.stats.evaluated, 64u);
  EXPECT_EQ(d.stats.nodes, 1000u);
}

TEST(Sampling, Log2HasAFloorOfTwo) {
  PlacementOptions o = opts();
  o.sampling = Sampling::kLog2;
  EXPECT_EQ(place(identical(3), cvm_request(), o).stats.feasible, 2u);
  EXPECT_EQ(place(identical(1), cvm_request(), o).stats.feasible, 1u);
  EXPECT_EQ(place(identical(16), cvm_request(), o).stats.feasible, 4u);
  EXPECT_EQ(place(identical(17), cvm_request(), o).stats.feasible, 5u);
}

TEST(Sampling, Percent) {
  const NodeIndex index = identical(200);
  PlacementOptions o = opts();
  o.sampling = Sampling::kPercent;
  o.sample_percent = 10;
  EXPECT_EQ(place(index, cvm_request(), o).stats.feasible, 20u);
  o.sample_percent = 0;  // clamped to 1%
  EXPECT_EQ(place(index, cvm_request(), o).stats.feasible, 2u);
  o.sample_percent = 250;  // clamped to 100%
  EXPECT_EQ(place(index, cvm_request(), o).stats.feasible, 200u);
}

TEST(Sampling, CountsOnlyFeasibleNodesAndRejectsAreStillCounted) {
  NodeIndex index;
  for (int i = 0; i < 20; ++i) index.upsert(NodeBuilder(numbered("bad", i)).heartbeat(0));
  for (int i = 0; i < 20; ++i) index.upsert(NodeBuilder(numbered("ok", i)));
  PlacementOptions o = opts();
  o.sampling = Sampling::kLog2;  // 40 nodes -> 6
  const auto d = place(index, cvm_request(), o);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.stats.feasible, 6u);
  EXPECT_LT(d.stats.evaluated, 40u);
  EXPECT_EQ(rejected(d, Filter::kNodeLive), 20u);
}

TEST(Sampling, FailureIsAFullScan) {
  NodeIndex index;
  for (int i = 0; i < 50; ++i) index.upsert(NodeBuilder(numbered("n", i)).selinux(true, true));
  PlacementOptions o = opts();
  o.sampling = Sampling::kLog2;
  const auto d = place(index, cvm_request(), o);
  EXPECT_EQ(d.message, "0/50 nodes fit: 50 SELinux enforcing");
  EXPECT_EQ(d.stats.evaluated, 50u);
}

TEST(Sampling, StartOffsetRotatesAndWraps) {
  const NodeIndex index = identical(10);
  PlacementOptions o = opts();
  o.sampling = Sampling::kPercent;
  o.sample_percent = 10;  // exactly one node
  o.start_offset = 7;
  EXPECT_EQ(place(index, cvm_request(), o).best().node_id, "n0007");
  o.start_offset = 17;  // wraps
  EXPECT_EQ(place(index, cvm_request(), o).best().node_id, "n0007");
  o.start_offset = 9;
  EXPECT_EQ(place(index, cvm_request(), o).best().node_id, "n0009");
}

TEST(Sampling, WrapsPastTheEndToFindFeasibleNodes) {
  NodeIndex index;
  index.upsert(NodeBuilder("a"));
  index.upsert(NodeBuilder("b").heartbeat(0));
  index.upsert(NodeBuilder("c").heartbeat(0));
  PlacementOptions o = opts();
  o.sampling = Sampling::kPercent;
  o.sample_percent = 1;
  o.start_offset = 1;
  const auto d = place(index, cvm_request(), o);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.best().node_id, "a");
  EXPECT_EQ(d.stats.evaluated, 3u);
}

TEST(Sampling, NoneScoresEveryNode) {
  const auto d = place(identical(100), cvm_request(), opts());
  EXPECT_EQ(d.stats.feasible, 100u);
  EXPECT_EQ(d.best().node_id, "n0000");
}

}  // namespace
}  // namespace cvm::scheduler
