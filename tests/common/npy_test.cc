// Tests for common/npy.h: serialise/parse round trips, headers as numpy writes them, rejection
// of malformed files, token ids.
#include "common/npy.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

constexpr absl::string_view kMagic1 = absl::string_view("\x93NUMPY\x01\x00", 8);

// Little-endian bytes of `values`, each `size` bytes wide.
template <typename T>
std::string LeBytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    uint64_t v = static_cast<uint64_t>(values[i]);
    for (size_t b = 0; b < sizeof(T); ++b) out[i * sizeof(T) + b] = static_cast<char>(v >> (8 * b));
  }
  return out;
}

// A version 1.0 file: magic, 2-byte little-endian header length, `header` padded with spaces
// and a newline to `total_prefix` bytes (magic and length included), then `payload`.
std::string NpyV1(absl::string_view header, size_t total_prefix, absl::string_view payload) {
  const size_t header_len = total_prefix - 10;
  std::string padded(header);
  padded.append(header_len - header.size() - 1, ' ');
  padded.push_back('\n');
  std::string out(kMagic1);
  out.push_back(static_cast<char>(header_len & 0xff));
  out.push_back(static_cast<char>(header_len >> 8));
  return absl::StrCat(out, padded, payload);
}

// The header text of a serialised version 1.0 file.
absl::string_view HeaderOf(absl::string_view file) {
  const size_t len = static_cast<uint8_t>(file[8]) | (static_cast<uint8_t>(file[9]) << 8);
  return file.substr(10, len);
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

NpyArray MakeArray(NpyType type, std::vector<uint64_t> shape, uint32_t seed) {
  NpyArray a;
  a.type = type;
  a.shape = std::move(shape);
  a.data = RandomBytes(a.NumElements() * NpyTypeSize(type), seed);
  return a;
}

TEST(NpyTest, TypeSizesAndNames) {
  EXPECT_EQ(NpyTypeSize(NpyType::kFp16), 2u);
  EXPECT_EQ(NpyTypeSize(NpyType::kBf16), 2u);
  EXPECT_EQ(NpyTypeSize(NpyType::kFp32), 4u);
  EXPECT_EQ(NpyTypeSize(NpyType::kInt32), 4u);
  EXPECT_EQ(NpyTypeSize(NpyType::kUint32), 4u);
  EXPECT_EQ(NpyTypeSize(NpyType::kInt64), 8u);
  EXPECT_EQ(NpyTypeName(NpyType::kFp16), "<f2");
  EXPECT_EQ(NpyTypeName(NpyType::kBf16), "<V2");
  EXPECT_EQ(NpyTypeName(NpyType::kFp32), "<f4");
  EXPECT_EQ(NpyTypeName(NpyType::kInt32), "<i4");
  EXPECT_EQ(NpyTypeName(NpyType::kUint32), "<u4");
  EXPECT_EQ(NpyTypeName(NpyType::kInt64), "<i8");
}

class NpyRoundTripTest : public ::testing::TestWithParam<NpyType> {};

TEST_P(NpyRoundTripTest, SerializeThenParseIsIdentity) {
  const NpyType type = GetParam();
  const NpyArray in = MakeArray(type, {2, 3, 5}, 1234 + static_cast<uint32_t>(type));
  auto bytes = SerializeNpy(in);
  ASSERT_THAT(bytes, IsOk());
  EXPECT_THAT(*bytes, StartsWith(kMagic1));
  const absl::string_view header = HeaderOf(*bytes);
  EXPECT_THAT(std::string(header), HasSubstr(absl::StrCat("'descr': '", NpyTypeName(type), "'")));
  EXPECT_THAT(std::string(header), HasSubstr("'fortran_order': False"));
  EXPECT_THAT(std::string(header), HasSubstr("'shape': (2, 3, 5)"));
  // NPY 1.0: the data starts on a 64-byte boundary and the header ends with a newline.
  EXPECT_EQ((10 + header.size()) % 64, 0u);
  EXPECT_EQ(header.back(), '\n');
  EXPECT_EQ(bytes->size(), 10 + header.size() + in.data.size());

  auto out = ParseNpy(*bytes);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(out->type, type);
  EXPECT_THAT(out->shape, ElementsAre(2, 3, 5));
  EXPECT_EQ(out->data, in.data);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, NpyRoundTripTest,
                         ::testing::Values(NpyType::kFp16, NpyType::kBf16, NpyType::kFp32,
                                           NpyType::kInt32, NpyType::kUint32, NpyType::kInt64),
                         [](const ::testing::TestParamInfo<NpyType>& info) {
                           switch (info.param) {
                             case NpyType::kFp16:
                               return std::string("Fp16");
                             case NpyType::kBf16:
                               return std::string("Bf16");
                             case NpyType::kFp32:
                               return std::string("Fp32");
                             case NpyType::kInt32:
                               return std::string("Int32");
                             case NpyType::kUint32:
                               return std::string("Uint32");
                             case NpyType::kInt64:
                               return std::string("Int64");
                           }
                           return std::string("Unknown");
                         });

TEST(NpyTest, OneDimensionalShapeHasTrailingComma) {
  const NpyArray in = MakeArray(NpyType::kInt32, {5}, 7);
  auto bytes = SerializeNpy(in);
  ASSERT_THAT(bytes, IsOk());
  EXPECT_THAT(std::string(HeaderOf(*bytes)), HasSubstr("'shape': (5,)"));
  auto out = ParseNpy(*bytes);
  ASSERT_THAT(out, IsOk());
  EXPECT_THAT(out->shape, ElementsAre(5));
  EXPECT_EQ(out->data, in.data);
}

TEST(NpyTest, ScalarAndEmptyShapes) {
  const NpyArray scalar = MakeArray(NpyType::kFp32, {}, 8);
  EXPECT_EQ(scalar.NumElements(), 1u);
  auto bytes = SerializeNpy(scalar);
  ASSERT_THAT(bytes, IsOk());
  EXPECT_THAT(std::string(HeaderOf(*bytes)), HasSubstr("'shape': ()"));
  auto out = ParseNpy(*bytes);
  ASSERT_THAT(out, IsOk());
  EXPECT_THAT(out->shape, IsEmpty());
  EXPECT_EQ(out->data, scalar.data);

  const NpyArray empty = MakeArray(NpyType::kFp16, {0, 4}, 9);
  bytes = SerializeNpy(empty);
  ASSERT_THAT(bytes, IsOk());
  out = ParseNpy(*bytes);
  ASSERT_THAT(out, IsOk());
  EXPECT_THAT(out->shape, ElementsAre(0, 4));
  EXPECT_THAT(out->data, IsEmpty());
}

TEST(NpyTest, HugeHeaderUsesVersion3) {
  // 23000 dimensions of 1 need a header longer than 65535 bytes.
  NpyArray in = MakeArray(NpyType::kInt32, std::vector<uint64_t>(23000, 1), 10);
  auto bytes = SerializeNpy(in);
  ASSERT_THAT(bytes, IsOk());
  EXPECT_EQ((*bytes)[6], 3);
  uint32_t len = 0;
  for (int i = 3; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>((*bytes)[8 + i]);
  EXPECT_GT(len, 65535u);
  EXPECT_EQ((12 + len) % 64, 0u);
  auto out = ParseNpy(*bytes);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(out->shape.size(), 23000u);
  EXPECT_EQ(out->data, in.data);
}

TEST(NpyTest, SerializeRejectsDataSizeMismatch) {
  NpyArray a = MakeArray(NpyType::kFp32, {2, 2}, 11);
  a.data.pop_back();
  EXPECT_THAT(SerializeNpy(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a.data += "xy";
  EXPECT_THAT(SerializeNpy(a), StatusIs(absl::StatusCode::kInvalidArgument));
}

// What `np.save(f, np.arange(6, dtype='<i4').reshape(2, 3))` writes with recent numpy: the
// dict repr with sorted keys, GROWTH_AXIS_MAX_DIGITS (21) - len('2') = 20 spaces reserved for
// growing the first axis,
// then space padding and '\n' to a 64-byte boundary (128 bytes of prefix here). Hand-built
// per the NPY 1.0 spec because numpy is not installed where these tests run.
TEST(NpyTest, ParsesHeaderAsNumpyWritesIt) {
  const std::string dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }";
  ASSERT_EQ(dict.size(), 59u);
  const std::string file =
      NpyV1(dict + std::string(20, ' '), 128, LeBytes(std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  ASSERT_EQ(file.size(), 128u + 24);
  ASSERT_EQ(file.substr(0, 10), std::string("\x93NUMPY\x01\x00\x76\x00", 10));  // 118 bytes.
  auto a = ParseNpy(file);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->type, NpyType::kInt32);
  EXPECT_THAT(a->shape, ElementsAre(2, 3));
  auto ids = NpyToTokenIds(*a);
  ASSERT_THAT(ids, IsOk());
  EXPECT_THAT(*ids, ElementsAre(0, 1, 2, 3, 4, 5));
}

// Older numpy (< 1.14) aligned to 16 bytes and had no growth padding.
TEST(NpyTest, ParsesSixteenByteAlignedHeader) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
  const std::string file = NpyV1(dict, 80, std::string(12, '\0'));
  auto a = ParseNpy(file);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->type, NpyType::kFp32);
  EXPECT_THAT(a->shape, ElementsAre(3));
}

TEST(NpyTest, ParsesVersion2Header) {
  const std::string header = "{'descr': '<u4', 'fortran_order': False, 'shape': (2,), }\n";
  std::string file("\x93NUMPY\x02\x00", 8);
  const uint32_t len = header.size();
  for (int i = 0; i < 4; ++i) file.push_back(static_cast<char>(len >> (8 * i)));
  file += header;
  file += LeBytes(std::vector<uint32_t>{7, 0xffffffffu});
  auto a = ParseNpy(file);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->type, NpyType::kUint32);
  auto ids = NpyToTokenIds(*a);
  ASSERT_THAT(ids, IsOk());
  EXPECT_THAT(*ids, ElementsAre(7, 0xffffffffu));
}

TEST(NpyTest, AcceptsBfloat16Spellings) {
  for (const char* descr : {"<V2", "|V2", "bfloat16"}) {
    const std::string dict =
        absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (2,), }");
    auto a = ParseNpy(NpyV1(dict, 128, "abcd"));
    ASSERT_THAT(a, IsOk()) << descr;
    EXPECT_EQ(a->type, NpyType::kBf16) << descr;
    EXPECT_EQ(a->data, "abcd");
  }
}

