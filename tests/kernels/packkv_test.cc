// Tests of the packkv codec: the reference against hand-computed payloads, the error budget on
// Gaussian data with outlier channels, the fast CPU path and the CUDA kernels against the
// reference (bit-exact), odd and empty shapes, and corrupt payloads.
#include "kernels/packkv.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/device.h"
#include "tests/kernels/packkv_test_helpers.h"
#include "tests/util/segment_shape.h"
#include "tests/util/status_matchers.h"

namespace kvpool::kernels {
namespace {

using ::kvpool::kernels::packkv_test::Params;
using ::kvpool::test_util::Shape;
using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::ElementsAreArray;

float ToF(uint16_t h, DType dtype) {
  return dtype == DType::kFp16 ? Fp16ToFloat(h) : Bf16ToFloat(h);
}
uint16_t FromF(float f, DType dtype) {
  return dtype == DType::kFp16 ? FloatToFp16(f) : FloatToBf16(f);
}

// N(0, 1) everywhere, except `outliers` channels per head with a large scale and offset (the
// outlier channels of LLM keys).
std::vector<uint16_t> GaussianWithOutliers(const SegmentShape& shape, uint32_t seed,
                                           int outliers = 4, float outlier_scale = 12.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> scale(shape.head_dim, 1.0f), offset(shape.head_dim, 0.0f);
  for (int k = 0; k < outliers && k < static_cast<int>(shape.head_dim); ++k) {
    const uint32_t d = (k * 37 + 5) % shape.head_dim;
    scale[d] = outlier_scale;
    offset[d] = (k % 2 ? -2.0f : 2.0f) * outlier_scale;
  }
  std::vector<uint16_t> out(shape.Elements());
  for (uint64_t i = 0; i < out.size(); ++i) {
    const uint32_t d = i % shape.head_dim;
    out[i] = FromF(normal(rng) * scale[d] + offset[d], shape.dtype);
  }
  return out;
}

// Tokens alternate between two regimes: an outlier channel far above (even tokens) or far below
// (odd tokens) the rest, which moves every other channel's codes between the top and the bottom
// of the code range. Sorting the tokens puts each regime in its own packs.
std::vector<uint16_t> AlternatingRegimes(const SegmentShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> out(shape.Elements());
  for (uint64_t i = 0; i < out.size(); ++i) {
    const uint32_t d = i % shape.head_dim;
    const uint64_t t = i / (uint64_t{shape.head_dim} * shape.kv_heads);
    const float v = d == 0 ? (t % 2 ? -40.0f : 40.0f) + normal(rng) : normal(rng);
    out[i] = FromF(v, shape.dtype);
  }
  return out;
}

double RelativeError(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, DType dtype) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = ToF(a[i], dtype), y = ToF(b[i], dtype);
    num += (x - y) * (x - y);
    den += x * x;
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

absl::StatusOr<std::vector<uint8_t>> Encode(Path path, const SegmentShape& shape,
                                            const CodecParams& params,
                                            const std::vector<uint16_t>& in) {
  std::vector<uint8_t> out(packkv::MaxPayloadBytes(shape, params));
  auto size = path == Path::kRef
                  ? packkv::EncodeRef(shape, params, in.data(), out.data(), out.size())
                  : packkv::EncodeCpu(shape, params, in.data(), out.data(), out.size());
  if (!size.ok()) return size.status();
  if (*size > out.size()) return absl::InternalError("encoder overran MaxPayloadBytes");
  out.resize(*size);
  return out;
}

absl::Status Decode(Path path, const SegmentShape& shape, const CodecParams& params,
                    const std::vector<uint8_t>& payload, std::vector<uint16_t>* out) {
  out->assign(shape.Elements(), 0xdead);
  return path == Path::kRef
             ? packkv::DecodeRef(shape, params, payload.data(), payload.size(), out->data())
             : packkv::DecodeCpu(shape, params, payload.data(), payload.size(), out->data());
}

// Encodes on both host paths, checks that the payloads are identical and that both decoders give
// identical values on both; returns the reference payload and its decoding.
void RoundTripBothPaths(const SegmentShape& shape, const CodecParams& params,
                        const std::vector<uint16_t>& in, std::vector<uint8_t>* payload,
                        std::vector<uint16_t>* decoded) {
  auto ref = Encode(Path::kRef, shape, params, in);
  auto cpu = Encode(Path::kCpu, shape, params, in);
  ASSERT_THAT(ref, IsOk());
  ASSERT_THAT(cpu, IsOk());
  ASSERT_EQ(*ref, *cpu) << "cpu and ref payloads differ";
  std::vector<uint16_t> out_ref, out_cpu;
  ASSERT_THAT(Decode(Path::kRef, shape, params, *ref, &out_ref), IsOk());
  ASSERT_THAT(Decode(Path::kCpu, shape, params, *ref, &out_cpu), IsOk());
  ASSERT_EQ(out_ref, out_cpu) << "cpu and ref decodings differ";
  *payload = *std::move(ref);
  *decoded = std::move(out_ref);
}

// ---- Hand-computed cases. ----

// T=3, H=1, D=3, fp16, 2-bit codes, packs of 2 tokens. A budget far below what 2 bits reach
// clamps e to 1/3, float(1/3) = 0.33333334:
//   t0 [1, 2, 4]:   mn 1, R 3, s = fp16_down(1.0) = 1.0,            codes [0, 1, 3]
//   t1 [5, 5, 8]:   mn 5, R 3, s = 1.0,                             codes [0, 0, 3]
//   t2 [-2, 0, -1]: mn -2, R 2, s = fp16_down(0.6666667) = 0.66650390625 (0x3955),
//                   inv = 1.5003663, top = nearbyint(3.0007) = 3 -> 3, codes [0, 3, 2]
//                   (x - mn = 2 -> 3.0007 -> min(., 3) = 3; 1 -> 1.5004 -> 2).
// Pack 0 (t0, t1): d0 [0,0] min 0 w 0; d1 [1,0] min 0 w 1; d2 [3,3] min 3 w 0; mw 2.
//   header 02 10 00; mins 0,0,3 at 2 bits -> 0x30; d1 values 1,0 at 1 bit -> 0x01.
// Pack 1 (t2):     d0 [0] min 0; d1 [3] min 3; d2 [2] min 2; all w 0; mw 2.
//   header 02 00 00; mins 0,3,2 at 2 bits -> 0x2c.
// Decoding t2: 3*0.6665039 - 2 = -0.00048828125, 2*0.6665039 - 2 = -0.6669921875.
const std::vector<float> kHandInput = {1, 2, 4, 5, 5, 8, -2, 0, -1};
const std::vector<uint8_t> kHandPayload = {0x00, 0x3c, 0x00, 0x3c, 0x00, 0x45,
                                           0x00, 0x3c, 0x00, 0xc0, 0x55, 0x39,  // rows
                                           0x02, 0x10, 0x00, 0x02, 0x00, 0x00,  // headers
                                           0x30, 0x01,                          // pack 0
                                           0x2c};                               // pack 1
const std::vector<float> kHandDecoded = {1, 2, 4, 5, 5, 8, -2, -0.00048828125f, -0.6669921875f};

std::vector<uint16_t> HalfVector(const std::vector<float>& v, DType dtype = DType::kFp16) {
  std::vector<uint16_t> out;
  for (float f : v) out.push_back(FromF(f, dtype));
  return out;
}

TEST(PackKvTest, HandComputedPayload) {
  const SegmentShape shape = Shape(3, 1, 3);
  const CodecParams params = Params(1e-4f, false, 2, 2);
  const std::vector<uint16_t> in = HalfVector(kHandInput);
  std::vector<uint8_t> payload;
  std::vector<uint16_t> decoded;
  RoundTripBothPaths(shape, params, in, &payload, &decoded);
  EXPECT_THAT(payload, ElementsAreArray(kHandPayload));
  EXPECT_THAT(decoded, ElementsAreArray(HalfVector(kHandDecoded)));
}

TEST(PackKvTest, HandComputedReordering) {
  // Code sums: t0 4, t1 3, t2 5 -> positions hold tokens 1, 0, 2. Pack 0 is (t1, t0), whose
  // column d1 now holds the values 0, 1 (0x02); mins and widths do not change.
  const SegmentShape shape = Shape(3, 1, 3);
  const CodecParams params = Params(1e-4f, true, 2, 2);
  const std::vector<uint16_t> in = HalfVector(kHandInput);
  std::vector<uint8_t> payload;
  std::vector<uint16_t> decoded;
  RoundTripBothPaths(shape, params, in, &payload, &decoded);
  const std::vector<uint8_t> expected = {0x00, 0x45, 0x00, 0x3c, 0x00, 0x3c,
                                         0x00, 0x3c, 0x00, 0xc0, 0x55, 0x39,  // rows
                                         0x01, 0x00, 0x00, 0x00, 0x02, 0x00,  // permutation
                                         0x02, 0x10, 0x00, 0x02, 0x00, 0x00,  // headers
                                         0x30, 0x02, 0x2c};
  EXPECT_THAT(payload, ElementsAreArray(expected));
  EXPECT_THAT(decoded, ElementsAreArray(HalfVector(kHandDecoded)));
}

TEST(PackKvTest, HandWrittenPayloadDecodes) {
  // bf16, T=1, D=2, bits 4: min -1 (0xbf80), step 0.5 (0x3f00); one pack: mw 3 (minimum 5),
  // widths d0 0, d1 2 -> header 03 20; mins 5, 0 at 3 bits -> 0x05; d1 value 3 -> 0x03.
  // Decoding: d0 = 5*0.5 - 1 = 1.5, d1 = (0 + 3)*0.5 - 1 = 0.5.
  const SegmentShape shape = Shape(1, 1, 2, DType::kBf16);
  const CodecParams params = Params(0.02f, false, 4, 16);
  const std::vector<uint8_t> payload = {0x80, 0xbf, 0x00, 0x3f, 0x03, 0x20, 0x05, 0x03};
  for (Path path : {Path::kRef, Path::kCpu}) {
    std::vector<uint16_t> out;
    ASSERT_THAT(Decode(path, shape, params, payload, &out), IsOk());
    EXPECT_THAT(out, ElementsAreArray(HalfVector({1.5f, 0.5f}, DType::kBf16)));
  }
}

// ---- Error budget and compression. ----

// Budgets below about 0.006 need more than 8 bits on Gaussian rows of 128 (min-max over a row
// spans ~5 sigma; 255 steps of it leave ~0.006 sigma of error), so 0.005 runs with 12 max bits.
struct BudgetCase {
  float budget;
  DType dtype;
  uint8_t bits;
};

class PackKvBudgetTest : public ::testing::TestWithParam<BudgetCase> {};

TEST_P(PackKvBudgetTest, ErrorWithinBudgetOnGaussianWithOutliers) {
  const auto [budget, dtype, bits] = GetParam();
  const SegmentShape shape = Shape(64, 4, 128, dtype);
  for (uint32_t seed : {1u, 2u, 3u}) {
    const std::vector<uint16_t> in = GaussianWithOutliers(shape, seed);
    std::vector<uint8_t> payload;
    std::vector<uint16_t> out;
    RoundTripBothPaths(shape, Params(budget, false, bits), in, &payload, &out);
    const double err = RelativeError(in, out, dtype);
    EXPECT_LE(err, budget) << "seed " << seed;
    EXPECT_GE(err, 0.5 * budget) << "the step is needlessly small; seed " << seed;
    RecordProperty(absl::StrCat("rel_error_seed", seed), absl::StrCat(err));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Budgets, PackKvBudgetTest,
    ::testing::Values(BudgetCase{0.005f, DType::kFp16, 12}, BudgetCase{0.02f, DType::kFp16, 8},
                      BudgetCase{0.05f, DType::kFp16, 8}, BudgetCase{0.1f, DType::kFp16, 8},
                      BudgetCase{0.005f, DType::kBf16, 12}, BudgetCase{0.02f, DType::kBf16, 8},
                      BudgetCase{0.05f, DType::kBf16, 8}, BudgetCase{0.1f, DType::kBf16, 8}),
    [](const ::testing::TestParamInfo<BudgetCase>& info) {
      return absl::StrCat(DTypeName(info.param.dtype), "_",
                          static_cast<int>(info.param.budget * 1000), "e3_bits", info.param.bits);
    });

TEST(PackKvTest, ErrorWithinBudgetOnPlainGaussian) {
  const SegmentShape shape = Shape(48, 2, 128);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 9, /*outliers=*/0);
  for (float budget : {0.005f, 0.02f, 0.05f, 0.1f}) {
    std::vector<uint8_t> payload;
    std::vector<uint16_t> out;
    RoundTripBothPaths(shape, Params(budget, false, budget < 0.01f ? 12 : 8), in, &payload, &out);
    const double err = RelativeError(in, out, shape.dtype);
    EXPECT_LE(err, budget);
    EXPECT_GE(err, 0.5 * budget);
  }
}

TEST(PackKvTest, RatioGrowsWithBudget) {
  const SegmentShape shape = Shape(64, 4, 128);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 4);
  double last_ratio = 1.0;
  for (float budget : {0.005f, 0.02f, 0.05f, 0.1f}) {
    auto payload = Encode(Path::kCpu, shape, Params(budget), in);
    ASSERT_THAT(payload, IsOk());
    const double ratio = static_cast<double>(shape.Bytes()) / payload->size();
    EXPECT_GT(ratio, last_ratio) << "budget " << budget;
    RecordProperty(absl::StrCat("ratio_at_", budget), absl::StrCat(ratio));
    last_ratio = ratio;
  }
}

TEST(PackKvTest, MaxBitsCapsTheCodes) {
  // Budgets that need more bits than allowed: the codes stay within the max bits (every width
  // and minimum width in the headers is at most that), and the budget is not met.
  const SegmentShape shape = Shape(32, 2, 64);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 5);
  for (auto [budget, bits] : {std::pair<float, uint8_t>{0.001f, 3}, {0.005f, 8}}) {
    const CodecParams params = Params(budget, false, bits);
    std::vector<uint8_t> payload;
    std::vector<uint16_t> out;
    RoundTripBothPaths(shape, params, in, &payload, &out);
    EXPECT_GT(RelativeError(in, out, shape.dtype), budget);
    EXPECT_LE(payload.size(), packkv::MaxPayloadBytes(shape, params));
    const uint64_t headers = 4 * 32 * 2, header_bytes = 1 + 32, packs = 2 * 2;
    for (uint64_t k = 0; k < packs; ++k) {
      const uint8_t* h = payload.data() + headers + k * header_bytes;
      EXPECT_LE(h[0], bits);
      for (uint64_t j = 1; j < header_bytes; ++j) {
        EXPECT_LE(h[j] & 15, bits);
        EXPECT_LE(h[j] >> 4, bits);
      }
    }
  }
}

// ---- Re-ordering. ----

TEST(PackKvTest, ReorderingOnAndOffRoundTrip) {
  const SegmentShape shape = Shape(40, 3, 64);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 6);
  std::vector<uint8_t> off_payload, on_payload;
  std::vector<uint16_t> off_out, on_out;
  RoundTripBothPaths(shape, Params(0.02f, false), in, &off_payload, &off_out);
  RoundTripBothPaths(shape, Params(0.02f, true), in, &on_payload, &on_out);
  EXPECT_LE(RelativeError(in, off_out, shape.dtype), 0.02);
  EXPECT_LE(RelativeError(in, on_out, shape.dtype), 0.02);
  // Re-ordering changes only where the rows are stored: the same codes, the same values.
  EXPECT_EQ(off_out, on_out);
}

TEST(PackKvTest, ReorderingShrinksDataBuiltForIt) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const SegmentShape shape = Shape(64, 2, 128, dtype);
    const std::vector<uint16_t> in = AlternatingRegimes(shape, 7);
    std::vector<uint8_t> off_payload, on_payload;
    std::vector<uint16_t> off_out, on_out;
    RoundTripBothPaths(shape, Params(0.02f, false), in, &off_payload, &off_out);
    RoundTripBothPaths(shape, Params(0.02f, true), in, &on_payload, &on_out);
    EXPECT_LT(on_payload.size(), off_payload.size());
    EXPECT_EQ(off_out, on_out);
    RecordProperty(absl::StrCat("reorder_bytes_", DTypeName(dtype)),
                   absl::StrCat(off_payload.size(), " -> ", on_payload.size()));
  }
}

// ---- Shapes, dtypes, parameters: CPU and reference agree bit for bit. ----

struct ShapeCase {
  uint32_t tokens, heads, dim;
};

TEST(PackKvTest, OddShapesBothDtypesBothOrders) {
  const ShapeCase cases[] = {{1, 1, 1},  {1, 2, 128}, {17, 2, 64}, {16, 1, 1},  {33, 3, 1},
                             {5, 1, 3},  {31, 2, 9},  {17, 1, 8},  {48, 1, 24}, {100, 2, 130},
                             {2, 1, 16}, {15, 4, 15}, {16, 8, 7}};
  for (const ShapeCase& c : cases) {
    for (DType dtype : {DType::kFp16, DType::kBf16}) {
      for (bool reorder : {false, true}) {
        SCOPED_TRACE(absl::StrCat(c.tokens, "x", c.heads, "x", c.dim, " ", DTypeName(dtype),
                                  reorder ? " reorder" : ""));
        const SegmentShape shape = Shape(c.tokens, c.heads, c.dim, dtype);
        const std::vector<uint16_t> in = GaussianWithOutliers(shape, c.tokens * 31 + c.dim, 1);
        std::vector<uint8_t> payload;
        std::vector<uint16_t> out;
        RoundTripBothPaths(shape, Params(0.02f, reorder), in, &payload, &out);
        EXPECT_LE(payload.size(), packkv::MaxPayloadBytes(shape, Params(0.02f, reorder)));
        if (c.dim == 1) EXPECT_EQ(in, out) << "one-element rows are exact";
      }
    }
  }
}

TEST(PackKvTest, ParameterVariantsMatchReference) {
  const SegmentShape shapes[] = {Shape(64, 2, 128), Shape(37, 3, 96, DType::kBf16)};
  for (const SegmentShape& shape : shapes) {
    const std::vector<uint16_t> in = GaussianWithOutliers(shape, 11);
    for (uint8_t bits : {2, 4, 8, 12, 15, 16}) {
      for (uint16_t group : {1, 5, 8, 16, 32, 64}) {
        for (float budget : {0.0005f, 0.03f, 0.3f}) {
          SCOPED_TRACE(absl::StrCat("bits ", bits, " group ", group, " budget ", budget));
          const CodecParams params = Params(budget, group % 2 == 0, bits, group);
          std::vector<uint8_t> payload;
          std::vector<uint16_t> out;
          RoundTripBothPaths(shape, params, in, &payload, &out);
          EXPECT_LE(payload.size(), packkv::MaxPayloadBytes(shape, params));
        }
      }
    }
  }
}

TEST(PackKvTest, SpecialValuesRoundTrip) {
  // Constant rows (exact), zeros of both signs, subnormals, and values near the dtype's largest
  // finite value, where a rounded-up code would overflow: every decoded value stays finite.
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const SegmentShape shape = Shape(20, 2, 16, dtype);
    const float big = dtype == DType::kFp16 ? 65504.0f : 3.3e38f;
    const float tiny = dtype == DType::kFp16 ? 6e-8f : 1e-39f;
    std::vector<uint16_t> in(shape.Elements());
    std::mt19937 rng(12);
    std::uniform_real_distribution<float> u(-1, 1);
    for (uint64_t i = 0; i < in.size(); ++i) {
      const uint64_t row = i / shape.head_dim;
      float v = 0;
      switch (row % 5) {
        case 0:
          v = 3.5f;
          break;  // constant row
        case 1:
          v = (i % 2) ? -0.0f : 0.0f;
          break;  // signed zeros
        case 2:
          v = u(rng) * big;
          break;  // huge range
        case 3:
          v = big - std::fabs(u(rng)) * big * 0.01f;
          break;  // near the top
        case 4:
          v = u(rng) * tiny * 4;
          break;  // subnormals
      }
      in[i] = FromF(v, dtype);
    }
    for (bool reorder : {false, true}) {
      std::vector<uint8_t> payload;
      std::vector<uint16_t> out;
      RoundTripBothPaths(shape, Params(0.05f, reorder), in, &payload, &out);
      for (uint64_t i = 0; i < out.size(); ++i) {
        ASSERT_TRUE(std::isfinite(ToF(out[i], dtype))) << i;
        if (i / shape.head_dim % 5 == 0) EXPECT_EQ(ToF(out[i], dtype), 3.5f);
        if (i / shape.head_dim % 5 == 1) EXPECT_EQ(ToF(out[i], dtype), 0.0f);
      }
    }
  }
}

