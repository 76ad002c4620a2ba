// Tests for common/byte_size.h: parsing human sizes and printing them.
#include "common/byte_size.h"

#include <cstdint>
#include <limits>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

void ExpectParses(const std::string& text, uint64_t expected) {
  auto v = ParseByteSize(text);
  ASSERT_THAT(v, IsOk()) << "'" << text << "'";
  EXPECT_EQ(*v, expected) << "'" << text << "'";
}

TEST(ByteSizeTest, ParsesExamplesFromTheHeader) {
  ExpectParses("4GiB", uint64_t{4} << 30);
  ExpectParses("512MiB", uint64_t{512} << 20);
  ExpectParses("1.5GB", 1500000000);
  ExpectParses("65536", 65536);
}

TEST(ByteSizeTest, AllowsSpacesAroundAndBetween) {
  ExpectParses(" 2 KiB ", 2048);
  ExpectParses("2KiB", 2048);
  ExpectParses("\t8 MB\n", 8000000);
  ExpectParses("  65536  ", 65536);
}

TEST(ByteSizeTest, EveryUnit) {
  ExpectParses("7B", 7);
  ExpectParses("7 b", 7);
  ExpectParses("3K", 3000);
  ExpectParses("3KB", 3000);
  ExpectParses("3KiB", 3 * 1024);
  ExpectParses("3M", 3000000);
  ExpectParses("3MB", 3000000);
  ExpectParses("3MiB", uint64_t{3} << 20);
  ExpectParses("3G", 3000000000);
  ExpectParses("3GB", 3000000000);
  ExpectParses("3GiB", uint64_t{3} << 30);
  ExpectParses("3T", 3000000000000);
  ExpectParses("3TB", 3000000000000);
  ExpectParses("3TiB", uint64_t{3} << 40);
}

TEST(ByteSizeTest, UnitsAreCaseInsensitive) {
  ExpectParses("1gib", uint64_t{1} << 30);
  ExpectParses("1GIB", uint64_t{1} << 30);
  ExpectParses("1gB", 1000000000);
  ExpectParses("1kib", 1024);
}

TEST(ByteSizeTest, Decimals) {
  ExpectParses("0.5KiB", 512);
  ExpectParses(".5KiB", 512);
  ExpectParses("2.25 MiB", 2359296);
  ExpectParses("0", 0);
  ExpectParses("0 GiB", 0);
}

TEST(ByteSizeTest, LargeValues) {
  ExpectParses("16383TiB", uint64_t{16383} << 40);
  ExpectParses("1000000TB", 1000000000000000000ull);
}

TEST(ByteSizeTest, RejectsBadUnitsNamingTheText) {
  for (const char* text : {"4 XB", "4GB/s", "4 gibibytes", "4 G iB", "4 iB", "1e3", "4 KIBB",
                           "4 PiB", "4 EB", "10%"}) {
    EXPECT_THAT(ParseByteSize(text), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(text)))
        << text;
  }
}

TEST(ByteSizeTest, RejectsNegative) {
  for (const char* text : {"-1", "-1GiB", "- 1", "-0.5 KiB"}) {
    EXPECT_THAT(ParseByteSize(text), StatusIs(absl::StatusCode::kInvalidArgument)) << text;
  }
}

TEST(ByteSizeTest, RejectsEmptyAndMissingNumbers) {
  for (const char* text : {"", "   ", "GiB", ".", "..", "1.2.3", "+1", "one", "0x10", "1,024"}) {
    EXPECT_THAT(ParseByteSize(text), StatusIs(absl::StatusCode::kInvalidArgument))
        << "'" << text << "'";
  }
}

TEST(ByteSizeTest, RejectsOverflow) {
  EXPECT_THAT(ParseByteSize("20000000TB"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("20000000TB")));
  EXPECT_THAT(ParseByteSize("16777216TiB"),  // Exactly 2^64.
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseByteSize("99999999999999999999"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseByteSize(std::string(400, '9')), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Regression: integers are parsed exactly, not through a double (which lost bits above 2^53
// and rejected valid uint64 values in [1.8e19, 2^64)).
TEST(ByteSizeTest, ParsesLargeIntegersExactly) {
  ExpectParses("9007199254740993", 9007199254740993ull);
  ExpectParses("18446744073709551615", std::numeric_limits<uint64_t>::max());
}

TEST(ByteSizeTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.00 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(uint64_t{2} << 20), "2.00 MiB");
  EXPECT_EQ(FormatBytes((uint64_t{13} << 30) / 4), "3.25 GiB");
  EXPECT_EQ(FormatBytes(uint64_t{1} << 40), "1.00 TiB");
  EXPECT_EQ(FormatBytes(uint64_t{1} << 50), "1024.00 TiB");  // TiB is the largest unit.
  EXPECT_EQ(FormatBytes(std::numeric_limits<uint64_t>::max()), "16777216.00 TiB");
}

TEST(ByteSizeTest, FormatThenParseRoundTripsExactValues) {
  for (uint64_t v : {uint64_t{0}, uint64_t{512}, uint64_t{1536}, uint64_t{2} << 20,
                     (uint64_t{13} << 30) / 4, uint64_t{5} << 40}) {
    auto parsed = ParseByteSize(FormatBytes(v));
    ASSERT_THAT(parsed, IsOk()) << FormatBytes(v);
    EXPECT_EQ(*parsed, v) << FormatBytes(v);
  }
}

}  // namespace
}  // namespace kvpool
