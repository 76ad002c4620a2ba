// kvpool codec: hand-computed cases, the error budget as a contract over many random segments,
// CPU == reference (payload and decode), odd and empty shapes, corrupt payloads, the CUDA path
// (skipped without a device) and the quality comparison against a KIVI model on the agreed
// synthetic benchmark data.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "client/kv_codec.h"
#include "client/synthetic.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/codec_staging.h"
#include "kernels/device.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_format.h"
#include "kernels/kvpool_rows.h"
#include "kernels/quality.h"
#include "tests/kernels/kvpool_test_helpers.h"

namespace kvpool::kernels {
namespace {

using namespace kvpool_test;  // NOLINT: the shared helpers of the kvpool tests.

TEST(KvpoolCodec, ZeroSegmentIsCodedExactlyWithRankZero) {
  const SegmentShape s = Shape(16, 1, 2);
  std::vector<uint16_t> v(32, 0);
  const std::string enc = Encode(Params(0.1f, 0, kPacked), s, v);
  // Hand-computed: 8 header, 1 rank (0), 2 means * 2 bytes, 0 coefficient widths, residual
  // widths ceil(1 group * 2 columns / 2) = 1 byte, all widths 0 -> no data: 14 bytes.
  ASSERT_EQ(enc.size(), kSegmentHeaderBytes + 14);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(enc.data()) + kSegmentHeaderBytes;
  EXPECT_EQ(p[0], 1);      // coded
  EXPECT_EQ(p[8], 0);      // rank
  EXPECT_EQ(p[13], 0);     // widths
  EXPECT_EQ(Decode(enc, s), v);
}

TEST(KvpoolCodec, ZeroSegmentEntropyCoded) {
  const SegmentShape s = Shape(64, 1, 2);
  std::vector<uint16_t> v(128, 0);
  const std::string enc = Encode(Params(0.1f, 0, kEntropy), s, v);
  // Hand-computed: 8 header, 1 rank (0), 4 mean step (no energy: first step 1, so the mean
  // step is sqrt(8 / 64)), no directions; two streams of all-zero codes, the means' ([2][1]) and
  // the residual's ([64][2]), each 1 table count, 65 table (shift 0, symbol 0 takes all 4096
  // slots), 1 byte of column tables, 8 lane entry (state 2^16: a symbol of frequency 4096
  // leaves the state as it is, so no words); no coefficient stream (0 columns): 163 bytes
  // (raw would be 8 + 256).
  ASSERT_EQ(enc.size(), kSegmentHeaderBytes + 163);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(enc.data()) + kSegmentHeaderBytes;
  EXPECT_EQ(p[0], 3);                       // entropy-coded
  EXPECT_EQ(p[8], 0);                       // rank
  float mean_step;
  std::memcpy(&mean_step, p + 9, 4);
  EXPECT_EQ(mean_step, float(std::sqrt(8.0 / 64)));
  for (const int at : {13, 88}) {           // the means' stream, then the residual's
    EXPECT_EQ(p[at], 1);                    // one table
    EXPECT_EQ(p[at + 1], 0);                // shift
    EXPECT_EQ(p[at + 2] | p[at + 3] << 8, 4096);  // frequency of symbol 0
    for (int i = at + 4; i < at + 66; ++i) EXPECT_EQ(p[i], 0) << i;
    EXPECT_EQ(p[at + 66], 0);               // column tables
    EXPECT_EQ(kvpool::internal::LoadU32(p + at + 67), 65536u);  // lane state
    EXPECT_EQ(kvpool::internal::LoadU32(p + at + 71), 0u);      // lane bytes
  }
  EXPECT_EQ(Decode(enc, s), v);
  EXPECT_EQ(Decode(enc, s, Path::kCpu), v);
}

TEST(KvpoolCodec, HandBuiltPayloadDecodes) {
  // 2 tokens, 1 head, head_dim 2, fp16, step 0.5, means {1, -2}, rank 0; residual codes
  // token0 {1, 0}, token1 {-1, 2} -> zigzag {2, 0}, {1, 4}; column 0 width 2, column 1 width 3.
  const SegmentShape s = Shape(2, 1, 2);
  std::vector<uint8_t> p = {1, 0, 0, 0};
  const float step = 0.5f;
  uint8_t b[4];
  std::memcpy(b, &step, 4);
  p.insert(p.end(), b, b + 4);
  p.push_back(0);  // rank
  const uint16_t m0 = FloatToFp16(1.f), m1 = FloatToFp16(-2.f);
  p.insert(p.end(), {uint8_t(m0), uint8_t(m0 >> 8), uint8_t(m1), uint8_t(m1 >> 8)});
  p.push_back(0x32);  // widths: column 0 -> 2, column 1 -> 3
  // Column 0 codes {2, 1}: plane0 bits = {0,1} -> 0b10, plane1 = {1,0} -> 0b01.
  p.insert(p.end(), {0x02, 0, 0x01, 0});
  // Column 1 codes {0, 4}: plane0 0, plane1 0, plane2 bit1 -> 0b10.
  p.insert(p.end(), {0, 0, 0, 0, 0x02, 0});
  std::vector<uint16_t> out(4);
  ASSERT_TRUE(kvpool::DecodeRef(s, Params(0.1f), p.data(), p.size(), out.data()).ok());
  EXPECT_EQ(Fp16ToFloat(out[0]), 1.5f);
  EXPECT_EQ(Fp16ToFloat(out[1]), -2.f);
  EXPECT_EQ(Fp16ToFloat(out[2]), 0.5f);
  EXPECT_EQ(Fp16ToFloat(out[3]), -1.f);
  std::vector<uint16_t> out_cpu(4);
  ASSERT_TRUE(kvpool::DecodeCpu(s, Params(0.1f), p.data(), p.size(), out_cpu.data()).ok());
  EXPECT_EQ(out, out_cpu);
  p.push_back(0);
  EXPECT_EQ(kvpool::DecodeRef(s, Params(0.1f), p.data(), p.size(), out.data()).code(),
            absl::StatusCode::kDataLoss);
}

TEST(KvpoolCodec, BudgetHoldsOverRandomSegmentsAndCpuMatchesReference) {
  std::mt19937_64 rng(7);
  const float budgets[] = {0.005f, 0.01f, 0.02f, 0.05f, 0.1f, 0.2f};
  const uint32_t tokens[] = {1, 3, 16, 17, 40, 64};
  const uint32_t dims[] = {1, 8, 16, 33};
  int segments = 0, violations = 0;
  for (int n = 0; n < 4000; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentKind kind = (n / 2) % 2 ? SegmentKind::kValue : SegmentKind::kKey;
    const SegmentShape s = Shape(tokens[rng() % 6], 1 + rng() % 3, dims[rng() % 4], dt, kind);
    const float budget = budgets[rng() % 6];
    const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 6), rng);
    const CodecParams p = Params(budget, 0, n % 3 == 0 ? kPacked : 0);  // Both coded modes.
    const std::string ref = Encode(p, s, v, Path::kRef);
    const std::string cpu = Encode(p, s, v, Path::kCpu);
    ASSERT_EQ(ref, cpu) << "segment " << n;
    const std::vector<uint16_t> a = Decode(ref, s, Path::kRef), b = Decode(ref, s, Path::kCpu);
    ASSERT_EQ(a, b) << "segment " << n;
    if (RelL2(s, v, a) > budget) ++violations;
    ++segments;
  }
  EXPECT_EQ(violations, 0) << "of " << segments;
}

TEST(KvpoolCodec, LargeSegmentsMeetBudgetAndRatioGrowsWithBudget) {
  std::mt19937_64 rng(3);
  double last_size = 1e30;
  for (float budget : {0.005f, 0.01f, 0.02f, 0.05f, 0.1f, 0.2f}) {
    double size = 0;
    for (int type : {0, 1, 5}) {
      for (DType dt : {DType::kFp16, DType::kBf16}) {
        const SegmentShape s = Shape(128, 2, 64, dt, type == 5 ? SegmentKind::kKey : SegmentKind::kValue);
        std::mt19937_64 r2(type * 10 + int(dt));
        const std::vector<uint16_t> v = RandomSegment(s, type, r2);
        const std::string enc = Encode(Params(budget), s, v, Path::kCpu);
        size += enc.size();
        EXPECT_LE(RelL2(s, v, Decode(enc, s, Path::kCpu)), budget);
      }
    }
    EXPECT_LT(size, last_size) << "budget " << budget;
    last_size = size;
  }
}

// Mode 3 codes means and basis with steps tied to the residual's; when a step would need codes
// beyond the format's range (a near-constant key segment at the tightest key budget) it widens,
// and the budget still holds on every path.
TEST(KvpoolCodec, MeanAndBasisStepsStayInRange) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n(0.f, 1.f);
  for (uint32_t tokens : {64u, 256u, 1024u}) {
    const SegmentShape s = Shape(tokens, 2, 16, DType::kFp16, SegmentKind::kKey);
    std::vector<uint16_t> v(s.Elements());
    for (uint64_t i = 0; i < v.size(); ++i) v[i] = FromF(s.dtype, 1000.f + 0.5f * n(rng));
    const CodecParams p = Params(0.005f, 1);  // Keys get 1/64 of the budget.
    const std::string enc = Encode(p, s, v, Path::kCpu);
    EXPECT_EQ(enc, Encode(p, s, v, Path::kRef));
    EXPECT_LE(RelL2(s, v, Decode(enc, s)), 0.005 / 64) << tokens;
    EXPECT_EQ(Decode(enc, s, Path::kCpu), Decode(enc, s)) << tokens;
  }
}

// Mode 2 (means and basis as fixed-width numbers) is retired: its payloads are rejected, not
// misread as mode 3.
TEST(KvpoolCodec, RetiredModeTwoIsRejected) {
  std::mt19937_64 rng(9);
  const SegmentShape s = Shape(64, 2, 16);
  const std::vector<uint16_t> v = RandomSegment(s, 0, rng);
  const std::string enc = Encode(Params(0.05f, 0, kEntropy), s, v);
  std::string payload = enc.substr(kSegmentHeaderBytes);
  ASSERT_EQ(payload[0], 3);
  payload[0] = 2;
  std::vector<uint16_t> out(s.Elements());
  for (Path path : {Path::kRef, Path::kCpu}) {
    const uint8_t* d = reinterpret_cast<const uint8_t*>(payload.data());
    const absl::Status st =
        path == Path::kRef ? kvpool::DecodeRef(s, Params(0.05f, 0, kEntropy), d, payload.size(), out.data())
                           : kvpool::DecodeCpu(s, Params(0.05f, 0, kEntropy), d, payload.size(), out.data());
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(st.message(), ::testing::HasSubstr("unknown payload mode"));
  }
}

TEST(KvpoolCodec, ClassScalesArePowersOfTwoToTheMinusQuarter) {
  using kvpool::internal::ClassScale;
  EXPECT_EQ(ClassScale(0), 1.f);
  EXPECT_EQ(ClassScale(4), 0.5f);
  EXPECT_EQ(ClassScale(8), 0.25f);
  EXPECT_EQ(ClassScale(6), 0.707106781f * 0.5f);
  for (uint32_t k = 0; k < kvpool::internal::kClasses; ++k) {
    EXPECT_NEAR(ClassScale(k), std::exp2(-double(k) / 4), 1e-7) << k;
  }
}

// Hand-computed: head 0's keys {0, 0, 0, 4} lie 1, 1, 1 and 9 (squared) from their mean 1, the
// mean of which is 3: z = 1/3, 1/3, 1/3, 3, class round(2 * w * z / ln 2) (w the weighting
// strength; 0.7 gives 1, 1, 1, 6). Head 1's keys are constant: class 0 throughout.
TEST(KvpoolCodec, TokenClassesHandComputed) {
  using kvpool::internal::TokenClasses;
  const SegmentShape s = Shape(4, 2, 1);
  const std::vector<float> keys = {0, 2, 0, 2, 0, 2, 4, 2};
  const double per_z = 2 * kvpool::internal::kTokenWeighting / std::log(2.0);
  const uint8_t low = uint8_t(std::nearbyint(per_z / 3)), high = uint8_t(std::nearbyint(per_z * 3));
  EXPECT_EQ(TokenClasses(s, keys.data()), (std::vector<uint8_t>{low, 0, low, 0, low, 0, high, 0}));
  if (kvpool::internal::kTokenWeighting == 0.7) EXPECT_EQ(high, 6);
  // One token, or keys all alike: no classes (no map in the payload).
  EXPECT_TRUE(TokenClasses(Shape(1, 2, 1), keys.data()).empty());
  const std::vector<float> same(8, 3.f);
  EXPECT_TRUE(TokenClasses(s, same.data()).empty());
}

// Keys weight their own tokens: a token whose key stands out gets a finer step (its error is
// below the others'), the class map is in the payload, the reference and the CPU path write
// the same bytes and decode them alike, and the budget holds.
TEST(KvpoolCodec, OutlierTokenGetsAFinerStep) {
  std::mt19937_64 rng(31);
  std::normal_distribution<float> n(0.f, 1.f);
  const SegmentShape s = Shape(64, 2, 32, DType::kFp16, SegmentKind::kKey);
  std::vector<uint16_t> v(s.Elements());
  for (uint64_t i = 0; i < v.size(); ++i) {
    const uint64_t t = i / 64;
    v[i] = FromF(s.dtype, n(rng) * (t == 7 ? 4.f : 1.f));
  }
  const std::string enc = Encode(Params(0.05f, 0, kEntropy), s, v, Path::kRef);
  EXPECT_EQ(enc, Encode(Params(0.05f, 0, kEntropy), s, v, Path::kCpu));
  const uint8_t* p = reinterpret_cast<const uint8_t*>(enc.data()) + kSegmentHeaderBytes;
  ASSERT_EQ(p[0], 3);
  EXPECT_EQ(p[1], kvpool::internal::kHeadClasses);
  const std::vector<uint16_t> out = Decode(enc, s);
  EXPECT_EQ(out, Decode(enc, s, Path::kCpu));
  EXPECT_LE(RelL2(s, v, out), 0.05);
  double outlier = 0, others = 0;
  for (uint64_t i = 0; i < v.size(); ++i) {
    const double e = std::fabs(ToF(s.dtype, out[i]) - ToF(s.dtype, v[i]));
    (i / 64 == 7 ? outlier : others) += e;
  }
  EXPECT_LT(outlier / 64, 0.5 * others / (v.size() - 64));
  // Weighting every token equally: no map, and the outlier's error is like the others'.
  const std::string equal = Encode(Params(0.05f, 0, kEntropy | kvpool::internal::kFlagEqualTokens), s, v);
  EXPECT_EQ(uint8_t(equal[kSegmentHeaderBytes + 1]), 0);
  EXPECT_LE(RelL2(s, v, Decode(equal, s)), 0.05);
}

// A value segment takes its classes from the keys it is given (EncodeSegment's `keys`), and
// has none without them.
TEST(KvpoolCodec, ValueSegmentsTakeClassesFromTheirKeys) {
  std::mt19937_64 rng(37);
  const SegmentShape ks = Shape(48, 3, 16, DType::kBf16, SegmentKind::kKey);
  SegmentShape vs = ks;
  vs.kind = SegmentKind::kValue;
  const std::vector<uint16_t> keys = RandomSegment(ks, 5, rng), values = RandomSegment(vs, 0, rng);
  std::vector<float> key_floats;
  for (uint16_t k : keys) key_floats.push_back(ToF(ks.dtype, k));
  const std::vector<uint8_t> classes = kvpool::internal::TokenClasses(ks, key_floats.data());
  ASSERT_FALSE(classes.empty());
  for (Path path : {Path::kRef, Path::kCpu}) {
    const std::string with = Encode(Params(0.05f, 0, kEntropy), vs, values, path, keys);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(with.data()) + kSegmentHeaderBytes;
    ASSERT_EQ(p[1], kvpool::internal::kHeadClasses);
    kvpool::internal::Parsed parsed;
    ASSERT_TRUE(kvpool::internal::ParsePayload(vs, p, with.size() - kSegmentHeaderBytes, &parsed).ok());
    ASSERT_NE(parsed.classes, nullptr);
    for (uint64_t i = 0; i < classes.size(); ++i) {
      EXPECT_EQ((parsed.classes[i / 2] >> (4 * (i & 1))) & 15, classes[i]) << i;
    }
    EXPECT_EQ(Decode(with, vs, Path::kRef), Decode(with, vs, Path::kCpu));
    EXPECT_LE(RelL2(vs, values, Decode(with, vs)), 0.05);
    const std::string without = Encode(Params(0.05f, 0, kEntropy), vs, values, path);
    EXPECT_EQ(uint8_t(without[kSegmentHeaderBytes + 1]), 0);
  }
  EXPECT_EQ(Encode(Params(0.05f, 0, kEntropy), vs, values, Path::kRef, keys),
            Encode(Params(0.05f, 0, kEntropy), vs, values, Path::kCpu, keys));
  const std::vector<uint16_t> short_keys(keys.begin(), keys.end() - 1);
  EXPECT_EQ(EncodeSegment(Params(0.05f, 0, kEntropy), vs, values, Path::kCpu, short_keys).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// EncodeKv (what `kvpool codec encode / eval` use) hands each value segment the keys of its
// layer and tokens: [layers][2][tokens][heads][dim], blocks of 32 of 80 tokens (the last short).
TEST(KvpoolCodec, EncodeKvGivesValuesTheirKeys) {
  std::mt19937_64 rng(43);
  const client::KvShape shape{2, 80, 2, 16, DType::kFp16};
  std::vector<uint16_t> kv;
  for (uint32_t part = 0; part < 4; ++part) {  // layer 0 K, V, layer 1 K, V
    const std::vector<uint16_t> x = RandomSegment(Shape(80, 2, 16), part % 2 ? 0 : 5, rng);
    kv.insert(kv.end(), x.begin(), x.end());
  }
  auto enc = client::EncodeKv(shape, kv, 32, Params(0.05f, 0, kEntropy), Path::kCpu);
  ASSERT_TRUE(enc.ok()) << enc.status();
  ASSERT_EQ(enc->segments.size(), 12u);  // 3 blocks x 2 layers x K, V
  const uint64_t row = 2 * 16;
  int weighted = 0;
  for (uint32_t b = 0, i = 0; b < 3; ++b)
    for (uint32_t l = 0; l < 2; ++l, i += 2) {
      const uint32_t tokens = b < 2 ? 32 : 16;
      const SegmentShape vs = Shape(tokens, 2, 16, DType::kFp16, SegmentKind::kValue);
      const uint64_t k_at = (uint64_t{l} * 2 * 80 + b * 32) * row, v_at = k_at + 80 * row;
      const auto keys = absl::MakeConstSpan(kv).subspan(k_at, tokens * row);
      const auto values = absl::MakeConstSpan(kv).subspan(v_at, tokens * row);
      EXPECT_EQ(enc->segments[i + 1], *EncodeSegment(Params(0.05f, 0, kEntropy), vs, values, Path::kCpu, keys));
      weighted += enc->segments[i + 1][kSegmentHeaderBytes + 1] == 1;
    }
  EXPECT_GT(weighted, 0);
}

// The class map's flag only on mode 3, no other flag bits, zero padding: else DataLoss.
TEST(KvpoolCodec, MalformedClassMapsAreRejected) {
  std::mt19937_64 rng(41);
  const SegmentShape s = Shape(33, 1, 16, DType::kFp16, SegmentKind::kKey);  // T * H odd.
  const std::vector<uint16_t> v = RandomSegment(s, 5, rng);
  const std::string enc = Encode(Params(0.05f, 0, kEntropy), s, v);
  std::string payload = enc.substr(kSegmentHeaderBytes);
  ASSERT_EQ(payload[1], kvpool::internal::kHeadClasses);
  kvpool::internal::Parsed parsed;
  auto parse = [&](const std::string& pl) {
    return kvpool::internal::ParsePayload(s, reinterpret_cast<const uint8_t*>(pl.data()),
                                          pl.size(), &parsed);
  };
  ASSERT_TRUE(parse(payload).ok());
  const uint64_t map_at = parsed.classes - reinterpret_cast<const uint8_t*>(payload.data());
  const uint64_t pad = map_at + 16;
  std::string bad = payload;
  bad[1] = 3;  // An unknown flag bit.
  EXPECT_EQ(parse(bad).code(), absl::StatusCode::kDataLoss);
  bad = payload;
  bad[pad] = char(uint8_t(bad[pad]) | 0x10);  // The padding nibble after 33 classes.
  EXPECT_EQ(parse(bad).code(), absl::StatusCode::kDataLoss);
  const std::string packed = Encode(Params(0.05f, 0, kPacked), s, v).substr(kSegmentHeaderBytes);
  ASSERT_EQ(packed[0], 1);
  ASSERT_EQ(packed[1], 0);
  bad = packed;
  bad[1] = 1;  // A class map this payload does not hold: its sections no longer add up.
  EXPECT_EQ(parse(bad).code(), absl::StatusCode::kDataLoss);
  bad = packed;
  bad[1] = 2;  // An unknown flag bit in mode 1.
  EXPECT_EQ(parse(bad).code(), absl::StatusCode::kDataLoss);
  bad = payload.substr(0, map_at + 3);
  EXPECT_EQ(parse(bad).code(), absl::StatusCode::kDataLoss);  // Truncated in the map.
}

TEST(KvpoolCodec, EmptyAndOddShapes) {
  std::mt19937_64 rng(5);
  for (const SegmentShape& s : {Shape(0, 2, 8), Shape(1, 1, 1), Shape(17, 3, 33), Shape(5, 1, 1)}) {
    const std::vector<uint16_t> v = RandomSegment(s, 0, rng);
    for (Path enc_path : {Path::kRef, Path::kCpu}) {
      const std::string enc = Encode(Params(0.05f), s, v, enc_path);
      const std::vector<uint16_t> out = Decode(enc, s, Path::kCpu);
      EXPECT_EQ(out, Decode(enc, s, Path::kRef));
      EXPECT_LE(RelL2(s, v, out), 0.05);
    }
  }
}

TEST(KvpoolCodec, NonFiniteInputIsStoredExactly) {
  const SegmentShape s = Shape(4, 1, 8);
  std::vector<uint16_t> v(32, FloatToFp16(1.f));
  v[3] = 0x7c00;  // inf
  v[9] = 0x7e00;  // NaN
  EXPECT_EQ(Decode(Encode(Params(0.1f), s, v), s), v);
}

TEST(KvpoolCodec, BadParamsAreInvalidArgument) {
  const SegmentShape s = Shape(4, 1, 8);
  std::vector<uint16_t> v(32, 0);
  EXPECT_EQ(EncodeSegment(Params(1.5f), s, v, Path::kRef).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> out(1024);
  EXPECT_EQ(kvpool::EncodeRef(s, Params(0.f), v.data(), out.data(), out.size()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class KvpoolCorrupt : public ::testing::TestWithParam<uint8_t> {};

TEST_P(KvpoolCorrupt, PayloadsFailCleanly) {
  std::mt19937_64 rng(11);
  const SegmentShape s = Shape(40, 2, 16, DType::kFp16, SegmentKind::kValue);
  const std::vector<uint16_t> v = RandomSegment(s, 0, rng);
  const std::string enc = Encode(Params(0.05f, 0, GetParam()), s, v);
  ASSERT_EQ(uint8_t(enc[kSegmentHeaderBytes]),
            GetParam() == 0 ? 4 : GetParam() == kEntropy ? 3 : 1);
  const std::string payload = enc.substr(kSegmentHeaderBytes);
  std::vector<uint16_t> out(s.Elements());
  auto decode = [&](const std::string& p, Path path) {
    const uint8_t* d = reinterpret_cast<const uint8_t*>(p.data());
    return path == Path::kRef ? kvpool::DecodeRef(s, Params(0.05f), d, p.size(), out.data())
                              : kvpool::DecodeCpu(s, Params(0.05f), d, p.size(), out.data());
  };
  int errors = 0;
  for (size_t n = 0; n < payload.size(); n += 1 + payload.size() / 500) {
    for (Path path : {Path::kRef, Path::kCpu}) {
      EXPECT_EQ(decode(payload.substr(0, n), path).code(), absl::StatusCode::kDataLoss) << n;
      EXPECT_EQ(decode(payload + std::string(1 + n % 7, '\0'), path).code(),
                absl::StatusCode::kDataLoss);
    }
  }
  for (int n = 0; n < 3000; ++n) {  // Mutations: must not crash; whatever decodes is in bounds.
    std::string p = payload;
    for (int k = 0; k < 1 + n % 4; ++k) p[rng() % p.size()] ^= char(1 + rng() % 255);
    const absl::Status a = decode(p, Path::kRef), b = decode(p, Path::kCpu);
    EXPECT_EQ(a.code(), b.code());
    if (!a.ok()) ++errors;
  }
  EXPECT_GT(errors, 0);
  // The segment checksum catches any change of the whole encoded segment.
  std::string bad = enc;
  bad[kSegmentHeaderBytes + 9] ^= 1;
  EXPECT_EQ(DecodeSegment(bad, absl::MakeSpan(out), Path::kRef).code(), absl::StatusCode::kDataLoss);
}
INSTANTIATE_TEST_SUITE_P(EveryMode, KvpoolCorrupt,
                         ::testing::Values(uint8_t{0}, kEntropy, kPacked, kFast));

// A well-formed mode 3 payload whose steps overflow (finite steps near the float maximum: the
// parser accepts them) decodes to infinities and NaN, the same bits on every host path: the
// AVX-512 decoder hands vectors holding NaN to the reference's conversion.
TEST(KvpoolCodec, OverflowingStepsDecodeAlikeOnEveryPath) {
  std::mt19937_64 rng(5);
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const SegmentShape s = Shape(40, 2, 32, dt, SegmentKind::kKey);
    const std::vector<uint16_t> v = RandomSegment(s, 5, rng);
    std::string enc = Encode(Params(0.05f, 0, kEntropy), s, v);
    const uint64_t at = kSegmentHeaderBytes;
    ASSERT_EQ(uint8_t(enc[at]), 3);
    const float huge = 3e38f;
    std::memcpy(&enc[at + 4], &huge, 4);  // Residual step.
    std::memcpy(&enc[at + kvpool::internal::kHeaderBytes + s.kv_heads], &huge, 4);  // Mean step.
    const std::string payload = enc.substr(at);
    std::vector<uint16_t> ref(s.Elements()), cpu(s.Elements(), 1);
    const uint8_t* d = reinterpret_cast<const uint8_t*>(payload.data());
    ASSERT_TRUE(kvpool::DecodeRef(s, Params(0.05f, 0, kEntropy), d, payload.size(), ref.data()).ok());
    ASSERT_TRUE(kvpool::DecodeCpu(s, Params(0.05f, 0, kEntropy), d, payload.size(), cpu.data()).ok());
    EXPECT_EQ(ref, cpu);
    const uint16_t exp = dt == DType::kBf16 ? 0x7f80 : 0x7c00;
    int nan = 0, inf = 0;
    for (uint16_t x : ref) {
      nan += (x & exp) == exp && (x & ~exp & 0x7fff) != 0;
      inf += (x & 0x7fff) == exp;
    }
    EXPECT_GT(nan, 0);
    EXPECT_GT(inf, 0);
  }
}

// CUDA decode == reference decode, bit for bit, on reference and CPU payloads of many random
// segments; CUDA-encoded payloads (the default profile's mode 4: the CPU's bytes) decode on
// every path to the same values and meet the budget.
TEST(KvpoolCodec, CudaMatchesReference) {
  if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(13);
  const float budgets[] = {0.005f, 0.01f, 0.02f, 0.05f, 0.1f, 0.2f};
  const uint32_t tokens[] = {1, 3, 16, 17, 40, 64, 300};
  const uint32_t dims[] = {1, 8, 16, 33, 128};
  std::vector<SegmentShape> shapes = {Shape(256, 8, 128), Shape(17, 3, 33, DType::kBf16),
                                      Shape(1, 1, 1), Shape(0, 2, 8)};
  for (int n = 0; n < 600; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentKind kind = (n / 2) % 2 ? SegmentKind::kValue : SegmentKind::kKey;
    shapes.push_back(Shape(tokens[rng() % 7], 1 + rng() % 4, dims[rng() % 5], dt, kind));
  }
  int coded = 0, violations = 0;
  for (size_t n = 0; n < shapes.size(); ++n) {
    const SegmentShape& s = shapes[n];
    const float budget = n < 4 ? 0.05f : budgets[rng() % 6];
    const uint64_t extra = n % 3 == 0 ? 32 : 0;
    const std::vector<uint16_t> v = RandomSegment(s, n < 4 ? 0 : int(rng() % 6), rng);
    for (Path path : {Path::kRef, Path::kCpu}) {
      const std::string enc = Encode(Params(budget, extra), s, v, path);
      ASSERT_EQ(Decode(enc, s, Path::kCuda), Decode(enc, s, Path::kRef)) << "segment " << n;
    }
    auto cuda = EncodeSegment(Params(budget, extra), s, v, Path::kCuda);
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    ASSERT_EQ(*cuda, Encode(Params(budget, extra), s, v, Path::kCpu)) << "segment " << n;
    const std::vector<uint16_t> out = Decode(*cuda, s, Path::kRef);
    ASSERT_EQ(out, Decode(*cuda, s, Path::kCuda)) << "segment " << n;
    ASSERT_EQ(out, Decode(*cuda, s, Path::kCpu)) << "segment " << n;
    const double target = budget * (s.kind == SegmentKind::kKey && extra ? 0.5 : 1.0);
    if (RelL2(s, v, out) > target) ++violations;
    if (cuda->size() > kSegmentHeaderBytes &&
        uint8_t((*cuda)[kSegmentHeaderBytes]) == kvpool::internal::kModeRows) {
      ++coded;
    }
  }
  EXPECT_EQ(violations, 0) << "of " << shapes.size();
  EXPECT_GT(coded, int(shapes.size()) / 4);  // The encoder does compress.
}

// fp16 outputs equal, treating any two NaNs as equal: for crafted payloads whose means and
// products are both NaN, which NaN survives an add depends on the compiler's operand order (the
// vectorised reference differs from the AVX2 path and the GPU); the NaN bits are unspecified.
bool SameValues(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool nan_a = (a[i] & 0x7c00) == 0x7c00 && (a[i] & 0x3ff);
    const bool nan_b = (b[i] & 0x7c00) == 0x7c00 && (b[i] & 0x3ff);
    if (nan_a != nan_b || (!nan_a && a[i] != b[i])) return false;
  }
  return true;
}

// A payload that DecodeRef rejects makes the CUDA decoder write 0xffff to every element (its
// documented sentinel) without reading out of bounds; one that DecodeRef accepts decodes to the
// same values (NaNs as a class, see SameValues).
TEST(KvpoolCodec, CudaFlagsCorruptPayloads) {
  if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(17);
  const SegmentShape s = Shape(40, 2, 16, DType::kFp16, SegmentKind::kValue);
  const std::string enc = Encode(Params(0.05f), s, RandomSegment(s, 0, rng));
  const std::string payload = enc.substr(kSegmentHeaderBytes);
  const CodecOps& ops = GetCodecOps(CodecId::kKvpool);
  const std::vector<uint16_t> sentinel(s.Elements(), 0xffff);
  int rejected = 0;
  for (int n = 0; n < 400; ++n) {
    std::string p = payload;
    if (n % 4 == 0) {
      p.resize(kvpool::internal::kHeaderBytes + rng() % (payload.size() - 8));
    } else if (n % 4 == 1) {
      p += std::string(1 + n % 7, '\0');
    } else {
      for (int k = 0; k < 1 + n % 4; ++k) p[rng() % p.size()] ^= char(1 + rng() % 255);
    }
    const uint8_t* d = reinterpret_cast<const uint8_t*>(p.data());
    std::vector<uint16_t> ref(s.Elements()), cuda(s.Elements());
    const absl::Status a = kvpool::DecodeRef(s, Params(0.05f), d, p.size(), ref.data());
    ASSERT_TRUE(DecodeOnDevice(ops, s, Params(0.05f), d, p.size(), cuda.data()).ok());
    if (a.ok()) {
      EXPECT_TRUE(SameValues(cuda, ref)) << n;
    } else {
      EXPECT_EQ(cuda, sentinel) << n;
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);
}

// KIVI model (asymmetric min-max, keys per channel over 32 tokens, values per token over 32
// channels, fp16 scale and min, b-bit codes) on one [256][8][128] segment; returns bits.
double KiviModel(const float* x, float* y, bool key, int bits, uint32_t T, uint32_t C) {
  const int levels = (1 << bits) - 1;
  auto r16 = [](float f) { return Fp16ToFloat(FloatToFp16(f)); };
  auto group = [&](auto index) {
    float lo = 1e30f, hi = -1e30f;
    for (int i = 0; i < 32; ++i) lo = std::min(lo, x[index(i)]), hi = std::max(hi, x[index(i)]);
    const float sc = r16((hi - lo) / levels), mn = r16(lo);
    for (int i = 0; i < 32; ++i) {
      int q = sc > 0 ? int(std::nearbyint((x[index(i)] - mn) / sc)) : 0;
      q = std::max(0, std::min(levels, q));
      y[index(i)] = r16(q * sc + mn);
    }
  };
  for (uint32_t c = 0; key && c < C; ++c)
    for (uint32_t g = 0; g < T; g += 32) group([&](int i) { return (g + i) * C + c; });
  for (uint32_t t = 0; !key && t < T; ++t)
    for (uint32_t g = 0; g < C; g += 32) group([&](int i) { return t * C + g + i; });
  return double(T) * C * (bits + 1) + 64 * 8;
}

struct Point {
  double ratio, attn;
};

// Full evaluation corpus: layers 4, kv_heads 8, head_dim 128, tokens 1024, seed 1, fp16;
// 256-token segments. codec < 0: KIVI model with -codec bits.
Point Evaluate(int kivi_bits, float budget, uint64_t extra = 0, uint8_t flags = 0) {
  const std::string raw = SyntheticKvOf(4, 8, 128, 1024);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(raw.data());
  const uint64_t n = raw.size() / 2, seg = 256 * 8 * 128;
  std::vector<float> orig(n), dec(n);
  for (uint64_t i = 0; i < n; ++i) orig[i] = Fp16ToFloat(h[i]);
  double bytes = 0;
  for (uint32_t l = 0; l < 4; ++l)
    for (uint32_t k = 0; k < 2; ++k)
      for (uint32_t b = 0; b < 4; ++b) {
        const uint64_t base = ((uint64_t{l} * 2 + k) * 1024 + b * 256) * 8 * 128;
        if (kivi_bits > 0) {
          bytes += KiviModel(&orig[base], &dec[base], k == 0, kivi_bits, 256, 1024) / 8;
          continue;
        }
        const SegmentShape s = Shape(256, 8, 128, DType::kFp16, k ? SegmentKind::kValue : SegmentKind::kKey);
        const std::vector<uint16_t> v(h + base, h + base + seg);
        // Values are weighted by their layer's keys, as EncodeKv and the daemon do.
        const absl::Span<const uint16_t> keys =
            k ? absl::MakeConstSpan(h + base - 1024 * 8 * 128, seg) : absl::Span<const uint16_t>();
        const std::string enc = Encode(Params(budget, extra, flags), s, v, Path::kCpu, keys);
        bytes += enc.size();
        const std::vector<uint16_t> out = Decode(enc, s, Path::kCpu);
        for (uint64_t i = 0; i < seg; ++i) dec[base + i] = Fp16ToFloat(out[i]);
      }
  const Quality q = MeasureQuality(orig, dec, 4, 1024, 8, 128);
  return {2.0 * n / bytes, q.attn_rel_l2};
}

TEST(KvpoolCodec, QualityAgainstKivi) {
  const Point kivi4 = Evaluate(4, 0), kivi2 = Evaluate(2, 0);
  // (b): at KIVI-2's attention error, at least 1.5x its compression ratio (budget 0.5).
  const Point b = Evaluate(0, 0.5f);
  EXPECT_LE(b.attn, kivi2.attn);
  EXPECT_GE(b.ratio, 1.5 * kivi2.ratio);
  // (a): at KIVI-4's attention error, at least 2x its compression ratio (budget 0.2; the
  // README's table has the sweep).
  const Point a = Evaluate(0, 0.2f);
  EXPECT_LE(a.attn, kivi4.attn);
  EXPECT_GE(a.ratio, 2 * kivi4.ratio);
  // Weighting every token equally costs what the classes gain: same budget, higher error.
  const Point equal = Evaluate(0, 0.2f, 0, kvpool::internal::kFlagEqualTokens);
  EXPECT_GT(equal.attn, 1.1 * a.attn);
  std::printf("kivi4 ratio %.2f attn %.4f | kivi2 ratio %.2f attn %.4f | kvpool(0.2) "
              "ratio %.2f attn %.4f (equal tokens: ratio %.2f attn %.4f) | kvpool(0.5) ratio %.2f "
              "attn %.4f\n",
              kivi4.ratio, kivi4.attn, kivi2.ratio, kivi2.attn, a.ratio, a.attn, equal.ratio,
              equal.attn, b.ratio, b.attn);
}

TEST(CodecSelfCheck, UnavailableWithoutADevice) {
  if (DeviceCount() > 0) GTEST_SKIP() << "a device is present";
  EXPECT_EQ(SelfCheckCudaCodecs().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(SelfCheckCudaRowsEncoder().code(), absl::StatusCode::kUnavailable);
}

TEST(CodecSelfCheck, CudaCodecsAgreeWithTheHost) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  EXPECT_TRUE(SelfCheckCudaCodecs().ok()) << SelfCheckCudaCodecs();
  EXPECT_TRUE(SelfCheckCudaRowsEncoder().ok()) << SelfCheckCudaRowsEncoder();
}

// A value segment's encoder takes its keys' token classes from their encoded segment (what put
// and EncodeKv pass) instead of computing them from the keys again: the same bytes as from the
// keys' elements, in both modes and on both host paths; and from the segment alone when the
// keys' elements are not given.
TEST(KvpoolCodec, ValuesTakeTheirKeysClassesFromTheKeySegment) {
  std::mt19937_64 rng(31);
  int with_classes = 0;
  for (uint8_t flags : {kEntropy, kFast}) {
    for (const SegmentShape& shape :
         {Shape(256, 2, 64), Shape(37, 3, 32, DType::kBf16), Shape(1, 1, 8)}) {
      SegmentShape ks = shape, vs = shape;
      vs.kind = SegmentKind::kValue;
      for (int type : {0, 5}) {
        const std::vector<uint16_t> k = RandomSegment(ks, type, rng), v = RandomSegment(vs, 0, rng);
        for (Path path : {Path::kRef, Path::kCpu}) {
          SCOPED_TRACE(testing::Message() << "flags " << int(flags) << " tokens " << shape.tokens
                                          << " type " << type << " path " << int(path));
          const CodecParams p = Params(0.05f, 0, flags);
          const std::string ek = Encode(p, ks, k, path);
          const std::string from_elements = Encode(p, vs, v, path, k);
          EXPECT_TRUE(Encode(p, vs, v, path, k, ek) == from_elements);
          absl::string_view payload;
          auto header = ParseSegment(ek, &payload);
          ASSERT_TRUE(header.ok());
          if (header->params.codec != CodecId::kKvpool || payload[0] == 0) continue;
          EXPECT_TRUE(Encode(p, vs, v, path, {}, ek) == from_elements);
          ASSERT_TRUE(ParseSegment(from_elements, &payload).ok());
          with_classes += payload.size() > 1 && (payload[1] & kvpool::internal::kHeadClasses) != 0;
        }
      }
    }
  }
  EXPECT_GE(with_classes, 8);  // The cases above are not all without a class map.
}

// Key segments that another codec, other parameters or another shape wrote are ignored (the
// value's bytes are those from the keys' elements), and a key segment whose class map was
// tampered with (its checksum is not checked) only moves bits: the value meets its budget.
TEST(KvpoolCodec, KeySegmentsThatDoNotFitAreIgnored) {
  std::mt19937_64 rng(37);
  const SegmentShape ks = Shape(64, 2, 32);
  SegmentShape vs = ks;
  vs.kind = SegmentKind::kValue;
  const std::vector<uint16_t> k = RandomSegment(ks, 5, rng), v = RandomSegment(vs, 0, rng);
  for (uint8_t flags : {uint8_t{0}, kEntropy, kFast}) {
    const CodecParams p = Params(0.05f, 0, flags);
    const std::string expected = Encode(p, vs, v, Path::kCpu, k);
    const std::string none = Encode(p, vs, v, Path::kCpu);
    ASSERT_TRUE(expected != none);  // The keys' classes change the value's bytes.
    CodecParams kivi;
    kivi.codec = CodecId::kKivi;
    std::string garbage(2000, '\0');
    for (char& c : garbage) c = char(rng());
    const std::string ek = Encode(p, ks, k, Path::kCpu);
    std::string truncated = ek.substr(0, ek.size() - 1);
    const std::vector<std::string> misfits = {
        Encode(Params(0.1f, 0, flags), ks, k, Path::kCpu),  // Other parameters.
        Encode(kivi, ks, k, Path::kCpu),                    // Another codec.
        Encode(p, vs, k, Path::kCpu),                       // A value segment.
        Encode(p, Shape(32, 2, 32), std::vector<uint16_t>(k.begin(), k.begin() + 32 * 64),
               Path::kCpu),  // Other tokens.
        garbage,
        truncated};
    for (size_t i = 0; i < misfits.size(); ++i) {
      EXPECT_TRUE(Encode(p, vs, v, Path::kCpu, k, misfits[i]) == expected) << "misfit " << i;
      EXPECT_TRUE(Encode(p, vs, v, Path::kCpu, {}, misfits[i]) == none) << "misfit " << i;
    }
    // Random classes in the key segment's map: the value follows them and keeps its budget.
    absl::string_view payload;
    ASSERT_TRUE(ParseSegment(ek, &payload).ok());
    ASSERT_NE(payload[0], 0);
    const uint8_t* base = reinterpret_cast<const uint8_t*>(payload.data());
    const uint8_t* map = nullptr;
    if (payload[0] == kvpool::internal::kModeRows) {
      kvpool::internal::ParsedRows parsed;
      ASSERT_TRUE(kvpool::internal::ParseRows(ks, base, payload.size(), &parsed).ok());
      map = parsed.classes;
    } else {
      kvpool::internal::Parsed parsed;
      uint64_t end = 0;
      ASSERT_TRUE(kvpool::internal::ParseHead(ks, base, payload.size(), &parsed, &end).ok());
      map = parsed.classes;
    }
    ASSERT_NE(map, nullptr);
    std::string tampered = ek;
    const uint64_t at = kSegmentHeaderBytes + (map - base);
    for (uint64_t i = 0; i < uint64_t{ks.tokens} * ks.kv_heads / 2; ++i) {
      tampered[at + i] = char(rng());
    }
    for (Path path : {Path::kRef, Path::kCpu}) {
      const std::string enc = Encode(p, vs, v, path, k, tampered);
      EXPECT_TRUE(enc != expected);
      EXPECT_LE(RelL2(vs, v, Decode(enc, vs, path)), 0.05);
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
