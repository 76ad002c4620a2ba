// Tests for kernels/fusion.h: sketch, exact check, scaling and batch grouping, reference against
// hand-computed cases and the fast CPU path against the reference.
#include "kernels/fusion.h"

#include <cmath>
#include <string>
#include <random>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/device.h"

namespace kvpool::kernels {
namespace {

std::vector<uint16_t> ToHalf(const std::vector<float>& x, DType dtype = DType::kFp16) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    out[i] = dtype == DType::kBf16 ? FloatToBf16(x[i]) : FloatToFp16(x[i]);
  }
  return out;
}

std::vector<float> Gaussian(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

// x + noise * (a fresh Gaussian of the same per-element scale).
std::vector<float> Perturb(const std::vector<float>& x, float noise, uint64_t seed) {
  std::vector<float> n = Gaussian(x.size(), seed, noise);
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] + n[i];
  return out;
}

TEST(FusionTest, HammingAndRadius) {
  Sketch a, b;
  a.bits[0] = 0b1011;
  b.bits[1] = 0b1;
  EXPECT_EQ(HammingDistance(a, a), 0);
  EXPECT_EQ(HammingDistance(a, b), 4);
  EXPECT_LT(SketchRadius(0.99), SketchRadius(0.9));
  EXPECT_LT(SketchRadius(0.9), SketchRadius(0.0));
  EXPECT_LE(SketchRadius(-1.0), static_cast<int>(kSketchBits));
}

TEST(FusionTest, SketchIsScaleInvariantAndTracksAngle) {
  for (Path path : {Path::kRef, Path::kCpu}) {
    const std::vector<float> x = Gaussian(10000, 1);
    std::vector<float> doubled(x.size()), negated(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      doubled[i] = 2 * x[i];
      negated[i] = -x[i];
    }
    const Sketch s = SketchSegment(DType::kFp16, ToHalf(x), path);
    EXPECT_EQ(s, SketchSegment(DType::kFp16, ToHalf(doubled), path));
    EXPECT_EQ(HammingDistance(s, SketchSegment(DType::kFp16, ToHalf(negated), path)),
              static_cast<int>(kSketchBits));
    // Cosine ~0.995 (noise 0.1): a few bits; unrelated: about half.
    const int near = HammingDistance(s, SketchSegment(DType::kFp16, ToHalf(Perturb(x, 0.1f, 2)), path));
    const int far = HammingDistance(s, SketchSegment(DType::kFp16, ToHalf(Gaussian(10000, 3)), path));
    EXPECT_LE(near, SketchRadius(0.99));
    EXPECT_GT(far, SketchRadius(0.9));
  }
}

TEST(FusionTest, SketchPathsAgree) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    for (size_t n : {1ul, 7ul, 100ul, 4096ul, 50000ul}) {
      const std::vector<uint16_t> x = ToHalf(Gaussian(n, seed));
      EXPECT_LE(HammingDistance(SketchSegment(DType::kFp16, x, Path::kRef),
                                SketchSegment(DType::kFp16, x, Path::kCpu)),
                2)
          << "n " << n << " seed " << seed;
    }
  }
}

