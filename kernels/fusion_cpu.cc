// Fusion math, fast CPU path: AVX2/F16C when the CPU has them (kernels::CpuHasAvx2), else the
// reference loops. Sums are double, accumulated per lane and combined at the end, so results
// match the reference to rounding, not bit for bit.
#include <algorithm>
#include <cmath>

#include "kernels/fusion.h"
#include "kernels/fusion_internal.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::internal {
namespace {

KVPOOL_AVX2 inline double HSum(__m256d v) {
  __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
}

// Adds the products of 8 floats to two double accumulators.
KVPOOL_AVX2 inline void Fma8(__m256 a, __m256 b, __m256d* lo, __m256d* hi) {
  *lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                        _mm256_cvtps_pd(_mm256_castps256_ps128(b)), *lo);
  *hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)),
                        _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)), *hi);
}

template <bool kBf16>
KVPOOL_AVX2 Sums SumsAvx2(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r) {
  __m256d xr0 = _mm256_setzero_pd(), xr1 = xr0, rr0 = xr0, rr1 = xr0, xx0 = xr0, xx1 = xr0;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 rmax = _mm256_setzero_ps();
  const size_t n = x.size(), n8 = n / 8 * 8;
  for (size_t i = 0; i < n8; i += 8) {
    const __m256 a = simd::Load8<kBf16>(x.data() + i), b = simd::Load8<kBf16>(r.data() + i);
    Fma8(a, b, &xr0, &xr1);
    Fma8(b, b, &rr0, &rr1);
    Fma8(a, a, &xx0, &xx1);
    rmax = _mm256_max_ps(rmax, _mm256_and_ps(b, abs_mask));
  }
  Sums s;
  s.xr = HSum(_mm256_add_pd(xr0, xr1));
  s.rr = HSum(_mm256_add_pd(rr0, rr1));
  s.xx = HSum(_mm256_add_pd(xx0, xx1));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, rmax);
  for (float v : lanes) s.rmax = std::max<double>(s.rmax, v);
  const Sums tail = SumsRef(dtype, x.subspan(n8), r.subspan(n8));
  s.xr += tail.xr;
  s.rr += tail.rr;
  s.xx += tail.xx;
  s.rmax = std::max(s.rmax, tail.rmax);
  return s;
}

template <bool kBf16>
KVPOOL_AVX2 double ScaledErrorAvx2(DType dtype, absl::Span<const uint16_t> x,
                                   absl::Span<const uint16_t> r, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256d e0 = _mm256_setzero_pd(), e1 = e0;
  const size_t n = x.size(), n8 = n / 8 * 8;
  alignas(32) uint16_t tmp[8];
  for (size_t i = 0; i < n8; i += 8) {
    const __m256 y = _mm256_mul_ps(s, simd::Load8<kBf16>(r.data() + i));
    // Round to the element type and back: what a reader gets. Infinite products stay infinite.
    simd::Store8<kBf16>(tmp, y);
    const __m256 d = _mm256_sub_ps(simd::Load8<kBf16>(tmp), simd::Load8<kBf16>(x.data() + i));
    Fma8(d, d, &e0, &e1);
  }
  double err = HSum(_mm256_add_pd(e0, e1));
  if (n8 < n) err += ScaledErrorRef(dtype, x.subspan(n8), r.subspan(n8), scale);
  return err;
}

template <bool kBf16>
KVPOOL_AVX2 void ScaleAvx2(DType dtype, absl::Span<uint16_t> x, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const size_t n = x.size(), n8 = n / 8 * 8;
  for (size_t i = 0; i < n8; i += 8) {
    simd::Store8<kBf16>(x.data() + i, _mm256_mul_ps(s, simd::Load8<kBf16>(x.data() + i)));
  }
  ScaleRef(dtype, x.subspan(n8), scale);
}

// Sketches of up to 4 samples at once: each projection row is loaded once for all of them.
// Each sample's sum runs in the same order as for one sample alone (8 lanes over k, then
// across), so the bits are the same as SketchAvx2's. A sign can differ from the reference's
// double sum only when a projection is within rounding of zero.
KVPOOL_AVX2 void SketchGroupAvx2(const std::vector<float>* samples, size_t count, Sketch* out) {
  const std::vector<float>& g = SketchProjections();
  const size_t n = samples[0].size(), n8 = n / 8 * 8;
  for (size_t j = 0; j < count; ++j) out[j] = Sketch{};
  for (uint32_t b = 0; b < kSketchBits; ++b) {
    const float* row = g.data() + uint64_t{b} * kSketchSamples;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (size_t k = 0; k < n8; k += 8) {
      const __m256 p = _mm256_loadu_ps(row + k);
      for (size_t j = 0; j < count; ++j) {
        acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(samples[j].data() + k), acc[j]);
      }
    }
    for (size_t j = 0; j < count; ++j) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float y = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
      for (size_t k = n8; k < n; ++k) y += row[k] * samples[j][k];
      if (y > 0) out[j].bits[b / 64] |= uint64_t{1} << (b % 64);
    }
  }
}

KVPOOL_AVX2 Sketch SketchAvx2(DType dtype, absl::Span<const uint16_t> x) {
  const std::vector<float> sample = SampleSegment(dtype, x);
  Sketch s;
  SketchGroupAvx2(&sample, 1, &s);
  return s;
}

}  // namespace

Sketch SketchCpu(DType dtype, absl::Span<const uint16_t> x) {
  return CpuHasAvx2() ? SketchAvx2(dtype, x) : SketchRef(dtype, x);
}

Sums SumsCpu(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r) {
  if (!CpuHasAvx2()) return SumsRef(dtype, x, r);
  return dtype == DType::kBf16 ? SumsAvx2<true>(dtype, x, r) : SumsAvx2<false>(dtype, x, r);
}

void SketchManyCpu(DType dtype, absl::Span<const absl::Span<const uint16_t>> segments,
                   Sketch* out) {
  if (!CpuHasAvx2()) {
    for (size_t i = 0; i < segments.size(); ++i) out[i] = SketchRef(dtype, segments[i]);
    return;
  }
  // Groups of up to 4 segments whose samples have the same length.
  size_t i = 0;
  while (i < segments.size()) {
    std::vector<float> samples[4];
    size_t count = 0;
    const uint64_t len = SampleCount(segments[i].size());
    while (count < 4 && i + count < segments.size() &&
           SampleCount(segments[i + count].size()) == len) {
      samples[count] = SampleSegment(dtype, segments[i + count]);
      ++count;
    }
    SketchGroupAvx2(samples, count, out + i);
    i += count;
  }
}

double ScaledErrorCpu(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
                      float scale) {
  if (!CpuHasAvx2()) return ScaledErrorRef(dtype, x, r, scale);
  return dtype == DType::kBf16 ? ScaledErrorAvx2<true>(dtype, x, r, scale)
                               : ScaledErrorAvx2<false>(dtype, x, r, scale);
}

void ScaleCpu(DType dtype, absl::Span<uint16_t> x, float scale) {
  if (!CpuHasAvx2()) return ScaleRef(dtype, x, scale);
  if (dtype == DType::kBf16) {
    ScaleAvx2<true>(dtype, x, scale);
  } else {
    ScaleAvx2<false>(dtype, x, scale);
  }
}

}  // namespace kvpool::kernels::internal
