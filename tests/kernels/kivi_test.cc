// Tests for the kivi codec (kernels/kivi.h): hand-computed payloads, the documented layout and
// grouping (keys per channel, values per token), error bounds, odd and empty shapes, the fast
// CPU path against the reference (identical payloads, bit-identical decoding, cross-path),
// corrupt payloads (DataLoss, never a crash), the public EncodeSegment/DecodeSegment API, and
// the CUDA path against the reference (tests named Cuda*, skipped without a device).
#include "kernels/kivi.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/encoded_segment.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/codec_staging.h"
#include "kernels/device.h"
#include "tests/kernels/kivi_test_helpers.h"
#include "tests/util/segment_shape.h"
#include "tests/util/status_matchers.h"

namespace kvpool::kernels {
namespace {

using ::kvpool::kernels::kivi_test::Kivi;
using ::kvpool::kernels::kivi_test::ShapeCase;
using ::kvpool::test_util::Shape;
using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::ElementsAre;

constexpr uint16_t kGuard = 0xabcd;
constexpr size_t kGuardElements = 32;

float ToFloat(uint16_t v, DType dtype) {
  return dtype == DType::kBf16 ? Bf16ToFloat(v) : Fp16ToFloat(v);
}
uint16_t FromFloat(float f, DType dtype) {
  return dtype == DType::kBf16 ? FloatToBf16(f) : FloatToFp16(f);
}
std::vector<uint16_t> FromFloats(const std::vector<float>& xs, DType dtype) {
  std::vector<uint16_t> out;
  for (float x : xs) out.push_back(FromFloat(x, dtype));
  return out;
}

// Gaussian data with realistic structure: a few key channels of large magnitude and offset
// (outlier channels), and a slow drift along the tokens.
std::vector<uint16_t> MakeData(const SegmentShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint64_t channels = uint64_t{shape.kv_heads} * shape.head_dim;
  std::vector<uint16_t> out(shape.Elements());
  for (uint64_t t = 0; t < shape.tokens; ++t) {
    for (uint64_t c = 0; c < channels; ++c) {
      const bool outlier = shape.kind == SegmentKind::kKey && c % 17 == 3;
      const float scale = outlier ? 12.0f : 1.0f, offset = outlier ? 4.0f : 0.0f;
      const float drift = 0.25f * std::sin(0.05f * static_cast<float>(t + c));
      out[t * channels + c] = FromFloat(normal(rng) * scale + offset + drift, shape.dtype);
    }
  }
  return out;
}

absl::StatusOr<std::vector<uint8_t>> EncodePayload(Path path, const SegmentShape& shape,
                                                   const CodecParams& params,
                                                   const std::vector<uint16_t>& in) {
  std::vector<uint8_t> out(kivi::MaxPayloadBytes(shape, params));
  absl::StatusOr<uint64_t> size =
      path == Path::kRef ? kivi::EncodeRef(shape, params, in.data(), out.data(), out.size())
                         : kivi::EncodeCpu(shape, params, in.data(), out.data(), out.size());
  if (!size.ok()) return size.status();
  EXPECT_LE(*size, out.size());
  out.resize(*size);
  return out;
}

// Decodes into a buffer with guard elements on both sides and checks that they survive.
absl::StatusOr<std::vector<uint16_t>> DecodePayload(Path path, const SegmentShape& shape,
                                                    const CodecParams& params,
                                                    const std::vector<uint8_t>& payload) {
  std::vector<uint16_t> buf(shape.Elements() + 2 * kGuardElements, kGuard);
  uint16_t* out = buf.data() + kGuardElements;
  const absl::Status s = path == Path::kRef
                             ? kivi::DecodeRef(shape, params, payload.data(), payload.size(), out)
                             : kivi::DecodeCpu(shape, params, payload.data(), payload.size(), out);
  for (size_t i = 0; i < kGuardElements; ++i) {
    EXPECT_EQ(buf[i], kGuard) << "wrote before the output";
    EXPECT_EQ(buf[buf.size() - 1 - i], kGuard) << "wrote after the output";
  }
  if (!s.ok()) return s;
  return std::vector<uint16_t>(out, out + shape.Elements());
}

std::vector<uint16_t> MustDecode(Path path, const SegmentShape& shape, const CodecParams& params,
                                 const std::vector<uint8_t>& payload) {
  absl::StatusOr<std::vector<uint16_t>> out = DecodePayload(path, shape, params, payload);
  EXPECT_THAT(out, IsOk());
  return out.ok() ? *out : std::vector<uint16_t>();
}

// Index of the first difference, or -1 (keeps failure messages short on big buffers).
template <typename T>
int64_t FirstDifference(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

// ---- The documented layout, independently of the codec's code.

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

uint64_t NumGroups(const SegmentShape& s, uint32_t group) {
  return s.kind == SegmentKind::kKey ? CeilDiv(s.tokens, group) * s.kv_heads * s.head_dim
                                     : uint64_t{s.tokens} * s.kv_heads * CeilDiv(s.head_dim, group);
}
uint64_t CodesOffset(const SegmentShape& s, uint32_t group) {
  return CeilDiv(4 * NumGroups(s, group), 16) * 16;
}
uint64_t GroupOf(const SegmentShape& s, uint32_t group, uint64_t e) {
  const uint64_t channels = uint64_t{s.kv_heads} * s.head_dim;
  if (s.kind == SegmentKind::kKey) return e / channels / group * channels + e % channels;
  return e / s.head_dim * CeilDiv(s.head_dim, group) + e % s.head_dim / group;
}
uint16_t Word(const std::vector<uint8_t>& p, uint64_t offset) {
  return static_cast<uint16_t>(p[offset] | (p[offset + 1] << 8));
}
uint32_t CodeOf(const std::vector<uint8_t>& p, uint64_t codes_offset, uint32_t bits, uint64_t e) {
  return (p[codes_offset + e * bits / 8] >> (e * bits % 8)) & ((1u << bits) - 1);
}

struct GroupStats {
  float lo = INFINITY;
  float hi = -INFINITY;
};

std::vector<GroupStats> StatsOf(const SegmentShape& s, uint32_t group,
                                const std::vector<uint16_t>& in) {
  std::vector<GroupStats> stats(NumGroups(s, group));
  for (uint64_t e = 0; e < in.size(); ++e) {
    GroupStats& g = stats[GroupOf(s, group, e)];
    g.lo = std::min(g.lo, ToFloat(in[e], s.dtype));
    g.hi = std::max(g.hi, ToFloat(in[e], s.dtype));
  }
  return stats;
}

// ---- Hand-computed payloads.

TEST(KiviTest, HandComputedValueGroupTwoBits) {
  // One 4-element value group {0, 1, 2, 3}: min 0, scale 3/3 = 1, codes 0 1 2 3.
  const SegmentShape shape = Shape(1, 1, 4, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(2, 4);
  const std::vector<uint16_t> in = FromFloats({0, 1, 2, 3}, DType::kFp16);
  ASSERT_EQ(kivi::MaxPayloadBytes(shape, params), 17u);
  auto payload = EncodePayload(Path::kRef, shape, params, in);
  ASSERT_THAT(payload, IsOk());
  // scale 1.0, min 0, 12 bytes of padding to 16, then 0 | 1<<2 | 2<<4 | 3<<6.
  EXPECT_THAT(*payload,
              ElementsAre(0x00, 0x3c, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xe4));
  EXPECT_EQ(MustDecode(Path::kRef, shape, params, *payload), in);
}

TEST(KiviTest, HandComputedTiesRoundToEven) {
  // {0, 3, 1.5, 0.5}: scale 1; 1.5 -> 2 and 0.5 -> 0 (ties to even); codes 0 3 2 0.
  const SegmentShape shape = Shape(1, 1, 4, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(2, 4);
  auto payload =
      EncodePayload(Path::kRef, shape, params, FromFloats({0, 3, 1.5, 0.5}, DType::kFp16));
  ASSERT_THAT(payload, IsOk());
  EXPECT_EQ(payload->back(), 0x2c);
  EXPECT_EQ(MustDecode(Path::kRef, shape, params, *payload),
            FromFloats({0, 3, 2, 0}, DType::kFp16));
}

TEST(KiviTest, HandComputedValueGroupFourBits) {
  // {-1, 0.5, 2, 0.25}: min -1; scale 3/15 = 0.2 -> fp16 0.199951171875 (0x3266).
  // (x + 1) / s = 0, 7.50183, 15.0037, 6.2515 -> codes 0, 8, 15 (clamped), 6.
  const SegmentShape shape = Shape(1, 1, 4, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(4, 4);
  auto payload =
      EncodePayload(Path::kRef, shape, params, FromFloats({-1, 0.5, 2, 0.25}, DType::kFp16));
  ASSERT_THAT(payload, IsOk());
  ASSERT_THAT(*payload, ::testing::SizeIs(18));
  EXPECT_EQ(Word(*payload, 0), 0x3266);
  EXPECT_EQ(Word(*payload, 2), 0xbc00);  // -1
  EXPECT_EQ((*payload)[16], 0x80);       // codes 0 (low nibble), 8 (high nibble)
  EXPECT_EQ((*payload)[17], 0x6f);       // 15, 6
  // q * s - 1: -1, 0.599609375, 1.999267578125 -> 1.9990234375 in fp16, 0.19970703125.
  EXPECT_EQ(MustDecode(Path::kRef, shape, params, *payload),
            FromFloats({-1, 0.599609375f, 1.9990234375f, 0.19970703125f}, DType::kFp16));
  EXPECT_EQ(FromFloat(1.999267578125f, DType::kFp16), FromFloat(1.9990234375f, DType::kFp16));
}

TEST(KiviTest, HandComputedKeysArePerChannel) {
  // 4 tokens x 2 channels, G = 4: channel 0 holds 0 1 2 3 (scale 1, min 0), channel 1 is
  // constant 10 (scale 0, min 10, codes 0). Codes follow the elements: t0c0 t0c1 t1c0 ...
  const SegmentShape shape = Shape(4, 1, 2, DType::kFp16, SegmentKind::kKey);
  const CodecParams params = Kivi(2, 4);
  const std::vector<uint16_t> in = FromFloats({0, 10, 1, 10, 2, 10, 3, 10}, DType::kFp16);
  auto payload = EncodePayload(Path::kRef, shape, params, in);
  ASSERT_THAT(payload, IsOk());
  EXPECT_THAT(*payload, ElementsAre(0x00, 0x3c, 0x00, 0x00,  // scales 1, 0
                                    0x00, 0x00, 0x00, 0x49,  // mins 0, 10
                                    0, 0, 0, 0, 0, 0, 0, 0,  // padding
                                    0x10, 0x32));            // codes 0 0 1 0 | 2 0 3 0
  EXPECT_EQ(MustDecode(Path::kRef, shape, params, *payload), in);
  EXPECT_EQ(MustDecode(Path::kCpu, shape, params, *payload), in);
}

TEST(KiviTest, ZeroMinimumIsPositiveZero) {
  // -0 and +0 in one group: the stored minimum and scale are +0 on every path.
  const SegmentShape shape = Shape(1, 1, 16, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(4, 16);
  std::vector<uint16_t> in(16, 0x8000);
  in[5] = 0x0000;
  for (Path path : {Path::kRef, Path::kCpu}) {
    auto payload = EncodePayload(path, shape, params, in);
    ASSERT_THAT(payload, IsOk());
    EXPECT_EQ(Word(*payload, 0), 0x0000);
    EXPECT_EQ(Word(*payload, 2), 0x0000);
    EXPECT_EQ(MustDecode(path, shape, params, *payload), std::vector<uint16_t>(16, 0));
  }
}

// ---- Grouping: data exact under one grouping only.

// Keys: each channel constant over the tokens (different per channel). Values: each run of G
// channels constant within a token (different per token).
std::vector<uint16_t> ConstantPerChannel(const SegmentShape& s) {
  std::vector<uint16_t> out(s.Elements());
  const uint64_t channels = uint64_t{s.kv_heads} * s.head_dim;
  for (uint64_t e = 0; e < out.size(); ++e) {
    out[e] = FromFloat(0.37f * static_cast<float>(e % channels % 23) - 3.1f, s.dtype);
  }
  return out;
}
std::vector<uint16_t> ConstantPerValueGroup(const SegmentShape& s, uint32_t group) {
  std::vector<uint16_t> out(s.Elements());
  for (uint64_t e = 0; e < out.size(); ++e) {
    const uint64_t row = e / s.head_dim, j = e % s.head_dim / group;
    out[e] = FromFloat(0.41f * static_cast<float>((row * 7 + j * 3) % 19) - 2.3f, s.dtype);
  }
  return out;
}

TEST(KiviTest, KeysGroupPerChannelAndValuesPerToken) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const uint32_t group = 8;
    SegmentShape key = Shape(24, 2, 16, dtype, SegmentKind::kKey);
    SegmentShape value = key;
    value.kind = SegmentKind::kValue;
    const CodecParams params = Kivi(2, group);
    for (Path path : {Path::kRef, Path::kCpu}) {
      // Constant per channel: exact as keys, lossy as values.
      const std::vector<uint16_t> a = ConstantPerChannel(key);
      EXPECT_EQ(MustDecode(path, key, params, *EncodePayload(path, key, params, a)), a);
      EXPECT_NE(MustDecode(path, value, params, *EncodePayload(path, value, params, a)), a);
      // Constant per value group: exact as values, lossy as keys.
      const std::vector<uint16_t> b = ConstantPerValueGroup(value, group);
      EXPECT_EQ(MustDecode(path, value, params, *EncodePayload(path, value, params, b)), b);
      EXPECT_NE(MustDecode(path, key, params, *EncodePayload(path, key, params, b)), b);
    }
  }
}

// ---- Parameterised over dtype, kind and bits.

using Combo = std::tuple<DType, SegmentKind, int>;

class KiviComboTest : public ::testing::TestWithParam<Combo> {
 protected:
  DType dtype() const { return std::get<0>(GetParam()); }
  SegmentKind kind() const { return std::get<1>(GetParam()); }
  uint8_t bits() const { return static_cast<uint8_t>(std::get<2>(GetParam())); }
  SegmentShape MakeShape(uint32_t t, uint32_t h, uint32_t d) const {
    return Shape(t, h, d, dtype(), kind());
  }
};

// Regular shapes (the vector paths), odd ones (scalar heads and tails, short last groups,
// groups shorter than 8 or longer than the dimension) and single elements.
const ShapeCase kShapes[] = {
    {32, 8, 128, 32}, {33, 3, 40, 32}, {1, 1, 1, 32},    {7, 2, 5, 4},
    {64, 2, 64, 64},  {5, 1, 100, 7},  {17, 4, 16, 128}, {1, 8, 128, 32},
    {3, 1, 9, 1},     {40, 1, 3, 16},  {5, 1, 64, 32},   {3, 2, 96, 48},
};

TEST_P(KiviComboTest, PayloadFollowsTheDocumentedLayout) {
  const uint32_t levels = (1u << bits()) - 1;
  for (const ShapeCase& c : kShapes) {
    const SegmentShape shape = MakeShape(c.tokens, c.heads, c.dim);
    const CodecParams params = Kivi(bits(), c.group);
    const std::vector<uint16_t> in = MakeData(shape, 7);
    auto payload = EncodePayload(Path::kRef, shape, params, in);
    ASSERT_THAT(payload, IsOk());
    const uint64_t n = NumGroups(shape, c.group), p = CodesOffset(shape, c.group);
    ASSERT_EQ(payload->size(), p + CeilDiv(shape.Elements() * bits(), 8));
    const std::vector<GroupStats> stats = StatsOf(shape, c.group, in);
    for (uint64_t g = 0; g < n; ++g) {
      const float lo = stats[g].lo + 0.0f, hi = stats[g].hi + 0.0f;
      ASSERT_EQ(Word(*payload, 2 * g), FloatToFp16((hi - lo) / static_cast<float>(levels))) << g;
      ASSERT_EQ(Word(*payload, 2 * (n + g)), FloatToFp16(lo)) << g;
    }
    for (uint64_t i = 4 * n; i < p; ++i) ASSERT_EQ((*payload)[i], 0) << "padding";
    for (uint64_t e = 0; e < in.size(); ++e) {
      const uint64_t g = GroupOf(shape, c.group, e);
      const float s = Fp16ToFloat(Word(*payload, 2 * g)),
                  m = Fp16ToFloat(Word(*payload, 2 * (n + g)));
      const float r = s == 0 ? 0 : std::nearbyint((ToFloat(in[e], shape.dtype) - m) / s);
      const uint32_t q = static_cast<uint32_t>(std::clamp(r, 0.0f, static_cast<float>(levels)));
      ASSERT_EQ(CodeOf(*payload, p, bits(), e), q) << e;
    }
    const uint64_t last_bits = shape.Elements() * bits() % 8;
    if (last_bits != 0) {
      EXPECT_EQ(payload->back() >> last_bits, 0) << "unused code bits";
    }
  }
}

TEST_P(KiviComboTest, RoundTripErrorIsBounded) {
  const uint32_t levels = (1u << bits()) - 1;
  const double out_eps = dtype() == DType::kBf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  for (const ShapeCase& c : kShapes) {
    const SegmentShape shape = MakeShape(c.tokens, c.heads, c.dim);
    const CodecParams params = Kivi(bits(), c.group);
    const std::vector<uint16_t> in = MakeData(shape, 11);
    auto payload = EncodePayload(Path::kRef, shape, params, in);
    ASSERT_THAT(payload, IsOk());
    const std::vector<uint16_t> out = MustDecode(Path::kRef, shape, params, *payload);
    const std::vector<GroupStats> stats = StatsOf(shape, c.group, in);
    const uint64_t n = NumGroups(shape, c.group);
    double sq_err = 0, sq_sum = 0;
    for (uint64_t e = 0; e < in.size(); ++e) {
      const uint64_t g = GroupOf(shape, c.group, e);
      const double s = Fp16ToFloat(Word(*payload, 2 * g)),
                   m = Fp16ToFloat(Word(*payload, 2 * (n + g)));
      const double exact_s = (double{stats[g].hi} - stats[g].lo) / levels;
      const double x = ToFloat(in[e], shape.dtype), y = ToFloat(out[e], shape.dtype);
      // Half a step, the fp16 rounding of the scale and minimum, the output rounding.
      const double bound = s / 2 + levels * std::abs(exact_s - s) + std::abs(stats[g].lo - m) +
                           std::abs(y) * out_eps + 1e-6 * (std::abs(m) + levels * s) +
                           std::ldexp(1.0, -24);
      ASSERT_LE(std::abs(x - y), bound) << "element " << e << " group " << g;
      sq_err += (x - y) * (x - y);
      sq_sum += x * x;
    }
    // Relative RMS error of the segment: about 1.15 / L for Gaussian data in groups of 32.
    if (in.size() >= 256) {
      EXPECT_LT(std::sqrt(sq_err / sq_sum), 1.5 / levels);
    }
  }
}

TEST_P(KiviComboTest, CpuPathMatchesReference) {
  for (const ShapeCase& c : kShapes) {
    const SegmentShape shape = MakeShape(c.tokens, c.heads, c.dim);
    const CodecParams params = Kivi(bits(), c.group);
    SCOPED_TRACE(absl::StrCat(c.tokens, "x", c.heads, "x", c.dim, " G", c.group));
    const std::vector<uint16_t> in = MakeData(shape, 13);
    auto ref = EncodePayload(Path::kRef, shape, params, in);
    auto cpu = EncodePayload(Path::kCpu, shape, params, in);
    ASSERT_THAT(ref, IsOk());
    ASSERT_THAT(cpu, IsOk());
    EXPECT_EQ(FirstDifference(*ref, *cpu), -1) << "payloads differ";
    const std::vector<uint16_t> decoded = MustDecode(Path::kRef, shape, params, *ref);
    EXPECT_EQ(FirstDifference(MustDecode(Path::kCpu, shape, params, *ref), decoded), -1);
    // Cross path: each path's payload decodes the same on the other path.
    EXPECT_EQ(FirstDifference(MustDecode(Path::kRef, shape, params, *cpu), decoded), -1);
    EXPECT_EQ(FirstDifference(MustDecode(Path::kCpu, shape, params, *cpu), decoded), -1);
  }
}

// Adversarial element values: random bit patterns (every finite value, subnormals, both
// zeros), tiny ranges (subnormal scales), constant groups, many exact ties.
std::vector<uint16_t> AdversarialData(const SegmentShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint16_t> out(shape.Elements());
  const uint16_t exp_mask = shape.dtype == DType::kBf16 ? 0x7f80 : 0x7c00;
  for (uint64_t e = 0; e < out.size(); ++e) {
    uint16_t v;
    switch (rng() % 5) {
      case 0:  // any finite pattern (bf16: within the fp16 range)
        do {
          v = static_cast<uint16_t>(rng());
        } while ((v & exp_mask) == exp_mask || std::abs(ToFloat(v, shape.dtype)) > 30000.0f);
        break;
      case 1:  // +0 / -0 / smallest subnormals
        v = static_cast<uint16_t>((rng() % 2) << 15 | (rng() % 3));
        break;
      case 2:  // small integers: exact ties at every bit width
        v = FromFloat(static_cast<float>(static_cast<int>(rng() % 9) - 4) * 0.5f, shape.dtype);
        break;
      default:  // 1.0 plus a few ulps: tiny ranges
        v = static_cast<uint16_t>(FromFloat(1.0f, shape.dtype) + rng() % 4);
        break;
    }
    out[e] = v;
  }
  return out;
}

TEST_P(KiviComboTest, CpuEncoderMatchesReferenceOnAdversarialData) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const ShapeCase& c = kShapes[seed % std::size(kShapes)];
    const SegmentShape shape = MakeShape(c.tokens, c.heads, c.dim);
    const CodecParams params = Kivi(bits(), seed % 3 == 0 ? uint16_t{4} : c.group);
    const std::vector<uint16_t> in = AdversarialData(shape, seed);
    auto ref = EncodePayload(Path::kRef, shape, params, in);
    auto cpu = EncodePayload(Path::kCpu, shape, params, in);
    ASSERT_THAT(ref, IsOk()) << seed;
    ASSERT_THAT(cpu, IsOk()) << seed;
    EXPECT_EQ(FirstDifference(*ref, *cpu), -1) << seed;
    EXPECT_EQ(FirstDifference(MustDecode(Path::kCpu, shape, params, *ref),
                              MustDecode(Path::kRef, shape, params, *ref)),
              -1)
        << seed;
  }
}

// A valid payload of random content: random codes, random finite scales and minimums.
std::vector<uint8_t> RandomPayload(const SegmentShape& shape, const CodecParams& params,
                                   std::mt19937& rng) {
  std::vector<uint8_t> p(kivi::MaxPayloadBytes(shape, params));
  for (uint8_t& b : p) b = static_cast<uint8_t>(rng());
  const uint64_t n = NumGroups(shape, params.group);
  for (uint64_t i = 0; i < 2 * n; ++i) {
    if ((Word(p, 2 * i) & 0x7c00) == 0x7c00) p[2 * i + 1] &= 0xbf;  // clear an exponent bit
  }
  return p;
}

TEST_P(KiviComboTest, RandomValidPayloadsDecodeIdentically) {
  std::mt19937 rng(99);
  for (const ShapeCase& c : kShapes) {
    const SegmentShape shape = MakeShape(c.tokens, c.heads, c.dim);
    const CodecParams params = Kivi(bits(), c.group);
    for (int i = 0; i < 3; ++i) {
      const std::vector<uint8_t> p = RandomPayload(shape, params, rng);
      EXPECT_EQ(FirstDifference(MustDecode(Path::kCpu, shape, params, p),
                                MustDecode(Path::kRef, shape, params, p)),
                -1);
    }
  }
}

TEST_P(KiviComboTest, CorruptPayloadsReturnDataLoss) {
  const SegmentShape shape = MakeShape(33, 3, 40);
  const CodecParams params = Kivi(bits(), 32);
  auto good = EncodePayload(Path::kRef, shape, params, MakeData(shape, 5));
  ASSERT_THAT(good, IsOk());
  const uint64_t n = NumGroups(shape, 32);
  std::vector<std::vector<uint8_t>> bad;
  bad.emplace_back(good->begin(), good->end() - 1);                   // truncated
  bad.emplace_back(good->begin(), good->begin() + good->size() / 2);  // truncated
  bad.emplace_back();                                                 // empty
  bad.push_back(*good);
  bad.back().push_back(0);  // extended by one
  bad.push_back(*good);
  bad.back().resize(good->size() + 16);  // extended by 16
  for (uint16_t word : {0x7c00, 0xfc00, 0x7e00, 0xffff}) {
    for (uint64_t offset : {uint64_t{0}, 2 * (n - 1), 2 * n, 2 * (2 * n - 1)}) {
      bad.push_back(*good);  // non-finite scale (first, last) or minimum (first, last)
      bad.back()[offset] = static_cast<uint8_t>(word);
      bad.back()[offset + 1] = static_cast<uint8_t>(word >> 8);
    }
  }
  for (const std::vector<uint8_t>& p : bad) {
    EXPECT_THAT(DecodePayload(Path::kRef, shape, params, p), StatusIs(absl::StatusCode::kDataLoss));
    EXPECT_THAT(DecodePayload(Path::kCpu, shape, params, p), StatusIs(absl::StatusCode::kDataLoss));
  }
}

TEST_P(KiviComboTest, RandomMutationsNeverCrash) {
  std::mt19937 rng(1234 + bits());
  const SegmentShape shapes[] = {MakeShape(33, 3, 40), MakeShape(16, 2, 64), MakeShape(3, 1, 7)};
  for (int round = 0; round < 600; ++round) {
    const SegmentShape& shape = shapes[round % 3];
    const CodecParams params = Kivi(bits(), round % 2 ? 32 : 8);
    std::vector<uint8_t> p = *EncodePayload(Path::kRef, shape, params, MakeData(shape, round % 7));
    switch (rng() % 4) {
      case 0:  // flip a few bits
        for (int k = 0; k < 1 + static_cast<int>(rng() % 8); ++k) {
          p[rng() % p.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        }
        break;
      case 1:  // random bytes over a random range
        for (size_t i = rng() % p.size(), k = 0; i < p.size() && k < 64; ++i, ++k) {
          p[i] = static_cast<uint8_t>(rng());
        }
        break;
      case 2:  // truncate
        p.resize(rng() % p.size());
        break;
      default:  // extend with random bytes
        for (uint32_t k = 1 + rng() % 40; k > 0; --k) p.push_back(static_cast<uint8_t>(rng()));
        break;
    }
    auto ref = DecodePayload(Path::kRef, shape, params, p);
    auto cpu = DecodePayload(Path::kCpu, shape, params, p);
    ASSERT_EQ(ref.status().code(), cpu.status().code()) << round;
    if (!ref.ok()) {
      EXPECT_THAT(ref, StatusIs(absl::StatusCode::kDataLoss)) << round;
    } else {
      EXPECT_EQ(FirstDifference(*ref, *cpu), -1) << round;
    }
  }
}

TEST_P(KiviComboTest, PublicApiRoundTripAndCrossPath) {
  const SegmentShape shape = MakeShape(32, 8, 128);
  const std::vector<uint16_t> in = MakeData(shape, 3);
  const CodecParams params = Kivi(bits(), 0);  // group 0: normalised to 32
  absl::StatusOr<std::string> by_ref = EncodeSegment(params, shape, in, Path::kRef);
  absl::StatusOr<std::string> by_cpu = EncodeSegment(params, shape, in, Path::kCpu);
  ASSERT_THAT(by_ref, IsOk());
  ASSERT_THAT(by_cpu, IsOk());
  EXPECT_EQ(*by_ref, *by_cpu);
  absl::string_view payload;
  auto header = ParseSegment(*by_ref, &payload);
  ASSERT_THAT(header, IsOk());
  EXPECT_EQ(header->params.codec, CodecId::kKivi);
  EXPECT_EQ(header->params.group, 32);
  EXPECT_EQ(payload.size(), kivi::MaxPayloadBytes(shape, Kivi(bits(), 32)));
  std::vector<uint16_t> ref_out(in.size()), cpu_out(in.size());
  ASSERT_THAT(DecodeSegment(*by_cpu, absl::MakeSpan(ref_out), Path::kRef, &shape), IsOk());
  ASSERT_THAT(DecodeSegment(*by_ref, absl::MakeSpan(cpu_out), Path::kCpu, &shape), IsOk());
  EXPECT_EQ(FirstDifference(ref_out, cpu_out), -1);
  std::vector<uint8_t> raw(payload.begin(), payload.end());
  EXPECT_EQ(FirstDifference(ref_out, MustDecode(Path::kRef, shape, header->params, raw)), -1);

  // A segment whose (checksummed) payload is one byte short: DataLoss from the codec.
  SegmentHeader shorter = *header;
  const std::string bad = SerializeSegment(shorter, payload.substr(0, payload.size() - 1));
  EXPECT_THAT(DecodeSegment(bad, absl::MakeSpan(ref_out), Path::kRef),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(DecodeSegment(bad, absl::MakeSpan(ref_out), Path::kCpu),
              StatusIs(absl::StatusCode::kDataLoss));
}

std::string ComboName(const ::testing::TestParamInfo<Combo>& info) {
  return absl::StrCat(std::get<0>(info.param) == DType::kBf16 ? "Bf16" : "Fp16",
                      std::get<1>(info.param) == SegmentKind::kKey ? "Key" : "Value",
                      std::get<2>(info.param), "Bits");
}

INSTANTIATE_TEST_SUITE_P(AllCombos, KiviComboTest,
                         ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                                            ::testing::Values(SegmentKind::kKey,
                                                              SegmentKind::kValue),
                                            ::testing::Values(2, 4, 8)),
                         ComboName);

// ---- Empty segments, bad parameters, unencodable data.

TEST(KiviTest, EmptySegmentHasAnEmptyPayload) {
  for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
    for (const SegmentShape& shape :
         {Shape(0, 8, 128, DType::kFp16, kind), Shape(4, 0, 128, DType::kBf16, kind),
          Shape(4, 8, 0, DType::kFp16, kind)}) {
      const CodecParams params = Kivi(4, 32);
      EXPECT_EQ(kivi::MaxPayloadBytes(shape, params), 0u);
      for (Path path : {Path::kRef, Path::kCpu}) {
        auto payload = EncodePayload(path, shape, params, {});
        ASSERT_THAT(payload, IsOk());
        EXPECT_TRUE(payload->empty());
        EXPECT_THAT(MustDecode(path, shape, params, *payload), ::testing::IsEmpty());
        EXPECT_THAT(DecodePayload(path, shape, params, {0}), StatusIs(absl::StatusCode::kDataLoss));
      }
      auto segment = EncodeSegment(params, shape, {}, Path::kCpu);
      ASSERT_THAT(segment, IsOk());
      EXPECT_EQ(segment->size(), kSegmentHeaderBytes);
      EXPECT_THAT(DecodeSegment(*segment, {}, Path::kRef), IsOk());
    }
  }
}

TEST(KiviTest, BadParamsAreInvalidArgument) {
  const SegmentShape shape = Shape(4, 1, 8, DType::kFp16, SegmentKind::kKey);
  const std::vector<uint16_t> in(shape.Elements(), 0x3c00);
  std::vector<uint8_t> out(1024);
  for (const CodecParams& params :
       {Kivi(3, 32), Kivi(0, 32), Kivi(16, 32), Kivi(1, 32), Kivi(4, 0)}) {
    EXPECT_EQ(kivi::MaxPayloadBytes(shape, params), 0u);
    EXPECT_THAT(kivi::EncodeRef(shape, params, in.data(), out.data(), out.size()),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(kivi::EncodeCpu(shape, params, in.data(), out.data(), out.size()),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(DecodePayload(Path::kRef, shape, params, out),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(DecodePayload(Path::kCpu, shape, params, out),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  EXPECT_THAT(EncodeSegment(Kivi(3, 32), shape, in, Path::kCpu),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(KiviTest, SmallOutputIsInvalidArgument) {
  const SegmentShape shape = Shape(4, 1, 8, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(4, 32);
  const std::vector<uint16_t> in(shape.Elements(), 0x3c00);
  std::vector<uint8_t> out(kivi::MaxPayloadBytes(shape, params) - 1);
  EXPECT_THAT(kivi::EncodeRef(shape, params, in.data(), out.data(), out.size()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(kivi::EncodeCpu(shape, params, in.data(), out.data(), out.size()),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(KiviTest, UnencodableDataIsInvalidArgument) {
  struct Case {
    DType dtype;
    uint16_t bad;  // one element
  };
  // NaN, +-inf, and a bf16 value whose group minimum is beyond fp16 (-1e30).
  for (const Case& c : {Case{DType::kFp16, 0x7e00}, Case{DType::kFp16, 0x7c00},
                        Case{DType::kFp16, 0xfc00}, Case{DType::kBf16, 0x7fc0},
                        Case{DType::kBf16, 0xff80}, Case{DType::kBf16, FloatToBf16(-1e30f)}}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      const SegmentShape shape = Shape(33, 2, 24, c.dtype, kind);
      for (uint64_t at : {uint64_t{0}, uint64_t{17}, shape.Elements() - 1}) {
        std::vector<uint16_t> in = MakeData(shape, 1);
        in[at] = c.bad;
        for (Path path : {Path::kRef, Path::kCpu}) {
          EXPECT_THAT(EncodePayload(path, shape, Kivi(4, 32), in),
                      StatusIs(absl::StatusCode::kInvalidArgument))
              << PathName(path) << " " << c.bad << " at " << at;
        }
      }
    }
  }
}

// ---- The CUDA path (skipped without a device).

TEST(KiviTest, CudaMatchesReference) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      for (uint8_t bits : {2, 4, 8}) {
        for (const ShapeCase& c : kShapes) {
          const SegmentShape shape = Shape(c.tokens, c.heads, c.dim, dtype, kind);
          const CodecParams params = Kivi(bits, c.group);
          SCOPED_TRACE(absl::StrCat(c.tokens, "x", c.heads, "x", c.dim, " G", c.group, " b", bits,
                                    " ", DTypeName(dtype),
                                    kind == SegmentKind::kKey ? " K" : " V"));
          const std::vector<uint16_t> in =
              c.tokens % 2 ? AdversarialData(shape, c.dim) : MakeData(shape, c.dim);
          auto by_ref = EncodeSegment(params, shape, in, Path::kRef);
          auto by_cuda = EncodeSegment(params, shape, in, Path::kCuda);
          ASSERT_THAT(by_ref, IsOk());
          ASSERT_THAT(by_cuda, IsOk());
          EXPECT_EQ(*by_ref, *by_cuda) << "payloads differ";
          std::vector<uint16_t> ref_out(in.size()), cuda_out(in.size());
          ASSERT_THAT(DecodeSegment(*by_ref, absl::MakeSpan(ref_out), Path::kRef), IsOk());
          ASSERT_THAT(DecodeSegment(*by_ref, absl::MakeSpan(cuda_out), Path::kCuda), IsOk());
          EXPECT_EQ(FirstDifference(ref_out, cuda_out), -1);
          ASSERT_THAT(DecodeSegment(*by_cuda, absl::MakeSpan(cuda_out), Path::kCpu), IsOk());
          EXPECT_EQ(FirstDifference(ref_out, cuda_out), -1);
        }
      }
    }
  }
}

TEST(KiviTest, CudaRandomPayloadsDecodeIdentically) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  std::mt19937 rng(7);
  const CodecOps& ops = GetCodecOps(CodecId::kKivi);
  for (const ShapeCase& c : kShapes) {
    for (DType dtype : {DType::kFp16, DType::kBf16}) {
      for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
        const SegmentShape shape = Shape(c.tokens, c.heads, c.dim, dtype, kind);
        const CodecParams params = Kivi(static_cast<uint8_t>(2 << (rng() % 3)), c.group);
        const std::vector<uint8_t> p = RandomPayload(shape, params, rng);
        std::vector<uint16_t> out(shape.Elements());
        ASSERT_THAT(DecodeOnDevice(ops, shape, params, p.data(), p.size(), out.data()), IsOk());
        EXPECT_EQ(FirstDifference(out, MustDecode(Path::kRef, shape, params, p)), -1);
      }
    }
  }
}

TEST(KiviTest, CudaRejectsWhatTheReferenceRejects) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  const CodecOps& ops = GetCodecOps(CodecId::kKivi);
  const SegmentShape shape = Shape(33, 2, 24, DType::kFp16, SegmentKind::kValue);
  const CodecParams params = Kivi(4, 32);
  std::vector<uint16_t> in = MakeData(shape, 1);
  std::vector<uint8_t> out(kivi::MaxPayloadBytes(shape, params));
  // A good payload of the wrong size is DataLoss; bad params InvalidArgument.
  std::vector<uint16_t> decoded(shape.Elements());
  EXPECT_THAT(DecodeOnDevice(ops, shape, params, out.data(), out.size() - 1, decoded.data()),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(DecodeOnDevice(ops, shape, Kivi(3, 32), out.data(), out.size(), decoded.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // An unencodable segment comes back with size 0, which does not decode.
  in[5] = 0x7e00;
  auto size = EncodeOnDevice(ops, shape, params, in.data(), out.data(), out.size());
  ASSERT_THAT(size, IsOk());
  EXPECT_EQ(*size, 0u);
}

TEST(KiviTest, CudaNonFiniteScaleDecodesToNaN) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  // The host paths return DataLoss; the kernel cannot, and marks the group's elements NaN.
  const CodecOps& ops = GetCodecOps(CodecId::kKivi);
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      const SegmentShape shape = Shape(33, 3, 40, dtype, kind);
      const CodecParams params = Kivi(4, 32);
      std::vector<uint8_t> p = *EncodePayload(Path::kRef, shape, params, MakeData(shape, 2));
      const std::vector<uint16_t> want = MustDecode(Path::kRef, shape, params, p);
      const uint64_t n = NumGroups(shape, 32), bad = n / 2;
      p[2 * bad] = 0x00;
      p[2 * bad + 1] = 0x7c;  // +inf scale
      std::vector<uint16_t> out(shape.Elements());
      ASSERT_THAT(DecodeOnDevice(ops, shape, params, p.data(), p.size(), out.data()), IsOk());
      const uint16_t nan = dtype == DType::kBf16 ? 0x7fc0 : 0x7e00;
      for (uint64_t e = 0; e < out.size(); ++e) {
        ASSERT_EQ(out[e], GroupOf(shape, 32, e) == bad ? nan : want[e]) << e;
      }
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