TEST(NpyTest, RejectsBadMagic) {
  auto good = SerializeNpy(MakeArray(NpyType::kFp32, {2}, 12));
  ASSERT_THAT(good, IsOk());
  std::string bad = *good;
  bad[1] = 'M';
  EXPECT_THAT(ParseNpy(bad), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(ParseNpy(""), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(ParseNpy(std::string(kMagic1)),  // Too short for the header length.
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseNpy("PK\x03\x04 not an npy file at all"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
}

TEST(NpyTest, RejectsUnsupportedVersion) {
  auto good = SerializeNpy(MakeArray(NpyType::kFp32, {2}, 13));
  ASSERT_THAT(good, IsOk());
  std::string bad = *good;
  bad[6] = 4;
  EXPECT_THAT(ParseNpy(bad), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version")));
}

TEST(NpyTest, RejectsTruncatedHeader) {
  auto good = SerializeNpy(MakeArray(NpyType::kFp32, {2}, 14));
  ASSERT_THAT(good, IsOk());
  const size_t header_end = 10 + HeaderOf(*good).size();
  for (size_t cut : {size_t{10}, size_t{11}, header_end / 2, header_end - 1}) {
    EXPECT_THAT(ParseNpy(absl::string_view(*good).substr(0, cut)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")))
        << "cut at " << cut;
  }
  std::string v2("\x93NUMPY\x02\x00\x10\x00", 10);  // Needs 12 bytes for its header length.
  EXPECT_THAT(ParseNpy(v2), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")));
}

TEST(NpyTest, RejectsPayloadSizeMismatch) {
  auto good = SerializeNpy(MakeArray(NpyType::kInt64, {3}, 15));
  ASSERT_THAT(good, IsOk());
  std::string shorter = good->substr(0, good->size() - 1);
  EXPECT_THAT(ParseNpy(shorter),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload is 23 bytes")));
  std::string longer = *good + "x";
  EXPECT_THAT(ParseNpy(longer),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload is 25 bytes")));
}

TEST(NpyTest, RejectsFortranOrder) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }";
  EXPECT_THAT(ParseNpy(NpyV1(dict, 128, std::string(16, '\0'))),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("Fortran")));
}

TEST(NpyTest, RejectsUnsupportedDtypes) {
  for (const char* descr : {"<f8", "|u1", "|i1", ">f4", "<i2", "|b1", "<c8"}) {
    const std::string dict =
        absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (), }");
    EXPECT_THAT(ParseNpy(NpyV1(dict, 128, std::string(8, '\0'))),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(descr)))
        << descr;
  }
}

TEST(NpyTest, RejectsMalformedHeaders) {
  const std::vector<std::string> dicts = {
      "{'fortran_order': False, 'shape': (2,), }",                    // No descr.
      "{'descr': '<f4', 'shape': (2,), }",                            // No fortran_order.
      "{'descr': '<f4', 'fortran_order': False, }",                   // No shape.
      "{'descr': '<f4', 'fortran_order': False, 'shape': (two,), }",  // Bad dimension.
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, }",      // Unclosed tuple.
      "{'descr': '<f4, 'fortran_order': False, 'shape': (2,), }",     // Quote missing.
      "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }",   // Negative dimension.
  };
  for (const std::string& dict : dicts) {
    EXPECT_THAT(ParseNpy(NpyV1(dict, 128, std::string(8, '\0'))),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << dict;
  }
}

TEST(NpyTest, WriteThenReadFile) {
  const std::string path = ::testing::TempDir() + "/npy_test_write_then_read.npy";
  const NpyArray in = MakeArray(NpyType::kBf16, {4, 2}, 16);
  ASSERT_THAT(WriteNpy(path, in), IsOk());
  auto out = ReadNpy(path);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(out->type, NpyType::kBf16);
  EXPECT_THAT(out->shape, ElementsAre(4, 2));
  EXPECT_EQ(out->data, in.data);
  std::remove(path.c_str());
}

TEST(NpyTest, ReadNpyErrors) {
  const std::string dir = ::testing::TempDir();
  EXPECT_THAT(ReadNpy(dir + "/npy_test_does_not_exist.npy"), StatusIs(absl::StatusCode::kNotFound));
  const std::string path = dir + "/npy_test_garbage.npy";
  ASSERT_THAT(WriteStringToFile(path, "garbage"), IsOk());
  EXPECT_THAT(ReadNpy(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(path)));
  std::remove(path.c_str());
}

TEST(NpyTest, ReadAndWriteStringFiles) {
  const std::string path = ::testing::TempDir() + "/npy_test_bytes.bin";
  const std::string contents = RandomBytes(1000, 17) + std::string("\0\0", 2);
  ASSERT_THAT(WriteStringToFile(path, contents), IsOk());
  auto back = ReadFileToString(path);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(*back, contents);
  std::remove(path.c_str());
  EXPECT_THAT(WriteStringToFile(::testing::TempDir() + "/no/such/dir/file", "x"),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(NpyTest, TokenIdsFromInt32) {
  NpyArray a;
  a.type = NpyType::kInt32;
  a.shape = {2, 2};
  a.data = LeBytes(std::vector<int32_t>{0, 1, 151643, 0x7fffffff});
  auto ids = NpyToTokenIds(a);
  ASSERT_THAT(ids, IsOk());
  EXPECT_THAT(*ids, ElementsAre(0, 1, 151643, 0x7fffffffu));
}

TEST(NpyTest, TokenIdsFromInt64) {
  NpyArray a;
  a.type = NpyType::kInt64;
  a.shape = {3};
  a.data = LeBytes(std::vector<int64_t>{5, 0xffffffffLL, 42});
  auto ids = NpyToTokenIds(a);
  ASSERT_THAT(ids, IsOk());
  EXPECT_THAT(*ids, ElementsAre(5, 0xffffffffu, 42));
}

TEST(NpyTest, TokenIdsRejectNegativeAndTooLarge) {
  NpyArray a;
  a.type = NpyType::kInt32;
  a.shape = {3};
  a.data = LeBytes(std::vector<int32_t>{1, 2, -1});
  EXPECT_THAT(NpyToTokenIds(a),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("-1 at index 2")));

  a.type = NpyType::kInt64;
  a.shape = {2};
  a.data = LeBytes(std::vector<int64_t>{-5, 1});
  EXPECT_THAT(NpyToTokenIds(a), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("-5")));
  a.data = LeBytes(std::vector<int64_t>{1, int64_t{1} << 32});
  EXPECT_THAT(NpyToTokenIds(a),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("4294967296")));
}

TEST(NpyTest, TokenIdsRejectFloatTypes) {
  for (NpyType type : {NpyType::kFp16, NpyType::kBf16, NpyType::kFp32}) {
    const NpyArray a = MakeArray(type, {4}, 18);
    EXPECT_THAT(NpyToTokenIds(a),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(NpyTypeName(type))));
  }
}

TEST(NpyTest, TokenIdsOfEmptyIntArrayAreEmpty) {
  const NpyArray a = MakeArray(NpyType::kInt32, {0}, 19);
  auto ids = NpyToTokenIds(a);
  ASSERT_THAT(ids, IsOk());
  EXPECT_THAT(*ids, IsEmpty());
}

// Regression: the dtype is checked before the elements, so an empty float array is refused.
TEST(NpyTest, TokenIdsRejectEmptyFloatArray) {
  const NpyArray a = MakeArray(NpyType::kFp32, {0}, 20);
  EXPECT_THAT(NpyToTokenIds(a), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Regression: the element count is computed without wrapping, so a shape whose count is 2^64
// (== 0 mod 2^64) is refused rather than accepted with an empty payload.
TEST(NpyTest, RejectsShapeWhoseElementCountOverflows) {
  const std::string dict =
      "{'descr': '<i4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }";
  EXPECT_THAT(ParseNpy(NpyV1(dict, 128, "")), StatusIs(absl::StatusCode::kInvalidArgument));
  // (2^63 + 1) * 2 wraps to 2 elements.
  const std::string dict2 =
      "{'descr': '<i4', 'fortran_order': False, 'shape': (9223372036854775809, 2), }";
  EXPECT_THAT(ParseNpy(NpyV1(dict2, 128, std::string(8, '\0'))),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvpool
