// Tests for common/block_key.h: known answers computed independently with Python's hashlib,
// chaining, extra bytes, partial blocks and argument errors.
#include "common/block_key.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
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
using ::testing::SizeIs;

std::vector<std::string> Hexes(const std::vector<BlockKey>& keys) {
  std::vector<std::string> out;
  for (const BlockKey& k : keys) out.push_back(k.Hex());
  return out;
}

// Known answers. Produced with:
// clang-format off
//   python3 -c "import hashlib,struct;r=bytes(32);k0=hashlib.sha256(r+struct.pack('<4I',1,2,3,4)).digest();print(k0.hex(),hashlib.sha256(k0+struct.pack('<4I',5,6,7,8)).hexdigest())"
constexpr char kK0[] = "d8faa8ec8c0500567ca87b56e4bb666d69cb512e638103891defea24e88cbc92";
constexpr char kK1[] = "d1637bc3762f67abb1ac6b35e87c7ddaee8d04b0c3879d2d3afb2f6dc3f6a56a";
// Same tokens with extra = b'lora:7':
//   python3 -c "import hashlib,struct;r=bytes(32);e=b'lora:7';k0=hashlib.sha256(r+struct.pack('<4I',1,2,3,4)+e).digest();print(k0.hex(),hashlib.sha256(k0+struct.pack('<4I',5,6,7,8)+e).hexdigest())"
constexpr char kX0[] = "fd52a032edd2830dbd0ea560b0c9030f84684628fd28a48e20c8b85f1799762c";
constexpr char kX1[] = "de0b2e5db9ebec5434cdabafaa77249fec3a9d94bd06b5d3345538a0260c14ea";
// Three blocks of 2 tokens with high bits set (checks little-endian packing of every byte):
//   python3 -c "import hashlib,struct;t=[0,0xffffffff,0x01020304,151643,7,0x80000000];k=bytes(32);[print((k:=hashlib.sha256(k+struct.pack('<2I',*t[i:i+2])).digest()).hex()) for i in (0,2,4)]"
constexpr char kB0[] = "6c48a344e674f29e39923ccd74a228268d81682f6d73e71e47b63becf7e42e48";
constexpr char kB1[] = "fca294afcddbde72a8309b52a66c0d0a60db82d7daf0d79ccb7950e70c9d3056";
constexpr char kB2[] = "058239834d5d60845e4c485b932cc11fa5234b50ac6091913655b44e48fd91a4";
// clang-format on
// A block of zero tokens hashes the parent alone:
//   python3 -c "import hashlib;print(hashlib.sha256(bytes(32)).hexdigest())"
constexpr char kEmptyBlockOfRoot[] =
    "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925";

TEST(BlockKeyTest, RootIsThirtyTwoZeroBytes) {
  const BlockKey root = RootBlockKey();
  EXPECT_EQ(root.Hex(), std::string(64, '0'));
  EXPECT_EQ(root.AsStringView(), std::string(32, '\0'));
}

TEST(BlockKeyTest, ChainBlockKeyKnownAnswers) {
  const std::vector<uint32_t> first = {1, 2, 3, 4};
  const std::vector<uint32_t> second = {5, 6, 7, 8};
  const BlockKey k0 = ChainBlockKey(RootBlockKey(), first);
  EXPECT_EQ(k0.Hex(), kK0);
  EXPECT_EQ(ChainBlockKey(k0, second).Hex(), kK1);
}

TEST(BlockKeyTest, ChainBlockKeyOfNoTokensHashesParentOnly) {
  EXPECT_EQ(ChainBlockKey(RootBlockKey(), {}).Hex(), kEmptyBlockOfRoot);
}

TEST(BlockKeyTest, ComputeBlockKeysTwoBlocks) {
  const std::vector<uint32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  auto keys = ComputeBlockKeys(tokens, 4);
  ASSERT_THAT(keys, IsOk());
  EXPECT_THAT(Hexes(*keys), ElementsAre(kK0, kK1));
}

