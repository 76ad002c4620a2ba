// Tests for common/kv_spec.h: derived sizes, validation of every field, dtype names.
#include "common/kv_spec.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

// A typical 8B-class model: 32 layers, 8 KV heads of 128, 16 tokens per block.
KvSpec LlamaSpec() {
  KvSpec spec;
  spec.model_id = "meta-llama/Llama-3.1-8B";
  spec.num_layers = 32;
  spec.num_kv_heads = 8;
  spec.head_dim = 128;
  spec.dtype = DType::kFp16;
  spec.tokens_per_block = 16;
  return spec;
}

TEST(KvSpecTest, Sizes) {
  const KvSpec spec = LlamaSpec();
  EXPECT_EQ(spec.SegmentElements(), 16u * 8 * 128);
  EXPECT_EQ(spec.SegmentBytes(), 32768u);
  EXPECT_EQ(spec.SegmentsPerBlock(), 64u);
  EXPECT_EQ(spec.BlockBytes(), uint64_t{2} << 20);  // 2 MiB.
}

TEST(KvSpecTest, Bf16HasTheSameSizes) {
  KvSpec spec = LlamaSpec();
  spec.dtype = DType::kBf16;
  EXPECT_EQ(spec.BlockBytes(), uint64_t{2} << 20);
}

TEST(KvSpecTest, SizesDoNotOverflow32Bits) {
  KvSpec spec = LlamaSpec();
  spec.num_layers = kMaxLayers;
  spec.num_kv_heads = kMaxKvHeads;
  spec.head_dim = kMaxHeadDim;
  spec.tokens_per_block = kMaxTokensPerBlock;
  EXPECT_EQ(spec.SegmentElements(), uint64_t{1} << 38);
  EXPECT_EQ(spec.BlockBytes(), uint64_t{1} << 50);
}

TEST(KvSpecTest, ValidSpecIsOk) { EXPECT_THAT(ValidateSpec(LlamaSpec()), IsOk()); }

TEST(KvSpecTest, SmallestSpecIsOk) {
  KvSpec spec;
  spec.model_id = "m";
  spec.num_layers = 1;
  spec.num_kv_heads = 1;
  spec.head_dim = 1;
  spec.tokens_per_block = 1;
  EXPECT_THAT(ValidateSpec(spec), IsOk());
}

TEST(KvSpecTest, BlockOfExactlyTheLimitIsOk) {
  KvSpec spec = LlamaSpec();
  spec.num_layers = 1024;       // 2048 segments...
  spec.tokens_per_block = 256;  // ...of 256 * 8 * 128 * 2 = 512 KiB = 1 GiB.
  ASSERT_EQ(spec.BlockBytes(), kMaxBlockBytes);
  EXPECT_THAT(ValidateSpec(spec), IsOk());
  spec.tokens_per_block = 257;
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exceeds the limit")));
}

struct FieldCase {
  std::string name;
  uint32_t KvSpec::*field;
  uint32_t max;
};

class KvSpecRangeTest : public ::testing::TestWithParam<FieldCase> {};

TEST_P(KvSpecRangeTest, RejectsZeroAndAboveMaxNamingTheField) {
  const FieldCase& c = GetParam();
  // Keep the block small so that only the field under test can be out of range.
  KvSpec spec;
  spec.model_id = "m";
  spec.num_layers = 1;
  spec.num_kv_heads = 1;
  spec.head_dim = 1;
  spec.tokens_per_block = 1;

  spec.*c.field = 0;
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.name + " = 0")));
  spec.*c.field = c.max + 1;
  EXPECT_THAT(ValidateSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr(c.name + " = " + std::to_string(c.max + 1))));
  spec.*c.field = 0xffffffffu;
  EXPECT_THAT(ValidateSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.name)));
  spec.*c.field = c.max;
  EXPECT_THAT(ValidateSpec(spec), IsOk());
  spec.*c.field = 1;
  EXPECT_THAT(ValidateSpec(spec), IsOk());
}

