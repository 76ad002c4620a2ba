// Tests for common/encoded_segment.h: the header layout, round trips, and that every malformed
// byte string is refused with DataLoss or InvalidArgument without reading out of bounds.
#include "common/encoded_segment.h"

#include <cstring>
#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

SegmentHeader Header() {
  SegmentHeader h;
  h.params = CodecParams{CodecId::kKivi, 4, 1, 32, 0.25f, 7};
  h.shape = SegmentShape{16, 8, 128, DType::kBf16, SegmentKind::kValue};
  return h;
}

TEST(EncodedSegmentTest, LayoutMatchesTheDocumentation) {
  const std::string bytes = SerializeSegment(Header(), "payload");
  ASSERT_EQ(bytes.size(), kSegmentHeaderBytes + 7);
  EXPECT_EQ(bytes.substr(0, 4), "KVSG");
  EXPECT_EQ(bytes[4], 1);   // version
  EXPECT_EQ(bytes[5], 1);   // kivi
  EXPECT_EQ(bytes[6], 2);   // bf16
  EXPECT_EQ(bytes[7], 1);   // value
  uint32_t tokens, heads, dim;
  std::memcpy(&tokens, bytes.data() + 8, 4);
  std::memcpy(&heads, bytes.data() + 12, 4);
  std::memcpy(&dim, bytes.data() + 16, 4);
  EXPECT_EQ(tokens, 16u);
  EXPECT_EQ(heads, 8u);
  EXPECT_EQ(dim, 128u);
  EXPECT_EQ(bytes[24], 4);  // bits
  EXPECT_EQ(bytes[25], 1);  // flags
  uint16_t group;
  std::memcpy(&group, bytes.data() + 26, 2);
  EXPECT_EQ(group, 32);
  float budget;
  std::memcpy(&budget, bytes.data() + 28, 4);
  EXPECT_EQ(budget, 0.25f);
  uint64_t payload_size;
  std::memcpy(&payload_size, bytes.data() + 40, 8);
  EXPECT_EQ(payload_size, 7u);
  EXPECT_EQ(bytes.substr(kSegmentHeaderBytes), "payload");
}

TEST(EncodedSegmentTest, RoundTrip) {
  const std::string bytes = SerializeSegment(Header(), "payload");
  absl::string_view payload;
  auto h = ParseSegment(bytes, &payload);
  ASSERT_THAT(h, IsOk());
  EXPECT_EQ(payload, "payload");
  EXPECT_TRUE(h->params == Header().params);
  EXPECT_EQ(h->shape.tokens, 16u);
  EXPECT_EQ(h->shape.dtype, DType::kBf16);
  EXPECT_EQ(h->shape.kind, SegmentKind::kValue);
  EXPECT_EQ(h->payload_bytes, 7u);
}

TEST(EncodedSegmentTest, EmptyPayload) {
  const std::string bytes = SerializeSegment(Header(), "");
  absl::string_view payload;
  EXPECT_THAT(ParseSegment(bytes, &payload), IsOk());
  EXPECT_TRUE(payload.empty());
}

TEST(EncodedSegmentTest, EveryFlippedBitIsRefused) {
  const std::string good = SerializeSegment(Header(), "some payload bytes");
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = good;
      bad[i] ^= static_cast<char>(1 << bit);
      absl::string_view payload;
      const absl::Status s = ParseSegment(bad, &payload).status();
      EXPECT_FALSE(s.ok()) << "byte " << i << " bit " << bit;
      EXPECT_TRUE(absl::IsDataLoss(s) || absl::IsInvalidArgument(s)) << s;
    }
  }
}

TEST(EncodedSegmentTest, TruncatedAndExtendedAreDataLoss) {
  const std::string good = SerializeSegment(Header(), "some payload bytes");
  absl::string_view payload;
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_THAT(ParseSegment(good.substr(0, n), &payload),
                StatusIs(absl::StatusCode::kDataLoss))
        << n;
  }
  EXPECT_THAT(ParseSegment(good + "x", &payload), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(EncodedSegmentTest, ValidChecksumButBadFieldsAreInvalidArgument) {
  // Fields are checked after the checksum: build segments whose checksum is right.
  SegmentHeader h = Header();
  h.shape.tokens = kMaxTokensPerBlock + 1;
  absl::string_view payload;
  EXPECT_THAT(ParseSegment(SerializeSegment(h, "x"), &payload),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside the limits")));
  h = Header();
  h.params.codec = static_cast<CodecId>(9);
  EXPECT_THAT(ParseSegment(SerializeSegment(h, "x"), &payload),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec")));
  h = Header();
  h.shape.dtype = static_cast<DType>(3);
  EXPECT_THAT(ParseSegment(SerializeSegment(h, "x"), &payload),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
  h = Header();
  h.shape.kind = static_cast<SegmentKind>(2);
  EXPECT_THAT(ParseSegment(SerializeSegment(h, "x"), &payload),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kind")));
}

TEST(EncodedSegmentTest, RandomBytesNeverParse) {
  std::mt19937_64 rng(3);
  absl::string_view payload;
  for (int i = 0; i < 20000; ++i) {
    std::string junk(rng() % 200, '\0');
    for (char& c : junk) c = static_cast<char>(rng());
    if (i % 2 == 0 && junk.size() >= 4) std::memcpy(junk.data(), "KVSG", 4);
    EXPECT_FALSE(ParseSegment(junk, &payload).ok());
  }
}

TEST(EncodedSegmentTest, CodecNames) {
  for (int c = 0; c < kNumCodecs; ++c) {
    auto id = ParseCodecName(CodecName(static_cast<CodecId>(c)));
    ASSERT_THAT(id, IsOk());
    EXPECT_EQ(static_cast<int>(*id), c);
  }
  EXPECT_THAT(ParseCodecName("zstd"), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvpool
