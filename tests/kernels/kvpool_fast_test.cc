// kvpool codec's fast profile (CodecParams::flags kKvpoolFastProfile): a hand-computed case, the
// budget and reference == fast CPU path (payload and decode) over many random segments, and
// full-size segments through the AVX-512 loops.
#include <string>
#include <vector>

#include "client/synthetic.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool_format.h"
#include "tests/kernels/kvpool_test_helpers.h"

namespace kvpool::kernels {
namespace {

using namespace kvpool_test;  // NOLINT: the shared helpers of the kvpool tests.

// The fast profile: a constant segment, by hand. Value kind (no key scaling), no keys (no
// class map): 8 header, 1 rank (0), 16 means of 2 bytes, ceil(16 packs / 2) = 8 bytes of
// widths, all 0, and no planes: 49 bytes; the step is sqrt(12 * allowed / (T * H * D)).
TEST(KvpoolFast, ConstantSegmentByHand) {
  const SegmentShape s = Shape(16, 1, 16, DType::kFp16, SegmentKind::kValue);
  const std::vector<uint16_t> v(256, FloatToFp16(1.5f));
  for (Path path : {Path::kRef, Path::kCpu}) {
    const std::string enc = Encode(Params(0.1f, 0, kFast), s, v, path);
    ASSERT_EQ(enc.size(), kSegmentHeaderBytes + 49);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(enc.data()) + kSegmentHeaderBytes;
    EXPECT_EQ(p[0], 1);
    EXPECT_EQ(p[1], 0);
    EXPECT_EQ(p[8], 0);
    for (int c = 0; c < 16; ++c) EXPECT_EQ(p[9 + 2 * c] | (p[10 + 2 * c] << 8), 0x3e00);
    for (int k = 0; k < 8; ++k) EXPECT_EQ(p[41 + k], 0);
    float step;
    std::memcpy(&step, p + 4, 4);
    const double allowed = std::pow(0.1 * (1 - 1e-6), 2) * 256 * 2.25;
    EXPECT_NEAR(step, std::sqrt(12 * allowed / 256), 1e-6);
    EXPECT_EQ(Decode(enc, s, Path::kRef), v);
    EXPECT_EQ(Decode(enc, s, Path::kCpu), v);
  }
}

// The fast profile over many random segments: mode 1 (or raw) with rank 0, the budget holds,
// and the fast CPU path (AVX-512 where the CPU has it) writes the reference's payload and
// decodes to its values; values with and without their keys, with and without classes.
TEST(KvpoolFast, BudgetHoldsAndCpuMatchesReference) {
  std::mt19937_64 rng(17);
  const float budgets[] = {0.005f, 0.02f, 0.05f, 0.1f, 0.2f};
  const uint32_t tokens[] = {1, 2, 15, 16, 17, 40, 130};
  const uint32_t dims[] = {1, 16, 24, 32, 128};
  int segments = 0, violations = 0, classed = 0;
  for (int n = 0; n < 1200; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentKind kind = (n / 2) % 2 ? SegmentKind::kValue : SegmentKind::kKey;
    const SegmentShape s = Shape(tokens[rng() % 7], 1 + rng() % 4, dims[rng() % 5], dt, kind);
    const float budget = budgets[rng() % 5];
    const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 6), rng);
    std::vector<uint16_t> keys;
    if (kind == SegmentKind::kValue && n % 3 != 0) keys = RandomSegment(s, 5, rng);
    const uint8_t flags = kFast | (n % 7 == 0 ? kvpool::internal::kFlagEqualTokens : 0);
    const CodecParams p = Params(budget, 0, flags);
    const std::string ref = Encode(p, s, v, Path::kRef, keys);
    const std::string cpu = Encode(p, s, v, Path::kCpu, keys);
    ASSERT_EQ(ref, cpu) << "segment " << n;
    const uint8_t* pl = reinterpret_cast<const uint8_t*>(ref.data()) + kSegmentHeaderBytes;
    ASSERT_TRUE(pl[0] == 0 || pl[0] == 1) << int(pl[0]);
    if (pl[0] == 1) {
      for (uint32_t h = 0; h < s.kv_heads; ++h) ASSERT_EQ(pl[8 + h], 0);
      if (pl[1] != 0) ++classed;
    }
    const std::vector<uint16_t> a = Decode(ref, s, Path::kRef), b = Decode(ref, s, Path::kCpu);
    ASSERT_EQ(a, b) << "segment " << n;
    if (RelL2(s, v, a) > budget) ++violations;
    ++segments;
  }
  EXPECT_EQ(violations, 0) << "of " << segments;
  EXPECT_GT(classed, segments / 10);  // Class maps in mode 1 are exercised.
}