TEST(FusionTest, FitHandCases) {
  for (Path path : {Path::kRef, Path::kCpu}) {
    // x = 2 r exactly (powers of two keep fp16 exact): cosine 1, scale 2, no error.
    const std::vector<float> r = {1, -2, 0.5f, 4, 0, 3, -1, 2, 1};
    std::vector<float> x(r.size());
    for (size_t i = 0; i < r.size(); ++i) x[i] = 2 * r[i];
    Fit fit = FitScaled(DType::kFp16, ToHalf(x), ToHalf(r), path);
    EXPECT_DOUBLE_EQ(fit.cosine, 1.0);
    EXPECT_EQ(fit.scale, 2.f);
    EXPECT_EQ(fit.rel_error, 0.0);
    // x = (1, 1), r = (1, 0): cosine 1/sqrt 2, scale 1, error |(0, 1)| / |(1, 1)| = 1/sqrt 2.
    fit = FitScaled(DType::kFp16, ToHalf({1, 1}), ToHalf({1, 0}), path);
    EXPECT_NEAR(fit.cosine, 1 / std::sqrt(2.0), 1e-12);
    EXPECT_EQ(fit.scale, 1.f);
    EXPECT_NEAR(fit.rel_error, 1 / std::sqrt(2.0), 1e-12);
    // Zero vectors, size mismatch and non-finite values never fuse.
    EXPECT_TRUE(std::isinf(FitScaled(DType::kFp16, ToHalf({0, 0}), ToHalf({1, 0}), path).rel_error));
    EXPECT_TRUE(std::isinf(FitScaled(DType::kFp16, ToHalf({1, 0}), ToHalf({0, 0}), path).rel_error));
    EXPECT_TRUE(std::isinf(FitScaled(DType::kFp16, ToHalf({1, 0}), ToHalf({1}), path).rel_error));
    EXPECT_TRUE(std::isinf(
        FitScaled(DType::kFp16, ToHalf({1, NAN}), ToHalf({1, 1}), path).rel_error));
    EXPECT_TRUE(std::isinf(
        FitScaled(DType::kFp16, ToHalf({1, 1}), ToHalf({INFINITY, 1}), path).rel_error));
    // Values that overflow fp16 on read-back never fuse: scale * 1.001 rounds to infinity.
    EXPECT_TRUE(std::isinf(
        FitScaled(DType::kFp16, ToHalf({65504, 65504}), ToHalf({1, 1.001f}), path).rel_error));
  }
}

TEST(FusionTest, FitMeasuresWhatReadersGet) {
  // The error is of to_dtype(scale * r), recomputed here by hand.
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const std::vector<uint16_t> r = ToHalf(Gaussian(1000, 5), dtype);
    const std::vector<uint16_t> x = ToHalf(Perturb(Gaussian(1000, 5, 1.7f), 0.05f, 6), dtype);
    const Fit fit = FitScaled(dtype, x, r, Path::kRef);
    std::vector<uint16_t> y = r;
    ScaleElements(dtype, absl::MakeSpan(y), fit.scale, Path::kRef);
    auto f = [dtype](uint16_t h) { return dtype == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h); };
    double err = 0, ref = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      err += (double(f(y[i])) - f(x[i])) * (double(f(y[i])) - f(x[i]));
      ref += double(f(x[i])) * f(x[i]);
    }
    EXPECT_NEAR(fit.rel_error, std::sqrt(err / ref), 1e-12);
    EXPECT_GT(fit.cosine, 0.99);
    EXPECT_NEAR(fit.scale, 1.7f, 0.05f);
  }
}

TEST(FusionTest, FitPathsAgree) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (size_t n : {1ul, 9ul, 1000ul, 65537ul}) {
      const std::vector<uint16_t> r = ToHalf(Gaussian(n, n), dtype);
      const std::vector<uint16_t> x = ToHalf(Perturb(Gaussian(n, n, 0.8f), 0.3f, n + 1), dtype);
      const Fit a = FitScaled(dtype, x, r, Path::kRef), b = FitScaled(dtype, x, r, Path::kCpu);
      EXPECT_NEAR(a.cosine, b.cosine, 1e-9);
      EXPECT_NEAR(a.scale, b.scale, 1e-6f * std::abs(a.scale));
      EXPECT_NEAR(a.rel_error, b.rel_error, 1e-6 * a.rel_error + 1e-12);
    }
  }
}