TEST(PackKvTest, AllZeroSegmentIsExact) {
  const SegmentShape shape = Shape(40, 2, 32);
  const std::vector<uint16_t> in(shape.Elements(), 0);
  for (bool reorder : {false, true}) {
    std::vector<uint8_t> payload;
    std::vector<uint16_t> out;
    RoundTripBothPaths(shape, Params(0.02f, reorder), in, &payload, &out);
    EXPECT_EQ(in, out);
    // Row parameters (4 bytes x 80 rows), the permutation (2 x 80) and 6 pack headers of
    // 1 + 32/2 bytes; no minimums (mw 0) and no column data (widths 0).
    EXPECT_EQ(payload.size(), 320u + (reorder ? 160u : 0u) + 6u * 17u);
  }
}

TEST(PackKvTest, EmptySegment) {
  for (const SegmentShape& shape : {Shape(0, 4, 128), Shape(8, 0, 128), Shape(8, 2, 0)}) {
    EXPECT_EQ(packkv::MaxPayloadBytes(shape, Params(0.02f)), 0u);
    for (Path path : {Path::kRef, Path::kCpu}) {
      auto payload = Encode(path, shape, Params(0.02f, true), {});
      ASSERT_THAT(payload, IsOk());
      EXPECT_TRUE(payload->empty());
      std::vector<uint16_t> out;
      EXPECT_THAT(Decode(path, shape, Params(0.02f), {}, &out), IsOk());
      EXPECT_THAT(Decode(path, shape, Params(0.02f), {0}, &out),
                  StatusIs(absl::StatusCode::kDataLoss));
    }
    auto segment = EncodeSegment(Params(0.02f), shape, {}, Path::kCpu);
    ASSERT_THAT(segment, IsOk());
    EXPECT_THAT(DecodeSegment(*segment, {}, Path::kRef), IsOk());
  }
}

TEST(PackKvTest, CrossPathDecode) {
  const SegmentShape shape = Shape(50, 4, 128, DType::kBf16);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 13);
  for (bool reorder : {false, true}) {
    const CodecParams params = Params(0.03f, reorder);
    auto from_ref = Encode(Path::kRef, shape, params, in);
    auto from_cpu = Encode(Path::kCpu, shape, params, in);
    ASSERT_THAT(from_ref, IsOk());
    ASSERT_THAT(from_cpu, IsOk());
    std::vector<uint16_t> a, b;
    ASSERT_THAT(Decode(Path::kCpu, shape, params, *from_ref, &a), IsOk());
    ASSERT_THAT(Decode(Path::kRef, shape, params, *from_cpu, &b), IsOk());
    EXPECT_EQ(a, b);
  }
}

// ---- The public API. ----

TEST(PackKvTest, PublicApiRoundTrip) {
  const SegmentShape shape = Shape(32, 8, 128);
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 14);
  CodecParams params;  // budget, group and bits from NormalizeParams
  params.codec = CodecId::kPackKv;
  params.flags = 1;
  for (Path path : {Path::kRef, Path::kCpu}) {
    auto segment = EncodeSegment(params, shape, in, path);
    ASSERT_THAT(segment, IsOk());
    EXPECT_LT(segment->size(), shape.Bytes() / 2);
    std::vector<uint16_t> out(in.size());
    ASSERT_THAT(DecodeSegment(*segment, absl::MakeSpan(out), Path::kRef, &shape), IsOk());
    EXPECT_LE(RelativeError(in, out, shape.dtype), 0.02);
    std::vector<uint16_t> out_cpu(in.size());
    ASSERT_THAT(DecodeSegment(*segment, absl::MakeSpan(out_cpu), Path::kCpu, &shape), IsOk());
    EXPECT_EQ(out, out_cpu);
  }
}

// ---- Bad parameters and input. ----

TEST(PackKvTest, BadParamsAreInvalidArgument) {
  const SegmentShape shape = Shape(4, 1, 8);
  const std::vector<uint16_t> in(shape.Elements(), FromF(1.0f, DType::kFp16));
  std::vector<CodecParams> bad = {Params(0.02f, false, 1), Params(0.02f, false, 17),
                                  Params(0.02f, false, 8, 0)};
  bad.push_back(Params(0.02f));
  bad.back().flags = 2;
  bad.push_back(Params(0.02f));
  bad.back().codec = CodecId::kKivi;
  std::vector<uint8_t> out(1 << 12);
  std::vector<uint16_t> dec(shape.Elements());
  for (const CodecParams& p : bad) {
    EXPECT_THAT(packkv::EncodeRef(shape, p, in.data(), out.data(), out.size()),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(packkv::EncodeCpu(shape, p, in.data(), out.data(), out.size()),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(packkv::DecodeRef(shape, p, out.data(), 100, dec.data()),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(packkv::DecodeCpu(shape, p, out.data(), 100, dec.data()),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  for (float budget : {0.0f, 1.0f, -0.1f, NAN}) {
    EXPECT_THAT(Encode(Path::kRef, shape, Params(budget), in),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(Encode(Path::kCpu, shape, Params(budget), in),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  const uint64_t need = packkv::MaxPayloadBytes(shape, Params(0.02f));
  EXPECT_THAT(packkv::EncodeRef(shape, Params(0.02f), in.data(), out.data(), need - 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(packkv::EncodeCpu(shape, Params(0.02f), in.data(), out.data(), need - 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PackKvTest, NonFiniteInputIsInvalidArgument) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const SegmentShape shape = Shape(20, 2, 24, dtype);
    for (float bad : {INFINITY, -INFINITY, NAN}) {
      std::vector<uint16_t> in = GaussianWithOutliers(shape, 15);
      in[in.size() - 3] = FromF(bad, dtype);
      EXPECT_THAT(Encode(Path::kRef, shape, Params(0.02f), in),
                  StatusIs(absl::StatusCode::kInvalidArgument));
      EXPECT_THAT(Encode(Path::kCpu, shape, Params(0.02f), in),
                  StatusIs(absl::StatusCode::kInvalidArgument));
    }
  }
}

// ---- Corrupt payloads. ----

TEST(PackKvTest, TruncatedAndExtendedPayloadsAreDataLoss) {
  for (bool reorder : {false, true}) {
    const SegmentShape shape = Shape(21, 2, 19);
    const CodecParams params = Params(0.02f, reorder);
    auto payload = Encode(Path::kRef, shape, params, GaussianWithOutliers(shape, 16));
    ASSERT_THAT(payload, IsOk());
    for (size_t len = 0; len < payload->size(); ++len) {
      const std::vector<uint8_t> cut(payload->begin(), payload->begin() + len);
      std::vector<uint16_t> out;
      EXPECT_THAT(Decode(Path::kRef, shape, params, cut, &out),
                  StatusIs(absl::StatusCode::kDataLoss))
          << len;
      EXPECT_THAT(Decode(Path::kCpu, shape, params, cut, &out),
                  StatusIs(absl::StatusCode::kDataLoss))
          << len;
    }
    for (size_t extra : {1, 2, 7, 64}) {
      std::vector<uint8_t> longer = *payload;
      longer.resize(longer.size() + extra, 0);
      std::vector<uint16_t> out;
      EXPECT_THAT(Decode(Path::kRef, shape, params, longer, &out),
                  StatusIs(absl::StatusCode::kDataLoss));
      EXPECT_THAT(Decode(Path::kCpu, shape, params, longer, &out),
                  StatusIs(absl::StatusCode::kDataLoss));
    }
  }
}

// Flips random bits and bytes: each decoder returns OK or DataLoss, never crashes, and the two
// decoders agree on the outcome and, when OK, on every value.
TEST(PackKvTest, MutatedPayloadsNeverCrash) {
  std::mt19937 rng(17);
  int errors = 0, total = 0;
  const ShapeCase cases[] = {{40, 2, 64}, {17, 3, 9}, {5, 1, 128}};
  for (const ShapeCase& c : cases) {
    for (bool reorder : {false, true}) {
      for (DType dtype : {DType::kFp16, DType::kBf16}) {
        const SegmentShape shape = Shape(c.tokens, c.heads, c.dim, dtype);
        const CodecParams params = Params(0.05f, reorder);
        auto payload = Encode(Path::kRef, shape, params, GaussianWithOutliers(shape, 18));
        ASSERT_THAT(payload, IsOk());
        for (int k = 0; k < 300; ++k, ++total) {
          std::vector<uint8_t> bad = *payload;
          const int flips = 1 + rng() % 4;
          for (int f = 0; f < flips; ++f) {
            const size_t at = rng() % bad.size();
            bad[at] = (rng() % 2) ? static_cast<uint8_t>(rng()) : bad[at] ^ (1u << (rng() % 8));
          }
          std::vector<uint16_t> a, b;
          const absl::Status ref = Decode(Path::kRef, shape, params, bad, &a);
          const absl::Status cpu = Decode(Path::kCpu, shape, params, bad, &b);
          ASSERT_TRUE(ref.ok() || absl::IsDataLoss(ref)) << ref;
          ASSERT_EQ(ref.code(), cpu.code()) << ref << " vs " << cpu;
          if (ref.ok()) ASSERT_EQ(a, b);
          errors += !ref.ok();
        }
      }
    }
  }
  RecordProperty("mutations_rejected", absl::StrCat(errors, " of ", total));
}

TEST(PackKvTest, MutatedSegmentsAreRejected) {
  const SegmentShape shape = Shape(24, 2, 32);
  auto segment =
      EncodeSegment(Params(0.02f, true), shape, GaussianWithOutliers(shape, 19), Path::kCpu);
  ASSERT_THAT(segment, IsOk());
  std::mt19937 rng(20);
  std::vector<uint16_t> out(shape.Elements());
  for (int k = 0; k < 2000; ++k) {
    std::string bad = *segment;
    const size_t at = rng() % bad.size();
    bad[at] = static_cast<char>(bad[at] ^ (1 + rng() % 255));
    const absl::Status s = DecodeSegment(bad, absl::MakeSpan(out), k % 2 ? Path::kCpu : Path::kRef);
    ASSERT_FALSE(s.ok()) << "byte " << at;
  }
  for (size_t len : {size_t{0}, size_t{10}, size_t{64}, segment->size() - 1}) {
    EXPECT_FALSE(DecodeSegment(segment->substr(0, len), absl::MakeSpan(out), Path::kCpu).ok());
  }
}

// ---- CUDA. ----

TEST(PackKvTest, CudaMatchesReference) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  const SegmentShape shapes[] = {Shape(64, 4, 128), Shape(37, 3, 96, DType::kBf16), Shape(1, 1, 1),
                                 Shape(17, 2, 9), Shape(300, 2, 64)};
  for (const SegmentShape& shape : shapes) {
    const std::vector<uint16_t> in = GaussianWithOutliers(shape, 21);
    for (bool reorder : {false, true}) {
      for (uint16_t group : {16, 5}) {
        SCOPED_TRACE(absl::StrCat(shape.tokens, "x", shape.kv_heads, "x", shape.head_dim,
                                  reorder ? " reorder" : "", " group ", group));
        const CodecParams params = Params(0.02f, reorder, 8, group);
        auto ref = EncodeSegment(params, shape, in, Path::kRef);
        auto cuda = EncodeSegment(params, shape, in, Path::kCuda);
        ASSERT_THAT(ref, IsOk());
        ASSERT_THAT(cuda, IsOk());
        EXPECT_EQ(*ref, *cuda) << "CUDA payload differs from the reference";
        std::vector<uint16_t> want(in.size()), got(in.size()), cross(in.size());
        ASSERT_THAT(DecodeSegment(*ref, absl::MakeSpan(want), Path::kRef), IsOk());
        ASSERT_THAT(DecodeSegment(*ref, absl::MakeSpan(got), Path::kCuda), IsOk());
        ASSERT_THAT(DecodeSegment(*cuda, absl::MakeSpan(cross), Path::kCpu), IsOk());
        EXPECT_EQ(want, got);
        EXPECT_EQ(want, cross);
      }
    }
  }
}

TEST(PackKvTest, CudaSurvivesCorruptPayloads) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  // The launcher cannot see device-side validation (it never synchronises): a corrupt payload
  // decodes to zeros or to values, but never faults.
  const SegmentShape shape = Shape(33, 2, 40);
  const CodecParams params = Params(0.05f, true);
  auto payload = Encode(Path::kRef, shape, params, GaussianWithOutliers(shape, 22));
  ASSERT_THAT(payload, IsOk());
  const CodecOps& ops = GetCodecOps(CodecId::kPackKv);
  ASSERT_NE(ops.decode_cuda, nullptr);
  std::mt19937 rng(23);
  for (int k = 0; k < 200; ++k) {
    std::vector<uint8_t> bad = *payload;
    bad[rng() % bad.size()] = static_cast<uint8_t>(rng());
    SegmentHeader header;
    header.params = params;
    header.shape = shape;
    const std::string segment = SerializeSegment(
        header, absl::string_view(reinterpret_cast<const char*>(bad.data()), bad.size()));
    std::vector<uint16_t> out(shape.Elements());
    const absl::Status s = DecodeSegment(segment, absl::MakeSpan(out), Path::kCuda);
    ASSERT_TRUE(s.ok() || absl::IsDataLoss(s)) << s;
  }
}

// ---- Throughput and ratios (not a test: prints figures, never fails on time; run with
// --gtest_also_run_disabled_tests). Single thread; the best of 5 rounds.

double BestGbPerSecond(const std::function<void()>& fn, uint64_t bytes, int reps) {
  double best = 0;
  for (int round = 0; round < 5; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) fn();
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::max(best, static_cast<double>(bytes) * reps / 1e9 / took.count());
  }
  return best;
}

TEST(PackKvTest, DISABLED_Throughput) {
  const SegmentShape shape = Shape(64, 8, 128);  // 128 KiB, one layer's K of a 64-token block
  const std::vector<uint16_t> in = GaussianWithOutliers(shape, 24);
  std::vector<uint16_t> copy(in.size()), out(in.size());
  std::vector<uint8_t> big_in(256 << 20, 1), big_out(256 << 20);
  std::printf("memcpy: %.2f GB/s (128 KiB, cache-resident), %.2f GB/s (256 MiB)\n",
              BestGbPerSecond([&] { std::memcpy(copy.data(), in.data(), shape.Bytes()); },
                              shape.Bytes(), 2000),
              BestGbPerSecond([&] { std::memcpy(big_out.data(), big_in.data(), big_in.size()); },
                              big_in.size(), 2));
  for (bool reorder : {false, true}) {
    const CodecParams params = Params(0.02f, reorder);
    std::vector<uint8_t> payload(packkv::MaxPayloadBytes(shape, params));
    uint64_t size = 0;
    for (Path path : {Path::kRef, Path::kCpu}) {
      auto encode = path == Path::kRef ? &packkv::EncodeRef : &packkv::EncodeCpu;
      auto decode = path == Path::kRef ? &packkv::DecodeRef : &packkv::DecodeCpu;
      const int reps = path == Path::kRef ? 5 : 100;
      const double enc = BestGbPerSecond(
          [&] { size = *encode(shape, params, in.data(), payload.data(), payload.size()); },
          shape.Bytes(), reps);
      const double dec =
          BestGbPerSecond([&] { (void)decode(shape, params, payload.data(), size, out.data()); },
                          shape.Bytes(), reps);
      std::printf("%s%s: encode %.3f GB/s, decode %.3f GB/s (of fp16 data), ratio %.2f\n",
                  std::string(PathName(path)).c_str(), reorder ? " reorder" : "", enc, dec,
                  static_cast<double>(shape.Bytes()) / size);
    }
  }
  for (int outliers : {0, 4}) {
    for (DType dtype : {DType::kFp16, DType::kBf16}) {
      const SegmentShape s = Shape(64, 8, 128, dtype);
      const std::vector<uint16_t> data = GaussianWithOutliers(s, 25, outliers);
      std::printf("ratio, %d outlier channels, %s:", outliers,
                  std::string(DTypeName(dtype)).c_str());
      for (float budget : {0.005f, 0.01f, 0.02f, 0.05f, 0.1f}) {
        for (bool reorder : {false, true}) {
          const CodecParams params = Params(budget, reorder, budget < 0.006f ? 12 : 8);
          auto payload = Encode(Path::kCpu, s, params, data);
          std::vector<uint16_t> back;
          ASSERT_THAT(Decode(Path::kCpu, s, params, *payload, &back), IsOk());
          std::printf(" %g%s %.2f (err %.4f)", budget, reorder ? "r" : "",
                      static_cast<double>(s.Bytes()) / payload->size(),
                      RelativeError(data, back, dtype));
        }
      }
      std::printf("\n");
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