// Large fast-profile segments (the AVX-512 loops at full width): the budget, a ratio that
// grows with it, and payloads equal to the reference's.
TEST(KvpoolFast, LargeSegmentsMeetBudget) {
  client::SyntheticOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;
  o.tokens = 256;
  const std::string kv = client::SyntheticKv(o);
  const uint16_t* e = reinterpret_cast<const uint16_t*>(kv.data());
  const uint64_t n = uint64_t{256} * 8 * 128;
  const std::vector<uint16_t> k(e, e + n), v(e + n, e + 2 * n);
  double last = 0;
  for (float budget : {0.02f, 0.05f, 0.1f}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      const SegmentShape s = Shape(256, 8, 128, DType::kFp16, kind);
      const std::vector<uint16_t>& x = kind == SegmentKind::kKey ? k : v;
      const std::string ref = Encode(Params(budget, 0, kFast), s, x, Path::kRef, k);
      ASSERT_EQ(ref, Encode(Params(budget, 0, kFast), s, x, Path::kCpu, k));
      EXPECT_EQ(ref[kSegmentHeaderBytes], 1);
      EXPECT_EQ(ref[kSegmentHeaderBytes + 1], kvpool::internal::kHeadClasses);
      const std::vector<uint16_t> out = Decode(ref, s, Path::kCpu);
      EXPECT_EQ(out, Decode(ref, s, Path::kRef));
      // Keys get 24/64 of the budget (NormalizeParams); the step search spends most of it.
      const double target = kind == SegmentKind::kKey ? budget * 24 / 64 : budget;
      EXPECT_LE(RelL2(s, x, out), target);
      EXPECT_GT(RelL2(s, x, out), 0.85 * target);
      if (kind == SegmentKind::kValue) {
        const double ratio = double(n * 2) / ref.size();
        EXPECT_GT(ratio, last);
        last = ratio;
      }
    }
  }
}

// NaN or Inf anywhere, in the groups the means sample (0, 4, ..) or not: the segment is stored
// with the raw codec and decodes to the input exactly, on both paths (EncodeSegment leaves the
// check to this encoder).
TEST(KvpoolFast, NonFiniteElementsAnywhereAreStoredRaw) {
  std::mt19937_64 rng(23);
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const SegmentShape s = Shape(160, 2, 32, dt, SegmentKind::kValue);
    const std::vector<uint16_t> v = RandomSegment(s, 0, rng);
    const uint16_t inf = dt == DType::kBf16 ? 0x7f80 : 0x7c00, nan = inf | 0x40;
    for (uint32_t token : {0u, 20u, 64u, 159u}) {
      for (uint16_t bad : {inf, uint16_t(inf | 0x8000), nan}) {
        std::vector<uint16_t> w = v;
        w[uint64_t{token} * 64 + rng() % 64] = bad;
        for (Path path : {Path::kRef, Path::kCpu}) {
          const std::string enc = Encode(Params(0.05f, 0, kFast), s, w, path, v);
          absl::string_view payload;
          auto header = ParseSegment(enc, &payload);
          ASSERT_TRUE(header.ok()) << header.status();
          EXPECT_EQ(header->params.codec, CodecId::kRaw) << "token " << token;
          EXPECT_EQ(Decode(enc, s, path), w);
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