TEST(FusionTest, FitWithinDecidesAsTheExactCheck) {
  // Pairs whose exact error lies near and far from the budgets, in both dtypes; FitWithin must
  // land on the same side of every budget as FitScaled, with the same cosine and scale.
  int decided_by_bound = 0, total = 0;
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (float noise : {0.f, 0.001f, 0.01f, 0.03f, 0.05f, 0.2f}) {
      for (size_t n : {1ul, 9ul, 4096ul}) {
        const std::vector<uint16_t> r = ToHalf(Gaussian(n, n), dtype);
        const std::vector<uint16_t> x =
            ToHalf(Perturb(Gaussian(n, n, 0.7f), noise * 0.7f, n + 7), dtype);
        for (Path path : {Path::kRef, Path::kCpu}) {
          const Fit exact = FitScaled(dtype, x, r, path);
          for (double budget : {0.001, 0.01, 0.02, 0.03, 0.05, exact.rel_error * (1 - 1e-4),
                                exact.rel_error, exact.rel_error * (1 + 1e-4)}) {
            const Fit within = FitWithin(dtype, x, r, budget, path);
            ++total;
            EXPECT_EQ(within.rel_error <= budget, exact.rel_error <= budget)
                << "noise " << noise << " n " << n << " budget " << budget << " exact "
                << exact.rel_error << " within " << within.rel_error;
            EXPECT_EQ(within.cosine, exact.cosine);
            EXPECT_EQ(within.scale, exact.scale);
            if (within.rel_error != exact.rel_error) ++decided_by_bound;
          }
        }
      }
    }
  }
  EXPECT_GT(decided_by_bound, total / 3);  // The bound does spare the read-back pass.
  // Overflow to infinity and subnormals are left to the exact pass or bounded correctly.
  const std::vector<uint16_t> big = ToHalf({60000.f, -50000.f, 1.f});
  const std::vector<uint16_t> bigger = ToHalf({65504.f, -60000.f, 1.2f});
  for (double budget : {0.01, 0.5}) {
    EXPECT_EQ(FitWithin(DType::kFp16, bigger, big, budget, Path::kCpu).rel_error <= budget,
              FitScaled(DType::kFp16, bigger, big, Path::kCpu).rel_error <= budget);
  }
  const std::vector<uint16_t> tiny = ToHalf({3e-7f, -1e-7f, 6e-8f, 2e-7f});
  const std::vector<uint16_t> tiny2 = ToHalf({2e-7f, -1e-7f, 1e-7f, 1e-7f});
  for (double budget : {0.05, 0.3, 0.6}) {
    EXPECT_EQ(FitWithin(DType::kFp16, tiny, tiny2, budget, Path::kRef).rel_error <= budget,
              FitScaled(DType::kFp16, tiny, tiny2, Path::kRef).rel_error <= budget);
  }
}

TEST(FusionTest, SketchSegmentsIsOneSketchPerSegment) {
  for (Path path : {Path::kRef, Path::kCpu}) {
    std::vector<std::vector<uint16_t>> data;
    for (size_t n : {5000ul, 5000ul, 7ul, 5000ul, 1024ul, 3000ul, 5000ul, 5000ul, 5000ul}) {
      data.push_back(ToHalf(Gaussian(n, data.size() + 40)));
    }
    const std::vector<absl::Span<const uint16_t>> segments(data.begin(), data.end());
    const std::vector<Sketch> many = SketchSegments(DType::kFp16, segments, path);
    ASSERT_EQ(many.size(), segments.size());
    for (size_t i = 0; i < segments.size(); ++i) {
      EXPECT_EQ(many[i], SketchSegment(DType::kFp16, segments[i], path)) << "segment " << i;
    }
  }
  EXPECT_TRUE(SketchSegments(DType::kFp16, {}, Path::kCpu).empty());
}

TEST(FusionTest, ScalePathsAreBitExact) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (float scale : {1.f, 0.37f, -2.5f, 1e4f, 1e-6f}) {
      std::vector<float> x = Gaussian(1027, 9, 100.f);
      x[3] = INFINITY;
      x[5] = 0.f;
      x[7] = 65504.f;
      std::vector<uint16_t> a = ToHalf(x, dtype), b = a;
      ScaleElements(dtype, absl::MakeSpan(a), scale, Path::kRef);
      ScaleElements(dtype, absl::MakeSpan(b), scale, Path::kCpu);
      EXPECT_EQ(a, b) << "scale " << scale;
    }
  }
  // Scale 1 changes nothing, not even a NaN's payload.
  std::vector<uint16_t> nan = {0x7e01, 0x3c00};
  ScaleElements(DType::kFp16, absl::MakeSpan(nan), 1.f, Path::kCpu);
  EXPECT_THAT(nan, ::testing::ElementsAre(0x7e01, 0x3c00));
}

