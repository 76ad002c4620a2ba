// kvpool codec's fast profile (CodecParams::flags kKvpoolFastProfile): a hand-computed case, the
// budget and reference == fast CPU path (payload and decode) over many random segments, and
// full-size segments through the AVX-512 loops; the AVX2 kernels against the reference's.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool.h"
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

// Random case n of a fast-profile test: kinds alternating in pairs and dtypes in turn, a shape
// of `dims`, one of `budgets`, elements of a RandomSegment type below `types` and, for two value
// segments in three, their keys.
struct RandomCase {
  SegmentShape shape;
  float budget;
  std::vector<uint16_t> x, keys;
};
constexpr uint32_t kTokens[] = {1, 2, 15, 16, 17, 40, 130};  // Partial groups of 16 and more.
RandomCase MakeRandomCase(int n, const float (&budgets)[5], const uint32_t (&dims)[5], int types,
                          std::mt19937_64& rng) {
  const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
  const SegmentKind kind = (n / 2) % 2 ? SegmentKind::kValue : SegmentKind::kKey;
  RandomCase c;
  c.shape = Shape(kTokens[rng() % 7], 1 + rng() % 4, dims[rng() % 5], dt, kind);
  c.budget = budgets[rng() % 5];
  c.x = RandomSegment(c.shape, int(rng() % types), rng);
  if (kind == SegmentKind::kValue && n % 3 != 0) c.keys = RandomSegment(c.shape, 5, rng);
  return c;
}

// Layer 0 of the synthetic KV (`kvpool gen`), [256][8][128] fp16: its keys and its values.
std::pair<std::vector<uint16_t>, std::vector<uint16_t>> SyntheticLayer() {
  const std::string kv = SyntheticKvOf(1, 8, 128, 256);
  const uint16_t* e = reinterpret_cast<const uint16_t*>(kv.data());
  const uint64_t n = uint64_t{256} * 8 * 128;
  return {std::vector<uint16_t>(e, e + n), std::vector<uint16_t>(e + n, e + 2 * n)};
}

