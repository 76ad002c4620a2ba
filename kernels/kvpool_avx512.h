// Internal to the kvpool codec's AVX-512 paths (kvpool_avx512.cc, kvpool_rows_avx512.cc): the
// target attribute they compile under and the element conversions they share. Callers check
// CpuHasAvx512() first. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KVPOOL_AVX512_H_
#define KVPOOL_KERNELS_KVPOOL_AVX512_H_

#include <immintrin.h>

#define KVPOOL_AVX512 \
  __attribute__((     \
      target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq,gfni,f16c,bmi2,lzcnt,prfchw")))

namespace kvpool::kernels::kvpool::internal {

// 16 elements of the dtype as floats.
template <bool kBf16>
KVPOOL_AVX512 inline __m512 ToFloats(__m256i h) {
  if constexpr (kBf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Round to nearest even into the dtype (NaN must not reach here; infinities stay).
template <bool kBf16>
KVPOOL_AVX512 inline __m256i FromFloats(__m512 y) {
  if constexpr (kBf16) {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
  }
  return _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_AVX512_H_