TEST(FusionTest, GroupByCosineFindsFamilies) {
  // Three families of five noisy, differently scaled copies, plus two loners.
  std::vector<std::vector<float>> samples;
  for (int family = 0; family < 3; ++family) {
    const std::vector<float> base = Gaussian(512, 100 + family);
    for (int m = 0; m < 5; ++m) {
      std::vector<float> v = Perturb(base, 0.05f, 1000 + 10 * family + m);
      for (float& e : v) e *= 0.5f + m;
      samples.push_back(v);
    }
  }
  samples.push_back(Gaussian(512, 7));
  samples.push_back(std::vector<float>(512, 0.f));  // Zero: always alone.
  const auto groups = GroupByCosine(samples, 0.95);
  ASSERT_EQ(groups.size(), 5u);
  EXPECT_THAT(groups[0], ::testing::ElementsAre(0, 1, 2, 3, 4));
  EXPECT_THAT(groups[1], ::testing::ElementsAre(5, 6, 7, 8, 9));
  EXPECT_THAT(groups[2], ::testing::ElementsAre(10, 11, 12, 13, 14));
  EXPECT_THAT(groups[3], ::testing::ElementsAre(15));
  EXPECT_THAT(groups[4], ::testing::ElementsAre(16));
  // Above any achievable cosine: singletons.
  EXPECT_EQ(GroupByCosine(samples, 1.01).size(), samples.size());
  EXPECT_TRUE(GroupByCosine({}, 0.9).empty());
}

TEST(FusionTest, RepresentativeIsTheNormalisedMeanAtTheMeanNorm) {
  // Members 1 * u and 3 * u: the representative is u at norm 2 |u|.
  const std::vector<float> u = {0.5f, -1, 0.25f, 2};
  std::vector<float> three(u.size());
  for (size_t i = 0; i < u.size(); ++i) three[i] = 3 * u[i];
  const std::vector<uint16_t> a = ToHalf(u), b = ToHalf(three);
  std::vector<absl::Span<const uint16_t>> members = {a, b};
  std::vector<uint16_t> rep(u.size());
  Representative(DType::kFp16, members, absl::MakeSpan(rep));
  for (size_t i = 0; i < u.size(); ++i) EXPECT_FLOAT_EQ(Fp16ToFloat(rep[i]), 2 * u[i]);
}

// --- The CUDA path (tests named Cuda* carry the ctest label gpu and skip without a device).

TEST(FusionTest, DevicePathSaysUnavailableWithoutADevice) {
  if (DeviceCount() > 0) GTEST_SKIP() << "a device is present";
  const std::vector<uint16_t> x = ToHalf(Gaussian(64, 1));
  const absl::Span<const uint16_t> segs[] = {x};
  EXPECT_EQ(SketchSegmentsOnDevice(DType::kFp16, segs).status().code(),
            absl::StatusCode::kUnavailable);
  const FitRequest request{x, "", SegmentShape{4, 1, 16, DType::kFp16, SegmentKind::kKey}};
  EXPECT_EQ(FitEncodedOnDevice({&request, 1}).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(SelfCheckCudaFusion().code(), absl::StatusCode::kUnavailable);
}

TEST(FusionTest, CudaSketchIsTheReferenceBitForBit) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    std::vector<std::vector<uint16_t>> data;
    for (size_t n : {1ul, 7ul, 1023ul, 1024ul, 5000ul, 262144ul}) {
      data.push_back(ToHalf(Gaussian(n, n, 3.f), dtype));
    }
    data.push_back(std::vector<uint16_t>(300, 0));  // Zero: no bit set.
    std::vector<absl::Span<const uint16_t>> segs(data.begin(), data.end());
    auto sketches = SketchSegmentsOnDevice(dtype, segs);
    ASSERT_TRUE(sketches.ok()) << sketches.status();
    ASSERT_EQ(sketches->size(), segs.size());
    for (size_t i = 0; i < segs.size(); ++i) {
      EXPECT_EQ((*sketches)[i], SketchSegment(dtype, segs[i], Path::kRef)) << "segment " << i;
    }
  }
  auto none = SketchSegmentsOnDevice(DType::kFp16, {});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(FusionTest, CudaFitAgreesWithTheReference) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const SegmentShape shape{256, 8, 128, dtype, SegmentKind::kKey};
    const uint64_t n = shape.Elements();
    const std::vector<uint16_t> r = ToHalf(Gaussian(n, 1), dtype);
    const std::vector<uint16_t> close = ToHalf(Perturb(Gaussian(n, 1, 0.8f), 0.3f, 2), dtype);
    const std::vector<uint16_t> unrelated = ToHalf(Gaussian(n, 3), dtype);
    const std::vector<uint16_t> zero(n, 0);
    std::vector<uint16_t> with_nan = close;
    with_nan[17] = dtype == DType::kBf16 ? 0x7fc0 : 0x7e00;
    // The representative under two codecs: raw (exact) and kvpool (lossy: the check runs on
    // what readers decode).
    std::vector<std::string> encoded;
    for (CodecId codec : {CodecId::kRaw, CodecId::kKvpool}) {
      CodecParams p{codec};
      p.budget = 0.05f;
      auto e = EncodeSegment(p, shape, r, Path::kCpu);
      ASSERT_TRUE(e.ok()) << e.status();
      encoded.push_back(*e);
    }
    std::vector<FitRequest> requests;
    for (const std::string& e : encoded) {
      for (const std::vector<uint16_t>* x :
           std::vector<const std::vector<uint16_t>*>{&close, &unrelated, &zero, &with_nan, &close}) {
        requests.push_back({*x, e, shape});
      }
    }
    auto fits = FitEncodedOnDevice(requests);
    ASSERT_TRUE(fits.ok()) << fits.status();
    ASSERT_EQ(fits->size(), requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      std::vector<uint16_t> decoded(n);
      ASSERT_TRUE(DecodeSegment(requests[i].representative, absl::MakeSpan(decoded), Path::kRef,
                                &shape)
                      .ok());
      const Fit want = FitScaled(dtype, requests[i].x, decoded, Path::kRef);
      const Fit& got = (*fits)[i];
      EXPECT_NEAR(got.cosine, want.cosine, 1e-9) << "request " << i;
      EXPECT_NEAR(got.scale, want.scale, 1e-6f * std::abs(want.scale)) << "request " << i;
      if (std::isinf(want.rel_error)) {
        EXPECT_TRUE(std::isinf(got.rel_error)) << "request " << i;
      } else {
        EXPECT_NEAR(got.rel_error, want.rel_error, 1e-6 * want.rel_error + 1e-12) << "request " << i;
      }
    }
  }
}

TEST(FusionTest, CudaFitRejectsBadRequests) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  const SegmentShape shape{16, 2, 64, DType::kFp16, SegmentKind::kKey};
  const std::vector<uint16_t> x = ToHalf(Gaussian(shape.Elements(), 4));
  auto e = EncodeSegment(CodecParams{CodecId::kRaw}, shape, x, Path::kCpu);
  ASSERT_TRUE(e.ok());
  std::string corrupt = *e;
  corrupt[corrupt.size() - 3] ^= 0x40;
  FitRequest bad{x, corrupt, shape};
  EXPECT_EQ(FitEncodedOnDevice({&bad, 1}).status().code(), absl::StatusCode::kDataLoss);
  FitRequest truncated{x, absl::string_view(*e).substr(0, 40), shape};
  EXPECT_EQ(FitEncodedOnDevice({&truncated, 1}).status().code(), absl::StatusCode::kDataLoss);
  SegmentShape other = shape;
  other.tokens = 8;
  FitRequest short_x{absl::MakeConstSpan(x).subspan(0, other.Elements()), *e, other};
  EXPECT_FALSE(FitEncodedOnDevice({&short_x, 1}).ok());  // Representative of another shape.
  FitRequest wrong_size{absl::MakeConstSpan(x).subspan(1), *e, shape};
  EXPECT_EQ(FitEncodedOnDevice({&wrong_size, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvpool::kernels
