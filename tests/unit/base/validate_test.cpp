#include "cvm/base/validate.h"

#include <string>

#include <gtest/gtest.h>

namespace cvm {
namespace {

cvm::v1::BuildRequest good() {
  cvm::v1::BuildRequest r;
  r.set_build_id("b1");
  r.set_workspace_id("ws1");
  r.set_image("oci:/images/busybox:latest");
  return r;
}

TEST(Validate, AcceptsAMinimalStartAndDefaultsTheTransition) {
  const auto d = decode_build_request(good().SerializeAsString(), std::nullopt);
  ASSERT_TRUE(d.request.has_value());
  EXPECT_FALSE(d.invalid.has_value());
  EXPECT_EQ(d.request->transition(), cvm::v1::START);
}

TEST(Validate, GarbageIsInvalidAndTakesTheBuildIdFromTheHeader) {
  const auto d = decode_build_request("\xff\xff\xff garbage", std::string_view("b-9"));
  ASSERT_TRUE(d.invalid.has_value());
  EXPECT_EQ(d.invalid->build_id, "b-9");
  EXPECT_NE(d.invalid->message.find("protobuf"), std::string::npos);
}

TEST(Validate, GarbageWithAnUnusableHeaderHasNoBuildId) {
  const auto d = decode_build_request("\xff\xff\xff", std::string_view("a.b"));
  ASSERT_TRUE(d.invalid.has_value());
  EXPECT_FALSE(d.invalid->build_id.has_value());
}

TEST(Validate, EachMissingFieldIsNamed) {
  auto r = good();
  r.clear_build_id();
  EXPECT_EQ(validate_build_request(r), "build_id is required");
  r = good();
  r.clear_workspace_id();
  EXPECT_EQ(validate_build_request(r), "workspace_id is required");
  r = good();
  r.clear_image();
  EXPECT_EQ(validate_build_request(r), "image is required to start");
  r.set_transition(cvm::v1::STOP);
  EXPECT_EQ(validate_build_request(r), "") << "STOP needs no image";
}

TEST(Validate, MissingWorkspaceKeepsTheBuildIdForTheFailedEvent) {
  auto r = good();
  r.clear_workspace_id();
  const auto d = decode_build_request(r.SerializeAsString(), std::nullopt);
  ASSERT_TRUE(d.invalid.has_value());
  EXPECT_EQ(d.invalid->build_id, "b1");
}

TEST(Validate, IdsMustBeSubjectTokens) {
  auto r = good();
  r.set_build_id("b.1");
  EXPECT_NE(validate_build_request(r).find("build_id must be"), std::string::npos);
  r = good();
  r.set_workspace_id("ws *");
  EXPECT_NE(validate_build_request(r).find("workspace_id must be"), std::string::npos);
}

TEST(Validate, OutOfRangeValuesAreRejected) {
  auto r = good();
  r.set_transition(static_cast<cvm::v1::Transition>(42));
  EXPECT_EQ(validate_build_request(r), "transition is not a known value");
  r = good();
  r.mutable_resources()->mutable_gpu()->set_count(65);
  EXPECT_EQ(validate_build_request(r), "at most 64 GPUs can be requested");
  r = good();
  r.mutable_resources()->mutable_gpu()->set_vendor(static_cast<cvm::v1::GpuVendor>(9));
  EXPECT_EQ(validate_build_request(r), "gpu vendor is not a known value");
  r = good();
  r.set_image(std::string(1025, 'x'));
  EXPECT_NE(validate_build_request(r), "");
  r = good();
  r.mutable_resources()->set_cpu_millicores(1'000'001);
  EXPECT_EQ(validate_build_request(r), "cpu_millicores is out of range");
  r = good();
  r.mutable_resources()->set_memory_bytes((1ULL << 50) + 1);
  EXPECT_EQ(validate_build_request(r), "memory_bytes is out of range (max 1 PiB)");
  r.mutable_resources()->set_memory_bytes(1ULL << 50);
  EXPECT_EQ(validate_build_request(r), "");
  r = good();
  r.mutable_resources()->mutable_gpu()->set_min_memory_bytes(UINT64_MAX);
  EXPECT_EQ(validate_build_request(r), "gpu min_memory_bytes is out of range (max 1 PiB)");
}

TEST(Validate, AnEmptyPayloadParsesButLacksEverything) {
  const auto d = decode_build_request("", std::string_view("b2"));
  ASSERT_TRUE(d.invalid.has_value());
  EXPECT_EQ(d.invalid->build_id, "b2");
  EXPECT_EQ(d.invalid->message, "build_id is required");
}

}  // namespace
}  // namespace cvm
