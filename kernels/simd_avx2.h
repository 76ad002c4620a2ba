// AVX2/F16C pieces shared by the fast CPU codec paths: 8 fp16/bf16 elements to float and back,
// Tree16 and horizontal min/max,
// rounding to nearest even like common/half.h (no NaN may reach Store8). Functions carry the
// target attribute, so a file includes this without -mavx2 and calls them only after
// kernels::CpuHasAvx2(). Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_SIMD_AVX2_H_
#define KVPOOL_KERNELS_SIMD_AVX2_H_

#include <immintrin.h>

#include <cstdint>

#define KVPOOL_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace kvpool::kernels::simd {

template <bool kBf16>
KVPOOL_AVX2 inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kBf16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

// The bits of 8 floats rounded to bf16 (nearest even) in their upper 16 bits; the lower 16 are
// what the rounding carried, to be dropped.
KVPOOL_AVX2 inline __m256i RoundBf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
}

// 8 floats as the dtype, in a register.
template <bool kBf16>
KVPOOL_AVX2 inline __m128i FromFloats8(__m256 v) {
  if constexpr (kBf16) {
    const __m256i u = _mm256_srli_epi32(RoundBf16(v), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  } else {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  }
}

template <bool kBf16>
KVPOOL_AVX2 inline void Store8(uint16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), FromFloats8<kBf16>(v));
}

// v rounded to the dtype and back (Store8 then Load8, in registers).
template <bool kBf16>
KVPOOL_AVX2 inline __m256 RoundTrip8(__m256 v) {
  if constexpr (kBf16) {
    return _mm256_castsi256_ps(_mm256_and_si256(RoundBf16(v), _mm256_set1_epi32(-65536)));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Tree16 of 16 lanes held as l[0 .. 7] in `lo` and l[8 .. 15] in `hi`: l[i] + l[i + 8], then
// + 4, + 2, + 1 (the reference's Tree16).
KVPOOL_AVX2 inline float Tree16(__m256 lo, __m256 hi) {
  const __m256 a = _mm256_add_ps(lo, hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// Horizontal minimum / maximum of 8 floats.
KVPOOL_AVX2 inline float HMin(__m256 v) {
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_min_ss(x, _mm_shuffle_ps(x, x, 1)));
}
KVPOOL_AVX2 inline float HMax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

}  // namespace kvpool::kernels::simd

#endif  // KVPOOL_KERNELS_SIMD_AVX2_H_