INSTANTIATE_TEST_SUITE_P(
    Fields, KvSpecRangeTest,
    ::testing::Values(FieldCase{"num_layers", &KvSpec::num_layers, kMaxLayers},
                      FieldCase{"num_kv_heads", &KvSpec::num_kv_heads, kMaxKvHeads},
                      FieldCase{"head_dim", &KvSpec::head_dim, kMaxHeadDim},
                      FieldCase{"tokens_per_block", &KvSpec::tokens_per_block, kMaxTokensPerBlock}),
    [](const ::testing::TestParamInfo<FieldCase>& info) { return info.param.name; });

TEST(KvSpecTest, FirstBadFieldIsNamed) {
  KvSpec spec = LlamaSpec();
  spec.num_kv_heads = 0;
  spec.head_dim = 0;
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_kv_heads")));
}

TEST(KvSpecTest, RejectsBadModelIds) {
  KvSpec spec = LlamaSpec();
  spec.model_id = "";
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = std::string(kMaxModelIdLength + 1, 'a');
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = "has space";
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = "tab\tid";
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = "del\x7f";
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = "caf\xc3\xa9";  // UTF-8 is not ASCII.
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  spec.model_id = std::string("nul\0id", 6);
  EXPECT_THAT(ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
}

TEST(KvSpecTest, AcceptsPrintableModelIdsUpToTheLimit) {
  EXPECT_THAT(ValidateModelId(std::string(kMaxModelIdLength, 'a')), IsOk());
  EXPECT_THAT(ValidateModelId("!~org/Model_v1.2-x:y"), IsOk());
}

TEST(KvSpecTest, RejectsUnknownDType) {
  KvSpec spec = LlamaSpec();
  spec.dtype = static_cast<DType>(3);
  EXPECT_THAT(ValidateSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
  spec.dtype = static_cast<DType>(0);
  EXPECT_THAT(ValidateSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
}

TEST(KvSpecTest, ParseDType) {
  for (const char* name : {"fp16", "float16", "half", "FP16", "Half"}) {
    auto d = ParseDType(name);
    ASSERT_THAT(d, IsOk()) << name;
    EXPECT_EQ(*d, DType::kFp16) << name;
  }
  for (const char* name : {"bf16", "bfloat16", "BF16", "BFloat16"}) {
    auto d = ParseDType(name);
    ASSERT_THAT(d, IsOk()) << name;
    EXPECT_EQ(*d, DType::kBf16) << name;
  }
  for (const char* name : {"", "fp32", "float32", "int8", " fp16", "fp16 "}) {
    EXPECT_THAT(ParseDType(name), StatusIs(absl::StatusCode::kInvalidArgument)) << name;
  }
  EXPECT_THAT(ParseDType("fp8"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'fp8'")));
}

TEST(KvSpecTest, DTypeNameAndSize) {
  EXPECT_EQ(DTypeName(DType::kFp16), "fp16");
  EXPECT_EQ(DTypeName(DType::kBf16), "bf16");
  EXPECT_EQ(DTypeSize(DType::kFp16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBf16), 2u);
  for (DType d : {DType::kFp16, DType::kBf16}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(*parsed, d);
  }
}

TEST(KvSpecTest, EqualityComparesEveryField) {
  const KvSpec base = LlamaSpec();
  EXPECT_EQ(base, LlamaSpec());
  KvSpec other = base;
  other.model_id = "other";
  EXPECT_NE(base, other);
  other = base;
  other.num_layers = 31;
  EXPECT_NE(base, other);
  other = base;
  other.num_kv_heads = 4;
  EXPECT_NE(base, other);
  other = base;
  other.head_dim = 64;
  EXPECT_NE(base, other);
  other = base;
  other.dtype = DType::kBf16;
  EXPECT_NE(base, other);
  other = base;
  other.tokens_per_block = 32;
  EXPECT_NE(base, other);
}

TEST(KvSpecTest, DebugString) {
  EXPECT_EQ(LlamaSpec().DebugString(),
            "model=meta-llama/Llama-3.1-8B layers=32 kv_heads=8 head_dim=128 dtype=fp16 "
            "tokens_per_block=16");
}

}  // namespace
}  // namespace kvpool
