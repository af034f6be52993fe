// The console log reader: what plan_console_read picks across the supervisor's rotation, checked
// case by case and against a model of the supervisor writing and rotating while a follower reads;
// read_console_log on real files renamed under it.
#include "cvm/agent/console_log.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

namespace cvm::agent {
namespace {

using Seg = ConsoleReadSegment;
constexpr ConsoleLogFile kCur{20, 100};
constexpr ConsoleLogFile kPrev{10, 50};

TEST(ConsoleReadPlan, NoFilesReadsNothingAndKeepsTheCursor) {
  const auto p = plan_console_read(std::nullopt, std::nullopt, {7, 3}, 100);
  EXPECT_TRUE(p.segments.empty());
  EXPECT_EQ(p.next, (ConsoleCursor{7, 3}));
  EXPECT_FALSE(p.lost);
}

TEST(ConsoleReadPlan, FromTheStartReadsThePreviousFileThenTheCurrentOne) {
  const auto p = plan_console_read(kCur, kPrev, {}, 1000);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 0, 50}, {false, 0, 100}}));
  EXPECT_EQ(p.next, (ConsoleCursor{20, 100}));
  EXPECT_FALSE(p.lost);
}

TEST(ConsoleReadPlan, OnlyACurrentFile) {
  const auto p = plan_console_read(kCur, std::nullopt, {}, 1000);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{false, 0, 100}}));
  EXPECT_EQ(p.next, (ConsoleCursor{20, 100}));
}

TEST(ConsoleReadPlan, TheLimitCutsInsideThePreviousFile) {
  const auto p = plan_console_read(kCur, kPrev, {}, 30);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 0, 30}}));
  EXPECT_EQ(p.next, (ConsoleCursor{10, 30}));
}

TEST(ConsoleReadPlan, TheLimitCutsInsideTheCurrentFile) {
  const auto p = plan_console_read(kCur, kPrev, {10, 40}, 30);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 40, 10}, {false, 0, 20}}));
  EXPECT_EQ(p.next, (ConsoleCursor{20, 20}));
}

TEST(ConsoleReadPlan, ACursorInTheCurrentFileReadsItsRest) {
  const auto p = plan_console_read(kCur, kPrev, {20, 60}, 1000);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{false, 60, 40}}));
  EXPECT_EQ(p.next, (ConsoleCursor{20, 100}));
}

TEST(ConsoleReadPlan, ACursorAtTheEndReadsNothing) {
  const auto p = plan_console_read(kCur, kPrev, {20, 100}, 1000);
  EXPECT_TRUE(p.segments.empty());
  EXPECT_EQ(p.next, (ConsoleCursor{20, 100}));
}

TEST(ConsoleReadPlan, AfterARotationTheCursorsFileIsReadOnUnderItsNewName) {
  // The cursor was at 40 of inode 10 when it was console.log; it is console.log.1 now.
  const auto p = plan_console_read(kCur, kPrev, {10, 40}, 1000);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 40, 10}, {false, 0, 100}}));
  EXPECT_FALSE(p.lost);
}

TEST(ConsoleReadPlan, ACursorRotatedOutIsLostAndReadsFromTheOldestByte) {
  const auto p = plan_console_read(kCur, kPrev, {5, 40}, 1000);
  EXPECT_TRUE(p.lost);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 0, 50}, {false, 0, 100}}));
}

TEST(ConsoleReadPlan, AnOffsetPastTheEndIsClamped) {
  const auto p = plan_console_read(kCur, kPrev, {20, 5000}, 1000);
  EXPECT_TRUE(p.segments.empty());
  EXPECT_EQ(p.next, (ConsoleCursor{20, 100}));
  const auto n = plan_console_read(kCur, kPrev, {20, -5}, 10);
  EXPECT_EQ(n.segments, (std::vector<Seg>{{false, 0, 10}}));
}

TEST(ConsoleReadPlan, BetweenTheRenameAndTheNewFileTheCursorWaitsAtThePreviousEnd) {
  const auto p = plan_console_read(std::nullopt, kPrev, {10, 20}, 1000);
  EXPECT_EQ(p.segments, (std::vector<Seg>{{true, 20, 30}}));
  EXPECT_EQ(p.next, (ConsoleCursor{10, 50}));
  // Then the new console.log appears: the follower goes on from its start.
  const auto q = plan_console_read(kCur, kPrev, p.next, 1000);
  EXPECT_EQ(q.segments, (std::vector<Seg>{{false, 0, 100}}));
}

