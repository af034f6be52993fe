// JetStream key-value through the adapter: CAS writes, deletes, listing and watchers.

#include "bus_fixture.h"

namespace cvm::bus::testing {
namespace {

class BusKv : public BusFixture {
 protected:
  void SetUp() override {
    BusFixture::SetUp();
    if (HasFatalFailure()) return;
    conn_ = connect();
    ASSERT_TRUE(conn_);
    make_kv(conn_, "nodes", kv_);
  }
  void TearDown() override {
    kv_.reset();
    conn_.reset();
    BusFixture::TearDown();
  }

  ConnectionPtr conn_;
  std::optional<KeyValue> kv_;
};

TEST_F(BusKv, EnsureKvIsIdempotent) {
  KvConfig config;
  config.bucket = "nodes";
  config.history = 5;
  auto again = conn_->ensure_kv(config);
  ASSERT_TRUE(again.ok()) << again.error().message;
  config.history = 1;  // another config: binds to the existing bucket
  auto other = conn_->ensure_kv(config);
  ASSERT_TRUE(other.ok()) << other.error().message;
  ASSERT_TRUE(kv_->put("k", "v").ok());
  auto got = other->get("k");
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, "v");
  EXPECT_EQ(other->bucket(), "nodes");
}

TEST_F(BusKv, GetMissingKeyIsNullopt) {
  auto got = kv_->get("missing");
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_FALSE(got->has_value());
}

TEST_F(BusKv, CreateAndUpdateAreCompareAndSet) {
  auto rev1 = kv_->create("node-1", "v1");
  ASSERT_TRUE(rev1.ok()) << rev1.error().message;

  auto again = kv_->create("node-1", "v1b");
  ASSERT_FALSE(again.ok());
  EXPECT_TRUE(again.error().is_conflict()) << again.error().message;
  EXPECT_EQ(again.error().js_code, 10071);

  auto rev2 = kv_->update("node-1", "v2", *rev1);
  ASSERT_TRUE(rev2.ok()) << rev2.error().message;
  EXPECT_GT(*rev2, *rev1);

  auto stale = kv_->update("node-1", "v3", *rev1);
  ASSERT_FALSE(stale.ok());
  EXPECT_TRUE(stale.error().is_conflict()) << stale.error().message;

  auto got = kv_->get("node-1");
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, "v2");
  EXPECT_EQ((*got)->revision, *rev2);
  EXPECT_EQ((*got)->op, KvOp::kPut);

  auto put = kv_->put("node-1", "v4");
  ASSERT_TRUE(put.ok());
  EXPECT_GT(*put, *rev2);
}

TEST_F(BusKv, EraseHidesKeyAndAllowsCreate) {
  ASSERT_TRUE(kv_->put("a", "1").ok());
  ASSERT_TRUE(kv_->put("b", "2").ok());
  ASSERT_TRUE(kv_->erase("a").ok());
  auto got = kv_->get("a");
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_FALSE(got->has_value());

  auto keys = kv_->keys();
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  EXPECT_EQ(*keys, std::vector<std::string>{"b"});

  auto history = kv_->history("a");
  ASSERT_TRUE(history.ok()) << history.error().message;
  ASSERT_EQ(history->size(), 2u);
  EXPECT_EQ(history->back().op, KvOp::kDelete);

  // A deleted key may be created again (cnats sees through the delete marker).
  auto created = kv_->create("a", "again");
  ASSERT_TRUE(created.ok()) << created.error().message;

  ASSERT_TRUE(kv_->purge("b").ok());
  auto purged = kv_->get("b");
  ASSERT_TRUE(purged.ok());
  EXPECT_FALSE(purged->has_value());
}

TEST_F(BusKv, EmptyListingsAreNotErrors) {
  auto keys = kv_->keys();
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  EXPECT_TRUE(keys->empty());
  auto history = kv_->history("never");
  ASSERT_TRUE(history.ok()) << history.error().message;
  EXPECT_TRUE(history->empty());
}

TEST_F(BusKv, WatchSeesInitialValuesMarkerPutsAndDeletes) {
  ASSERT_TRUE(kv_->put("n.1", "a").ok());
  ASSERT_TRUE(kv_->put("n.2", "b").ok());
  ASSERT_TRUE(kv_->put("other", "x").ok());
  Collector<std::optional<KvEntry>> got;
  std::atomic<bool> off_executor{false};
  auto watch = kv_->watch("n.>", [&](std::optional<KvEntry> e) {
    if (!on_io_thread()) off_executor = true;
    got.add(std::move(e));
  });
  ASSERT_TRUE(watch.ok()) << watch.error().message;
  ASSERT_TRUE(got.wait_for(3));
  EXPECT_EQ(got.at(0)->key, "n.1");
  EXPECT_EQ(got.at(1)->value, "b");
  EXPECT_FALSE(got.at(2).has_value()) << "the end-of-initial-values marker";

  ASSERT_TRUE(kv_->put("n.3", "c").ok());
  ASSERT_TRUE(kv_->erase("n.1").ok());
  ASSERT_TRUE(got.wait_for(5));
  EXPECT_EQ(got.at(3)->key, "n.3");
  EXPECT_EQ(got.at(3)->op, KvOp::kPut);
  EXPECT_EQ(got.at(4)->key, "n.1");
  EXPECT_EQ(got.at(4)->op, KvOp::kDelete);
  EXPECT_FALSE(off_executor);

  const auto start = std::chrono::steady_clock::now();
  watch->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  ASSERT_TRUE(kv_->put("n.4", "d").ok());
  EXPECT_FALSE(got.wait_for(6, 200ms));
}

TEST_F(BusKv, WatchOfEmptyBucketGetsMarker) {
  Collector<std::optional<KvEntry>> got;
  auto watch = kv_->watch(">", [&](std::optional<KvEntry> e) { got.add(std::move(e)); });
  ASSERT_TRUE(watch.ok()) << watch.error().message;
  ASSERT_TRUE(got.wait_for(1));
  EXPECT_FALSE(got.at(0).has_value());
  ASSERT_TRUE(kv_->put("k", "v").ok());
  ASSERT_TRUE(got.wait_for(2));
  EXPECT_EQ(got.at(1)->value, "v");
}

TEST_F(BusKv, BucketOutlivesConnection) {
  conn_.reset();
  auto got = kv_->get("k");
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.error().domain, ErrorDomain::kNats) << got.error().message;
}

}  // namespace
}  // namespace cvm::bus::testing