// The fast profile over many random segments: mode 1 (or raw) with rank 0, the budget holds,
// and the fast CPU path (AVX-512 where the CPU has it) writes the reference's payload and
// decodes to its values; values with and without their keys, with and without classes.
TEST(KvpoolFast, BudgetHoldsAndCpuMatchesReference) {
  std::mt19937_64 rng(17);
  const float budgets[] = {0.005f, 0.02f, 0.05f, 0.1f, 0.2f};
  const uint32_t dims[] = {1, 16, 24, 32, 128};
  int segments = 0, violations = 0, classed = 0;
  for (int n = 0; n < 1200; ++n) {
    const RandomCase c = MakeRandomCase(n, budgets, dims, 6, rng);
    const SegmentShape& s = c.shape;
    const float budget = c.budget;
    const std::vector<uint16_t>& v = c.x;
    const std::vector<uint16_t>& keys = c.keys;
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
  const auto [k, v] = SyntheticLayer();
  const uint64_t n = k.size();
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

// The AVX2 kernels (CPUs without AVX-512) write the reference kernels' payloads byte for byte:
// random segments (partial groups, head_dim not a multiple of 16 taking the reference's loops,
// values with classes from their keys' elements, codes of every width), full-size segments,
// and non-finite elements (the same error on both).
TEST(KvpoolFast, Avx2KernelsWriteTheReferencePayloads) {
  namespace in = kvpool::internal;
  const in::FastKernels* avx2 = in::FastKernelsAvx2();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2";
  const auto encode = [](const in::FastKernels& kn, const SegmentShape& s, const CodecParams& p,
                         const std::vector<uint16_t>& x, const std::vector<uint16_t>& keys) {
    LayerKeys lk;
    if (!keys.empty()) lk.elements = keys.data();
    std::string out(2 * s.Bytes() + 4096, '\0');
    auto n =
        in::FastEncode(s, p, x.data(), lk, kn, reinterpret_cast<uint8_t*>(out.data()), out.size());
    if (!n.ok()) return n.status().ToString();
    out.resize(*n);
    return out;
  };
  std::mt19937_64 rng(29);
  const float budgets[] = {0.001f, 0.02f, 0.05f, 0.2f, 0.6f};
  const uint32_t dims[] = {16, 24, 32, 64, 128};
  int coded = 0, wide = 0, decoded = 0;
  for (int n = 0; n < 600; ++n) {
    const RandomCase c = MakeRandomCase(n, budgets, dims, 7, rng);
    const SegmentShape& s = c.shape;
    const CodecParams p = *NormalizeParams(Params(c.budget, 0, kFast));
    const std::vector<uint16_t>& v = c.x;
    const std::vector<uint16_t>& keys = c.keys;
    const std::string ref = encode(in::FastRefKernels(), s, p, v, keys);
    ASSERT_EQ(encode(*avx2, s, p, v, keys), ref) << "segment " << n;
    if (ref.size() > 8 && ref[0] == 1) {
      ++coded;
      // The AVX2 packs decoder (head_dim a multiple of 16) gives the reference's values.
      const uint8_t* pl = reinterpret_cast<const uint8_t*>(ref.data());
      std::vector<uint16_t> want(s.Elements()), got(s.Elements(), 0);
      ASSERT_TRUE(kvpool::DecodeRef(s, p, pl, ref.size(), want.data()).ok());
      in::Parsed parsed;
      ASSERT_TRUE(in::ParsePayload(s, pl, ref.size(), &parsed).ok());
      if (in::DecodePacksAvx2(s, parsed, got.data())) {
        ++decoded;
        ASSERT_EQ(got, want) << "segment " << n;
      }
      const uint64_t packs = uint64_t{in::Groups(s.tokens)} * s.kv_heads * s.head_dim;
      const uint8_t* widths = reinterpret_cast<const uint8_t*>(ref.data()) + in::kHeaderBytes +
                              s.kv_heads + 2 * uint64_t{s.kv_heads} * s.head_dim +
                              (ref[1] ? (uint64_t{s.tokens} * s.kv_heads + 1) / 2 : 0);
      for (uint64_t k = 0; k < packs; ++k) wide += ((widths[k / 2] >> (4 * (k & 1))) & 15) > 8;
    }
  }
  EXPECT_GT(coded, 200);
  EXPECT_GT(decoded, 100);
  EXPECT_GT(wide, 0);  // Packs of more than 8 planes (the second byte of each plane word).
  const auto [k, v] = SyntheticLayer();
  for (float budget : {0.02f, 0.2f}) {
    const CodecParams p = *NormalizeParams(Params(budget, 0, kFast));
    const SegmentShape ks = Shape(256, 8, 128, DType::kFp16, SegmentKind::kKey);
    const SegmentShape vs = Shape(256, 8, 128, DType::kFp16, SegmentKind::kValue);
    EXPECT_EQ(encode(*avx2, ks, p, k, {}), encode(in::FastRefKernels(), ks, p, k, {}));
    EXPECT_EQ(encode(*avx2, vs, p, v, k), encode(in::FastRefKernels(), vs, p, v, k));
  }
  // Each kernel alone: the same sums, means, distances, codes, error and energy to the bit.
  for (int n = 0; n < 60; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentShape s = Shape(kTokens[rng() % 7], 1 + rng() % 4, dims[rng() % 5], dt);
    const std::vector<uint16_t> x = RandomSegment(s, int(rng() % 7), rng);
    const uint32_t T = s.tokens, H = s.kv_heads, D = s.head_dim, G = in::Groups(T);
    const uint64_t HD = uint64_t{H} * D;
    const in::FastKernels* kn[2] = {&in::FastRefKernels(), avx2};
    std::vector<float> sums[2], sq[2], m[2], dist[2];
    std::vector<uint16_t> stored[2];
    std::string packs[2];
    double err[2] = {0, 0}, energy[2] = {0, 0};
    uint64_t size[2];
    const uint32_t stride = 1 + n % 3;
    std::vector<float> steps(uint64_t{G} * H * in::kPack);
    for (float& f : steps) f = 0.05f + 0.5f * float(rng() % 100) / 100;
    for (int k = 0; k < 2; ++k) {
      sums[k].resize(HD);
      sq[k].resize(HD);
      m[k].resize(HD);
      stored[k].resize(HD);
      dist[k].resize(uint64_t{T} * H);
      ASSERT_TRUE(kn[k]->stats(dt, x.data(), T, HD, stride, sums[k].data(), sq[k].data()));
      kn[k]->means(dt, sums[k].data(), 7, HD, stored[k].data(), m[k].data());
      kn[k]->distances(dt, x.data(), T, H, D, m[k].data(), dist[k].data());
      packs[k].assign(in::PackBound(uint64_t{G} * HD), '\0');
      size[k] = kn[k]->quantize(
          dt, x.data(), T, H, D, m[k].data(), steps.data(), n % 2 ? 1 : stride,
          n % 2 ? reinterpret_cast<uint8_t*>(packs[k].data()) : nullptr, &err[k], &energy[k]);
      if (size[k] != in::kQuantizeFailed) packs[k].resize(size[k]);
    }
    EXPECT_EQ(sums[1], sums[0]) << n;
    EXPECT_EQ(sq[1], sq[0]) << n;
    EXPECT_EQ(stored[1], stored[0]) << n;
    EXPECT_EQ(m[1], m[0]) << n;
    EXPECT_EQ(dist[1], dist[0]) << n;
    ASSERT_EQ(size[1], size[0]) << n;
    if (size[0] == in::kQuantizeFailed) continue;
    EXPECT_EQ(packs[1], packs[0]) << n;
    EXPECT_EQ(err[1], err[0]) << n;
    EXPECT_EQ(energy[1], energy[0]) << n;
  }
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const SegmentShape s = Shape(160, 2, 32, dt, SegmentKind::kKey);
    std::vector<uint16_t> w = RandomSegment(s, 0, rng);
    w[uint64_t{70} * 64 + 5] = dt == DType::kBf16 ? 0x7fc0 : 0x7e00;  // NaN
    const CodecParams p = *NormalizeParams(Params(0.05f, 0, kFast));
    const std::string ref = encode(in::FastRefKernels(), s, p, w, {});
    EXPECT_NE(ref.find("not finite"), std::string::npos) << ref.substr(0, 80);
    EXPECT_EQ(encode(*avx2, s, p, w, {}), ref);
    std::vector<float> sums(64), sq(64);
    EXPECT_FALSE(avx2->stats(dt, w.data(), 160, 64, 1, sums.data(), sq.data()));
    EXPECT_FALSE(in::FastRefKernels().stats(dt, w.data(), 160, 64, 1, sums.data(), sq.data()));
    // NaN or Inf in a group the means do not sample: the quantisation itself fails, on both.
    const uint16_t inf = dt == DType::kBf16 ? 0x7f80 : 0x7c00;
    for (uint16_t bad : {uint16_t(inf | 0x40), inf, uint16_t(inf | 0x8000)}) {
      std::vector<uint16_t> u = RandomSegment(s, 0, rng);
      u[uint64_t{20} * 64 + 33] = bad;
      const std::vector<float> m(64, 0.f), steps(uint64_t{in::Groups(160)} * 2 * in::kPack, 0.1f);
      std::string packs(in::PackBound(uint64_t{in::Groups(160)} * 64), '\0');
      for (const in::FastKernels* k : {avx2, &in::FastRefKernels()}) {
        double err = 0, energy = 0;
        EXPECT_EQ(k->quantize(dt, u.data(), 160, 2, 32, m.data(), steps.data(), 1,
                              reinterpret_cast<uint8_t*>(packs.data()), &err, &energy),
                  in::kQuantizeFailed)
            << bad;
      }
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
