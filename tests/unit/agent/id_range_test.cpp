#include "cvm/agent/id_range.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

namespace cvm::agent {
namespace {

IdRangeAllocator make(IdPool pool, uint32_t width = kDefaultIdRangeWidth) {
  auto a = IdRangeAllocator::create(pool, width);
  EXPECT_TRUE(a.ok()) << (a.ok() ? "" : a.error().message);
  return std::move(a).value();
}

bool disjoint(std::vector<IdRange> ranges) {
  std::sort(ranges.begin(), ranges.end(), [](auto a, auto b) { return a.base < b.base; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (uint64_t{ranges[i - 1].base} + ranges[i - 1].count > ranges[i].base) return false;
  }
  return true;
}

TEST(SubidPool, ParsesOwnerLine) {
  const auto pool = parse_subid_pool("root:100000:65536\ncvm:165536:6553600\n", "cvm");
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ(*pool, (IdPool{165536, 6553600}));
}

TEST(SubidPool, PicksLargestOfSeveralLines) {
  const auto pool =
      parse_subid_pool("# comment\n\ncvm:100000:65536\n  cvm:1000000:1000000  \n", "cvm");
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ(*pool, (IdPool{1000000, 1000000}));
}

TEST(SubidPool, MissingOwner) {
  const auto pool = parse_subid_pool("root:100000:65536\n", "cvm");
  ASSERT_FALSE(pool.ok());
  EXPECT_TRUE(pool.error().is_not_found());
  EXPECT_FALSE(parse_subid_pool("", "cvm").ok());
  // A prefix of another name is not the owner.
  EXPECT_FALSE(parse_subid_pool("cvmx:100000:65536\n", "cvm").ok());
}

TEST(SubidPool, MalformedOwnerLine) {
  for (const char* text : {"cvm:100000\n", "cvm:abc:65536\n", "cvm:100000:-1\n",
                           "cvm:4294967295:2\n", "cvm:100000:65536:extra\n"}) {
    const auto pool = parse_subid_pool(text, "cvm");
    ASSERT_FALSE(pool.ok()) << text;
    EXPECT_EQ(pool.error().domain, ErrorDomain::kInvalid) << text;
  }
  // Other owners' malformed lines do not matter.
  EXPECT_TRUE(parse_subid_pool("bad line\nother:x:y\ncvm:100000:65536\n", "cvm").ok());
}

TEST(IdRangeAllocator, RejectsBadPools) {
  EXPECT_FALSE(IdRangeAllocator::create({100000, 1000}).ok());         // narrower than a range
  EXPECT_FALSE(IdRangeAllocator::create({0, 1u << 20}).ok());          // includes host root
  EXPECT_FALSE(IdRangeAllocator::create({4294901760u, 131072}).ok());  // past 2^32
  EXPECT_FALSE(IdRangeAllocator::create({100000, 65536}, 0).ok());     // zero width
  EXPECT_TRUE(IdRangeAllocator::create({4294901760u, 65536}).ok());    // exactly to 2^32
}

TEST(IdRangeAllocator, AllocatesFromPoolStart) {
  auto a = make({165536, 65536 * 4});
  EXPECT_EQ(a.slots(), 4u);
  const auto r = a.allocate("ws-1");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (IdRange{165536, 65536}));
  EXPECT_EQ(*a.allocate("ws-2"), (IdRange{165536 + 65536, 65536}));
  EXPECT_EQ(a.in_use(), 2u);
}

TEST(IdRangeAllocator, IdempotentPerWorkspace) {
  auto a = make({165536, 65536 * 4});
  const auto first = a.allocate("ws-1");
  ASSERT_TRUE(first.ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(*a.allocate("ws-1"), *first);
  EXPECT_EQ(a.in_use(), 1u);
  EXPECT_EQ(a.find("ws-1"), *first);
  EXPECT_FALSE(a.find("ws-2"));
}

TEST(IdRangeAllocator, ExhaustionIsConflict) {
  auto a = make({100000, 65536 * 2 + 1000});  // a partial slot at the end is never used
  ASSERT_TRUE(a.allocate("a").ok());
  ASSERT_TRUE(a.allocate("b").ok());
  const auto c = a.allocate("c");
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.error().is_conflict());
  EXPECT_NE(c.error().message.find("exhausted"), std::string::npos);
  // Existing workspaces still get their range when the pool is full.
  EXPECT_TRUE(a.allocate("a").ok());
}

TEST(IdRangeAllocator, ReuseAfterRelease) {
  auto a = make({100000, 65536 * 3});
  const auto ra = *a.allocate("a");
  const auto rb = *a.allocate("b");
  const auto rc = *a.allocate("c");
  EXPECT_FALSE(a.allocate("d").ok());
  EXPECT_TRUE(a.release("b"));
  EXPECT_FALSE(a.release("b"));
  EXPECT_FALSE(a.release("never"));
  const auto rd = a.allocate("d");
  ASSERT_TRUE(rd.ok());
  EXPECT_EQ(*rd, rb);  // the freed slot, the only one
  EXPECT_NE(*rd, ra);
  EXPECT_NE(*rd, rc);
}

TEST(IdRangeAllocator, DisjointOverManyRandomOperations) {
  constexpr uint32_t kSlots = 64;
  auto a = make({200000, 65536 * kSlots});
  std::mt19937 rng(12345);
  std::set<std::string> live;
  for (int step = 0; step < 5000; ++step) {
    const std::string ws = "ws-" + std::to_string(rng() % 100);
    if (rng() % 3 == 0) {
      EXPECT_EQ(a.release(ws), live.erase(ws) == 1);
    } else {
      const auto r = a.allocate(ws);
      if (live.count(ws) == 0 && live.size() == kSlots) {
        EXPECT_FALSE(r.ok());
        continue;
      }
      ASSERT_TRUE(r.ok()) << step;
      EXPECT_GE(r->base, 200000u);
      EXPECT_LE(uint64_t{r->base} + r->count, 200000u + uint64_t{65536} * kSlots);
      EXPECT_EQ(r->count, 65536u);
      live.insert(ws);
    }
    std::vector<IdRange> ranges;
    for (const auto& w : live) ranges.push_back(*a.find(w));
    ASSERT_TRUE(disjoint(ranges)) << "step " << step;
    ASSERT_EQ(a.in_use(), live.size());
  }
}

TEST(IdRangeAllocator, JsonRoundTrip) {
  auto a = make({165536, 65536 * 8});
  ASSERT_TRUE(a.allocate("a").ok());
  ASSERT_TRUE(a.allocate("b").ok());
  ASSERT_TRUE(a.allocate("c").ok());
  a.release("b");
  const nlohmann::json state = nlohmann::json::parse(a.to_json().dump());
  auto restored = IdRangeAllocator::from_json(state, a.pool());
  ASSERT_TRUE(restored.ok()) << restored.error().message;
  EXPECT_EQ(restored->in_use(), 2u);
  EXPECT_EQ(restored->find("a"), a.find("a"));
  EXPECT_EQ(restored->find("c"), a.find("c"));
  EXPECT_FALSE(restored->find("b"));
  EXPECT_EQ(restored->to_json(), a.to_json());
}

TEST(IdRangeAllocator, RestartedAllocatorNeverReusesLiveRanges) {
  auto a = make({165536, 65536 * 4});
  std::vector<IdRange> before;
  for (const char* ws : {"a", "b", "c"}) before.push_back(*a.allocate(ws));
  auto restored = IdRangeAllocator::from_json(a.to_json(), a.pool());
  ASSERT_TRUE(restored.ok());
  const auto fresh = restored->allocate("d");
  ASSERT_TRUE(fresh.ok());
  before.push_back(*fresh);
  EXPECT_TRUE(disjoint(before));
  EXPECT_FALSE(restored->allocate("e").ok());
}

TEST(IdRangeAllocator, RestoreOntoChangedPoolAvoidsOffGridRanges) {
  // Saved with width 65536 from 100000; today's pool starts 32768 lower, so its slot grid
  // straddles the saved ranges. New ranges must still avoid them.
  auto old = make({100000, 65536 * 4});
  ASSERT_TRUE(old.allocate("a").ok());  // [100000, 165536)
  auto restored = IdRangeAllocator::from_json(old.to_json(), IdPool{67232, 65536 * 5});
  ASSERT_TRUE(restored.ok()) << restored.error().message;
  const auto r = restored->allocate("b");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(disjoint({*restored->find("a"), *r}));
  EXPECT_EQ(restored->find("a"), (IdRange{100000, 65536}));
}

TEST(IdRangeAllocator, RejectsBadState) {
  const IdPool pool{165536, 65536 * 4};
  EXPECT_FALSE(IdRangeAllocator::from_json(nlohmann::json::array(), pool).ok());
  EXPECT_FALSE(
      IdRangeAllocator::from_json({{"version", 2}, {"ranges", nlohmann::json::object()}}, pool)
          .ok());
  EXPECT_FALSE(IdRangeAllocator::from_json({{"version", 1}}, pool).ok());
  // A version of the wrong JSON type is an error, not an exception (found by fuzz_agent_files).
  EXPECT_FALSE(IdRangeAllocator::from_json(
                   {{"version", {{"ws1", 1}}}, {"ranges", nlohmann::json::object()}}, pool)
                   .ok());
  EXPECT_FALSE(
      IdRangeAllocator::from_json({{"version", "1"}, {"ranges", nlohmann::json::object()}}, pool)
          .ok());
  EXPECT_FALSE(
      IdRangeAllocator::from_json({{"version", 1}, {"ranges", {{"a", {{"base", 1}}}}}}, pool).ok());
  EXPECT_FALSE(IdRangeAllocator::from_json(
                   {{"version", 1}, {"ranges", {{"a", {{"base", 0}, {"count", 65536}}}}}}, pool)
                   .ok());
  // Two saved ranges that overlap mean the file is corrupt: refuse rather than guess.
  EXPECT_FALSE(IdRangeAllocator::from_json({{"version", 1},
                                            {"ranges",
                                             {{"a", {{"base", 165536}, {"count", 65536}}},
                                              {"b", {{"base", 200000}, {"count", 65536}}}}}},
                                           pool)
                   .ok());
}

}  // namespace
}  // namespace cvm::agent