TEST(ConsoleReadPlan, ANonPositiveLimitReadsNothing) {
  for (int64_t max : {0, -1}) {
    const auto p = plan_console_read(kCur, kPrev, {}, max);
    EXPECT_TRUE(p.segments.empty());
  }
}

// A model of the supervisor: appends, renaming console.log to .1 when a write would pass the cap
// (a new file, a new inode). A follower reading at most `chunk` bytes between writes, never two
// rotations behind, must see exactly what was written, in order.
TEST(ConsoleReadPlan, AFollowerSeesEveryByteOnceAcrossRotations) {
  std::mt19937 rng(42);
  for (int round = 0; round < 200; ++round) {
    const int64_t cap = 16 + static_cast<int64_t>(rng() % 64);
    const int64_t chunk = 1 + static_cast<int64_t>(rng() % 200);
    std::string cur;
    std::string prev;
    uint64_t cur_id = 1;
    uint64_t prev_id = 0;
    std::string written;
    std::string seen;
    ConsoleCursor cursor;
    uint64_t next_id = 2;
    auto view = [&](const std::string& s, uint64_t id) {
      return id == 0 ? std::nullopt : std::optional<ConsoleLogFile>({id, (int64_t)s.size()});
    };
    auto follow = [&] {
      const auto p = plan_console_read(view(cur, cur_id), view(prev, prev_id), cursor, chunk);
      ASSERT_FALSE(p.lost) << "round " << round;
      for (const auto& s : p.segments) seen += (s.previous ? prev : cur).substr(s.offset, s.length);
      cursor = p.next;
    };
    for (int w = 0; w < 60; ++w) {
      const std::string data(1 + rng() % 20, static_cast<char>('a' + w % 26));
      if (!cur.empty() && static_cast<int64_t>(cur.size() + data.size()) > cap) {
        prev = cur;
        prev_id = cur_id;
        cur.clear();
        cur_id = next_id++;
      }
      cur += data;
      written += data;
      // Read until caught up: the follower is never more than one rotation behind.
      for (int i = 0; i < 100 && seen.size() < written.size(); ++i) follow();
    }
    ASSERT_EQ(seen, written) << "round " << round << " cap " << cap << " chunk " << chunk;
  }
}

class ConsoleLogFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("cvm-console-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "console.log").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void append(const std::string& path, const std::string& data) {
    std::ofstream(path, std::ios::app) << data;
  }
  std::filesystem::path dir_;
  std::string path_;
};

TEST_F(ConsoleLogFiles, NoLogIsNotFound) {
  auto r = read_console_log(path_, {}, 100);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.error().is_not_found()) << r.error().message;
}

TEST_F(ConsoleLogFiles, FollowsAcrossARealRename) {
  append(path_, "boot 1\n");
  auto a = read_console_log(path_, {}, 4);
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_EQ(a->data, "boot");
  append(path_, "more\n");
  ASSERT_EQ(std::rename(path_.c_str(), (path_ + ".1").c_str()), 0);
  append(path_, "after\n");
  auto b = read_console_log(path_, a->next, 1000);
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_EQ(b->data, " 1\nmore\nafter\n");
  EXPECT_FALSE(b->lost);
  auto c = read_console_log(path_, b->next, 1000);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->data, "");
  EXPECT_EQ(c->next, b->next);
}

TEST_F(ConsoleLogFiles, ASymlinkInItsPlaceIsRefused) {
  append((dir_ / "secret").string(), "node secret\n");
  std::filesystem::create_symlink(dir_ / "secret", path_);
  auto r = read_console_log(path_, {}, 100);
  ASSERT_FALSE(r.ok());
  EXPECT_FALSE(r.error().is_not_found());
}

TEST_F(ConsoleLogFiles, AFifoInItsPlaceIsRefusedWithoutBlocking) {
  ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0);
  auto r = read_console_log(path_, {}, 100);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not a regular file"), std::string::npos);
}

}  // namespace
}  // namespace cvm::agent
