// The CUDA fusion kernels (kernels/fusion_kernels.cuh) run on the host under
// tests/util/cuda_emulation.h, against the reference: so their logic (indexing, shared memory,
// the fixed-order reductions) is tested in every build, with or without a GPU. The launchers
// and real-GPU behaviour are tested by FusionTest.Cuda* (label gpu).
#include "tests/util/cuda_emulation.h"  // Before the kernel header.
//
#include "kernels/fusion_kernels.cuh"

#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"

namespace kvpool::kernels {
namespace {

using ::kvpool::testing::cuda_emulation::Launch;

std::vector<uint16_t> Gaussian(DType dtype, size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<uint16_t> out(n);
  for (uint16_t& v : out) v = FloatToElement(dtype, normal(rng));
  return out;
}

TEST(FusionKernelsTest, SketchKernelIsTheReferenceBitForBit) {
  const std::vector<float> projections = internal::TransposedProjections();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    std::vector<std::vector<uint16_t>> data;
    for (size_t n : {1ul, 7ul, 1023ul, 1024ul, 5000ul}) data.push_back(Gaussian(dtype, n, n, 3.f));
    data.push_back(std::vector<uint16_t>(300, 0));  // Zero: no bit set.
    const std::vector<absl::Span<const uint16_t>> segments(data.begin(), data.end());
    std::vector<uint16_t> samples;
    std::vector<uint32_t> counts;
    ASSERT_TRUE(internal::GatherSamples(segments, &samples, &counts).ok());
    std::vector<uint64_t> bits(2 * segments.size(), 0xbad);
    Launch(static_cast<unsigned>(segments.size()), 1, kSketchBits, [&] {
      if (dtype == DType::kBf16) {
        internal::SketchKernel<true>(samples.data(), counts.data(), projections.data(), bits.data());
      } else {
        internal::SketchKernel<false>(samples.data(), counts.data(), projections.data(), bits.data());
      }
    });
    for (size_t s = 0; s < segments.size(); ++s) {
      const Sketch want = SketchSegment(dtype, segments[s], Path::kRef);
      EXPECT_EQ(bits[2 * s], want.bits[0]) << "segment " << s;
      EXPECT_EQ(bits[2 * s + 1], want.bits[1]) << "segment " << s;
    }
    EXPECT_EQ(bits[2 * (segments.size() - 1)], 0u);
  }
}

TEST(FusionKernelsTest, CheckKernelsAgreeWithTheReference) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    // (x, r) pairs: x = 0.8 r + noise at several sizes (below, at and above one element per
    // thread and share), a NaN in x, and a zero x.
    std::vector<std::pair<std::vector<uint16_t>, std::vector<uint16_t>>> pairs;
    for (size_t n : {0ul, 1ul, 31ul, 8191ul, 70001ul}) {
      std::vector<uint16_t> r = Gaussian(dtype, n, n + 1, 1.f), x = Gaussian(dtype, n, n + 2, 0.3f);
      for (size_t i = 0; i < n; ++i) {
        x[i] = FloatToElement(dtype, ElementToFloat(dtype, x[i]) + 0.8f * ElementToFloat(dtype, r[i]));
      }
      pairs.push_back({x, r});
    }
    std::vector<uint16_t> r = Gaussian(dtype, 4000, 9, 1.f), nan = r;
    nan[5] = dtype == DType::kBf16 ? 0x7fc0 : 0x7e00;
    pairs.push_back({nan, r});
    pairs.push_back({std::vector<uint16_t>(4000, 0), r});
    // Staged back to back, as the launcher does.
    std::vector<uint16_t> xs, rs;
    std::vector<internal::PairRef> refs;
    for (const auto& [x, rr] : pairs) {
      refs.push_back({xs.size(), rs.size(), x.size()});
      xs.insert(xs.end(), x.begin(), x.end());
      rs.insert(rs.end(), rr.begin(), rr.end());
    }
    const unsigned n_pairs = static_cast<unsigned>(refs.size());
    std::vector<double> partials(refs.size() * internal::kSplits * 3);
    Launch(internal::kSplits, n_pairs, internal::kThreads, [&] {
      if (dtype == DType::kBf16) {
        internal::SumsKernel<true>(xs.data(), rs.data(), refs.data(), partials.data());
      } else {
        internal::SumsKernel<false>(xs.data(), rs.data(), refs.data(), partials.data());
      }
    });
    std::vector<Fit> fits(refs.size());
    std::vector<double> xx(refs.size());
    std::vector<float> scales(refs.size());
    std::vector<bool> needs_error(refs.size());
    std::vector<internal::PairRef> error_refs = refs;
    for (size_t i = 0; i < refs.size(); ++i) {
      needs_error[i] = internal::FitFromPartials(partials.data(), i, &fits[i], &xx[i]);
      scales[i] = fits[i].scale;
      if (!needs_error[i]) error_refs[i].n = 0;
    }
    std::vector<double> errors(refs.size() * internal::kSplits);
    Launch(internal::kSplits, n_pairs, internal::kThreads, [&] {
      if (dtype == DType::kBf16) {
        internal::ErrorKernel<true>(xs.data(), rs.data(), error_refs.data(), scales.data(),
                                    errors.data());
      } else {
        internal::ErrorKernel<false>(xs.data(), rs.data(), error_refs.data(), scales.data(),
                                     errors.data());
      }
    });
    for (size_t i = 0; i < refs.size(); ++i) {
      if (needs_error[i]) fits[i].rel_error = internal::RelErrorFromPartials(errors.data(), i, xx[i]);
      const Fit want = FitScaled(dtype, pairs[i].first, pairs[i].second, Path::kRef);
      EXPECT_NEAR(fits[i].cosine, want.cosine, 1e-9) << "pair " << i;
      EXPECT_NEAR(fits[i].scale, want.scale, 1e-6f * std::abs(want.scale)) << "pair " << i;
      if (std::isinf(want.rel_error)) {
        EXPECT_TRUE(std::isinf(fits[i].rel_error)) << "pair " << i;
      } else {
        EXPECT_NEAR(fits[i].rel_error, want.rel_error, 1e-6 * want.rel_error + 1e-12) << "pair " << i;
      }
    }
    EXPECT_GT(fits[3].cosine, 0.9);  // The test is not vacuous: real fits were compared.
    EXPECT_GT(fits[3].rel_error, 0.1);
  }
}

}  // namespace
}  // namespace kvpool::kernels
