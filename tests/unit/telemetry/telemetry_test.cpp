#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cvm/telemetry/logging.h"
#include "cvm/telemetry/metrics.h"

namespace cvm::telemetry {
namespace {

TEST(Logging, ParsesFormats) {
  EXPECT_EQ(*parse_log_format("text"), LogFormat::kText);
  EXPECT_EQ(*parse_log_format("json"), LogFormat::kJson);
  EXPECT_FALSE(parse_log_format("xml").ok());
}

TEST(Logging, JsonLinesEscapeTheMessage) {
  const auto line = format_json_line("2026-01-01T00:00:00.000Z", "info", "scheduler",
                                     "quote \" newline \n tab \t bad \xff utf8");
  ASSERT_EQ(line.back(), '\n');
  const auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["service"], "scheduler");
  EXPECT_EQ(j["level"], "info");
  EXPECT_NE(j["msg"].get<std::string>().find("quote \" newline \n"), std::string::npos);
}

TEST(Metrics, FamiliesAreSharedByName) {
  Metrics m;
  auto& a = m.counter("cvm_test_total", "help", {{"k", "a"}});
  auto& b = m.counter("cvm_test_total", "help", {{"k", "b"}});
  a.Increment();
  EXPECT_NE(&a, &b);
  EXPECT_EQ(&a, &m.counter("cvm_test_total", "help", {{"k", "a"}}));
  EXPECT_EQ(m.registry().Collect().size(), 1u);
}

TEST(Metrics, ListensOnAFreePortAndRejectsABadAddress) {
  Metrics m;
  ASSERT_TRUE(m.listen("127.0.0.1:0").ok());
  EXPECT_GT(m.port(), 0);
  Metrics bad;
  EXPECT_FALSE(bad.listen("not-an-address").ok());
  Metrics off;
  EXPECT_TRUE(off.listen("off").ok());
  EXPECT_EQ(off.port(), 0);
}

}  // namespace
}  // namespace cvm::telemetry