TEST(BlockKeyTest, ComputeBlockKeysWithExtraBytes) {
  const std::vector<uint32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  auto keys = ComputeBlockKeys(tokens, 4, "lora:7");
  ASSERT_THAT(keys, IsOk());
  EXPECT_THAT(Hexes(*keys), ElementsAre(kX0, kX1));
}

TEST(BlockKeyTest, ComputeBlockKeysThreeBlocksLittleEndian) {
  const std::vector<uint32_t> tokens = {0, 0xffffffffu, 0x01020304u, 151643, 7, 0x80000000u};
  auto keys = ComputeBlockKeys(tokens, 2);
  ASSERT_THAT(keys, IsOk());
  EXPECT_THAT(Hexes(*keys), ElementsAre(kB0, kB1, kB2));
}

TEST(BlockKeyTest, TrailingPartialBlockGetsNoKey) {
  const std::vector<uint32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  auto keys = ComputeBlockKeys(tokens, 4);
  ASSERT_THAT(keys, IsOk());
  EXPECT_THAT(Hexes(*keys), ElementsAre(kK0, kK1));
}

TEST(BlockKeyTest, FewerTokensThanOneBlockGiveNoKeys) {
  const std::vector<uint32_t> tokens = {1, 2, 3};
  auto keys = ComputeBlockKeys(tokens, 4);
  ASSERT_THAT(keys, IsOk());
  EXPECT_THAT(*keys, IsEmpty());
  auto none = ComputeBlockKeys({}, 4);
  ASSERT_THAT(none, IsOk());
  EXPECT_THAT(*none, IsEmpty());
}

TEST(BlockKeyTest, PrefixesShareKeys) {
  // Keys depend only on the history up to their block: a longer sequence extends the shorter.
  const std::vector<uint32_t> tokens = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12};
  auto all = ComputeBlockKeys(tokens, 3);
  auto prefix = ComputeBlockKeys(absl::MakeConstSpan(tokens).subspan(0, 6), 3);
  ASSERT_THAT(all, IsOk());
  ASSERT_THAT(prefix, IsOk());
  ASSERT_THAT(*all, SizeIs(4));
  ASSERT_THAT(*prefix, SizeIs(2));
  EXPECT_EQ((*all)[0], (*prefix)[0]);
  EXPECT_EQ((*all)[1], (*prefix)[1]);
}

TEST(BlockKeyTest, SameBlockTokensUnderDifferentParentsDiffer) {
  const std::vector<uint32_t> tokens = {1, 2, 1, 2, 1, 2};
  auto keys = ComputeBlockKeys(tokens, 2);
  ASSERT_THAT(keys, IsOk());
  absl::flat_hash_set<BlockKey> distinct(keys->begin(), keys->end());
  EXPECT_THAT(distinct, SizeIs(3));
}

TEST(BlockKeyTest, ZeroTokensPerBlockIsInvalidArgument) {
  const std::vector<uint32_t> tokens = {1, 2, 3};
  EXPECT_THAT(ComputeBlockKeys(tokens, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tokens_per_block")));
}

TEST(BlockKeyTest, BlockKeyFromBytesRoundTrip) {
  const std::vector<uint32_t> tokens = {1, 2, 3, 4};
  const BlockKey k0 = ChainBlockKey(RootBlockKey(), tokens);
  auto parsed = BlockKeyFromBytes(k0.AsStringView());
  ASSERT_THAT(parsed, IsOk());
  EXPECT_EQ(*parsed, k0);
  EXPECT_EQ(parsed->Hex(), kK0);
}

TEST(BlockKeyTest, BlockKeyFromBytesRejectsWrongSizes) {
  EXPECT_THAT(BlockKeyFromBytes(std::string(31, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("31")));
  EXPECT_THAT(BlockKeyFromBytes(std::string(33, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("33")));
  EXPECT_THAT(BlockKeyFromBytes(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(BlockKeyTest, EqualityAndHash) {
  BlockKey a = RootBlockKey();
  BlockKey b = RootBlockKey();
  EXPECT_EQ(a, b);
  b.bytes[31] = 1;
  EXPECT_NE(a, b);
  absl::flat_hash_set<BlockKey> set = {a, b, a};
  EXPECT_THAT(set, SizeIs(2));
}

}  // namespace
}  // namespace kvpool
