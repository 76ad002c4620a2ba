// kivi fast CPU path: AVX2 + FMA + F16C, chosen at run time (the reference otherwise). It reads
// and writes the payload format of kivi_ref.cc with the same float operations in the same
// order, so that encoding gives the reference's payload byte for byte and decoding gives the
// reference's values bit for bit.
//
// Work goes in chunks of 8 elements that start at an element index divisible by 8: such a
// chunk's codes are b whole bytes (and 32-element blocks are 4b bytes, packed with byte
// shuffles). Elements outside whole chunks (odd shapes, groups shorter than 8) go through
// scalar code that mirrors the reference.
//   Keys, a token group at a time: with H*D % 32 == 0, 32 channels at a time (minimum and
//   maximum over the rows in registers, scales, then the tile's codes row by row while the tile
//   is in L1); otherwise all channels' minimums and maximums, scales, then codes row by row.
//   Values: with G % 8 == 0 and D % G == 0 (every group whole and aligned), eight groups at a
//   time (their reductions transposed together); otherwise one group at a time.
// Quantising divides by the fp16 scale (as the reference does) with a zero scale replaced by
// +inf, so that (x - m) / inf = +-0 gives code 0 without a mask.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/kivi.h"
#include "kernels/kivi_layout.h"
#include "kernels/simd_avx2.h"


namespace kvpool::kernels::kivi {
namespace {

// Mirrors kivi_ref.cc.
using internal::CeilDiv;
using internal::ComputeLayout;
using internal::Layout;
using internal::ValidParams;
using simd::Load8;
using simd::Store8;
using simd::HMax;
using simd::HMin;

absl::Status NotRepresentable() {
  return absl::InvalidArgumentError(
      "kivi: a segment element is not finite, or a group's scale or minimum is beyond fp16");
}

// ---- Scalar pieces, identical to the reference's.

template <bool kBf16>
float ToFloat(uint16_t v) {
  return kBf16 ? Bf16ToFloat(v) : Fp16ToFloat(v);
}
template <bool kBf16>
uint16_t FromFloat(float f) {
  return kBf16 ? FloatToBf16(f) : FloatToFp16(f);
}

uint32_t Quantize(float x, float s, float m, uint32_t levels) {
  if (s == 0) return 0;
  const float r = std::nearbyint((x - m) / s);
  if (!(r > 0)) return 0;
  if (r > static_cast<float>(levels)) return levels;
  return static_cast<uint32_t>(r);
}

template <int kBits>
void SetCode(uint8_t* codes, uint64_t e, uint32_t q) {
  const uint64_t bit = e * kBits;
  const uint32_t shift = bit % 8, mask = (1u << kBits) - 1;
  uint8_t& byte = codes[bit / 8];
  byte = static_cast<uint8_t>((byte & ~(mask << shift)) | (q << shift));
}
template <int kBits>
uint32_t GetCode(const uint8_t* codes, uint64_t e) {
  const uint64_t bit = e * kBits;
  return (codes[bit / 8] >> (bit % 8)) & ((1u << kBits) - 1);
}

template <bool kBf16>
uint16_t DecodeOne(uint32_t q, float s, float m) {
  return FromFloat<kBf16>(static_cast<float>(q) * s + m);
}

uint16_t Load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ---- 8-element vector pieces.

template <int kBits>
KVPOOL_AVX2 inline __m256i CodeShifts() {
  return _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits,
                           7 * kBits);
}

// The codes of 8 elements (kBits bytes at p) as floats.
template <int kBits>
KVPOOL_AVX2 inline __m256 Codes8(const uint8_t* p) {
  __m256i q;
  if constexpr (kBits == 8) {
    q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    uint32_t w = 0;
    std::memcpy(&w, p, kBits);
    q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), CodeShifts<kBits>()),
        _mm256_set1_epi32((1 << kBits) - 1));
  }
  return _mm256_cvtepi32_ps(q);
}

// Writes the codes of 8 elements (each in [0, 2^kBits)) as kBits bytes at p.
template <int kBits>
KVPOOL_AVX2 inline void Pack8(__m256i q, uint8_t* p) {
  if constexpr (kBits == 8) {
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  } else {
    const __m256i v = _mm256_sllv_epi32(q, CodeShifts<kBits>());  // disjoint bits
    __m128i x = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_or_si128(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_or_si128(x, _mm_shuffle_epi32(x, 0xb1));
    const uint32_t w = static_cast<uint32_t>(_mm_cvtsi128_si32(x));
    std::memcpy(p, &w, kBits);
  }
}

// The divisor the vector code quantises with: a zero scale becomes +inf, so that the finite
// (x - m) / inf is +-0 and the code 0, as the reference's s == 0 rule gives.
float Divisor(float s) { return s == 0 ? std::numeric_limits<float>::infinity() : s; }
KVPOOL_AVX2 inline __m256 Divisor8(__m256 s) {
  const __m256 zero = _mm256_setzero_ps();
  return _mm256_blendv_ps(s, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                          _mm256_cmp_ps(s, zero, _CMP_EQ_OQ));
}

// Quantize() on 8 lanes, with d = Divisor8(s). REQUIRES: x - m finite.
KVPOOL_AVX2 inline __m256i Quantize8(__m256 x, __m256 d, __m256 m, __m256 levels) {
  const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, m), d),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), levels));
}

// Writes the codes of 32 elements (q[i] holds elements 8i..8i+7, each in [0, 2^kBits)) as
// 4 * kBits bytes at p: bytes in element order first, then nibbles or 2-bit fields merged.
template <int kBits>
KVPOOL_AVX2 inline void Pack32(const __m256i* q, uint8_t* p) {
  // packus works within 128-bit lanes: dword j of `bytes` holds elements of q[j % 4], half j / 4.
  const __m256i bytes =
      _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, order);
  if constexpr (kBits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), ordered);
  } else if constexpr (kBits == 4) {
    const __m256i pairs = _mm256_maddubs_epi16(ordered, _mm256_set1_epi16(0x1001));  // lo + 16 hi
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  } else {
    const __m256i pairs = _mm256_maddubs_epi16(ordered, _mm256_set1_epi16(0x0401));  // a + 4 b
    const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x00100001));   // + 16 c
    __m256i x = _mm256_packus_epi32(quads, quads);
    x = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(x, x), order);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(x));
  }
}

// Codes of the 32 elements at x into p (kBits * 4 bytes); d[i], m[i] for elements 8i..8i+7.
template <int kBits, bool kBf16>
KVPOOL_AVX2 inline void Quantize32(const uint16_t* x, const __m256* d, const __m256* m,
                                   __m256 levels, uint8_t* p) {
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = Quantize8(Load8<kBf16>(x + 8 * i), d[i], m[i], levels);
  Pack32<kBits>(q, p);
}


template <bool kMax>
KVPOOL_AVX2 inline __m256 MinOrMax(__m256 a, __m256 b) {
  if constexpr (kMax) {
    return _mm256_max_ps(a, b);
  } else {
    return _mm256_min_ps(a, b);
  }
}

// Lane j of the result is the minimum (kMax: maximum) of the 8 lanes of v[j].
template <bool kMax>
KVPOOL_AVX2 inline __m256 Reduce8x8(const __m256* v) {
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i) {  // per 128-bit half: [a02 b02 a13 b13] for a, b = v[2i], v[2i+1]
    t[i] = MinOrMax<kMax>(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {  // per half: v[4i..4i+3] each reduced over that half
    u[i] = MinOrMax<kMax>(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return MinOrMax<kMax>(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                        _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

// All-ones in each of the 16 fp16 words of h that has an all-ones exponent (inf or NaN).
KVPOOL_AVX2 inline __m256i NonFinite16(__m256i h) {
  const __m256i exp = _mm256_set1_epi16(0x7c00);
  return _mm256_cmpeq_epi16(_mm256_and_si256(h, exp), exp);
}

// ---- Values: one group (elements [e0, e0 + n) of one row), scale/minimum index g.

template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeValueGroup(const uint16_t* in, uint64_t e0, uint64_t n, uint64_t g,
                                  const Layout& l, uint8_t* out) {
  constexpr uint32_t kLevels = (1u << kBits) - 1;
  __m256 vlo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vhi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = Load8<kBf16>(in + e0 + i);
    vlo = _mm256_min_ps(x, vlo);
    vhi = _mm256_max_ps(x, vhi);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  float lo = HMin(vlo), hi = HMax(vhi);
  bool bad = !_mm256_testz_ps(nan, nan);
  for (; i < n; ++i) {
    const float x = ToFloat<kBf16>(in[e0 + i]);
    bad |= std::isnan(x);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  lo += 0.0f;
  hi += 0.0f;
  const uint16_t sh = _cvtss_sh((hi - lo) / static_cast<float>(kLevels), _MM_FROUND_TO_NEAREST_INT);
  const uint16_t mh = _cvtss_sh(lo, _MM_FROUND_TO_NEAREST_INT);
  if (bad || (sh & 0x7c00) == 0x7c00 || (mh & 0x7c00) == 0x7c00) return false;
  std::memcpy(out + 2 * g, &sh, 2);
  std::memcpy(out + 2 * (l.groups + g), &mh, 2);
  const float s = _cvtsh_ss(sh), m = _cvtsh_ss(mh);
  uint8_t* codes = out + l.codes_offset;
  uint64_t e = e0;
  const uint64_t end = e0 + n;
  for (; e < end && e % 8 != 0; ++e) {
    SetCode<kBits>(codes, e, Quantize(ToFloat<kBf16>(in[e]), s, m, kLevels));
  }
  const __m256 vd = _mm256_set1_ps(Divisor(s)), vm = _mm256_set1_ps(m);
  const __m256 levels = _mm256_set1_ps(static_cast<float>(kLevels));
  const __m256 d4[4] = {vd, vd, vd, vd}, m4[4] = {vm, vm, vm, vm};
  for (; e + 32 <= end; e += 32)
    Quantize32<kBits, kBf16>(in + e, d4, m4, levels, codes + e / 8 * kBits);
  for (; e + 8 <= end; e += 8) {
    Pack8<kBits>(Quantize8(Load8<kBf16>(in + e), vd, vm, levels), codes + e / 8 * kBits);
  }
  for (; e < end; ++e) SetCode<kBits>(codes, e, Quantize(ToFloat<kBf16>(in[e]), s, m, kLevels));
  return true;
}

// Eight whole groups g0..g0+7 of G elements each, group g being elements [g*G, g*G + G)
// (values with G % 8 == 0 and D % G == 0): the minimums and maximums of the eight are reduced
// together and their scales and minimums converted together.
template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeValueGroups8(const uint16_t* in, uint64_t g0, uint32_t group,
                                    const Layout& l, uint8_t* out) {
  constexpr uint32_t kLevels = (1u << kBits) - 1;
  const __m256 zero = _mm256_setzero_ps(), levels = _mm256_set1_ps(static_cast<float>(kLevels));
  __m256 vlo[8], vhi[8], nan = zero;
  for (int j = 0; j < 8; ++j) {
    const uint16_t* x = in + (g0 + j) * group;
    vlo[j] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    vhi[j] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (uint32_t i = 0; i < group; i += 8) {
      const __m256 v = Load8<kBf16>(x + i);
      vlo[j] = _mm256_min_ps(v, vlo[j]);
      vhi[j] = _mm256_max_ps(v, vhi[j]);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  }
  const __m256 lo = _mm256_add_ps(Reduce8x8<false>(vlo), zero);
  const __m256 hi = _mm256_add_ps(Reduce8x8<true>(vhi), zero);
  const __m128i sh =
      _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(hi, lo), levels), _MM_FROUND_TO_NEAREST_INT);
  const __m128i mh = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
  const __m256i bad = NonFinite16(_mm256_set_m128i(sh, mh));
  if (!_mm256_testz_ps(nan, nan) || !_mm256_testz_si256(bad, bad)) return false;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * g0), sh);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * (l.groups + g0)), mh);
  alignas(32) float d[8], m[8];
  _mm256_store_ps(d, Divisor8(_mm256_cvtph_ps(sh)));
  _mm256_store_ps(m, _mm256_cvtph_ps(mh));
  uint8_t* codes = out + l.codes_offset;
  for (int j = 0; j < 8; ++j) {
    const __m256 vd = _mm256_broadcast_ss(d + j), vm = _mm256_broadcast_ss(m + j);
    const __m256 d4[4] = {vd, vd, vd, vd}, m4[4] = {vm, vm, vm, vm};
    const uint64_t e0 = (g0 + j) * group;
    uint32_t i = 0;
    for (; i + 32 <= group; i += 32) {
      Quantize32<kBits, kBf16>(in + e0 + i, d4, m4, levels, codes + (e0 + i) / 8 * kBits);
    }
    for (; i < group; i += 8) {
      Pack8<kBits>(Quantize8(Load8<kBf16>(in + e0 + i), vd, vm, levels),
                   codes + (e0 + i) / 8 * kBits);
    }
  }
  return true;
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeValueGroup(const uint8_t* codes, uint64_t e, uint64_t end, float s, float m,
                                  uint16_t* out) {
  for (; e < end && e % 8 != 0; ++e) out[e] = DecodeOne<kBf16>(GetCode<kBits>(codes, e), s, m);
  const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
  for (; e + 8 <= end; e += 8) {
    const __m256 x = _mm256_mul_ps(Codes8<kBits>(codes + e / 8 * kBits), vs);
    Store8<kBf16>(out + e, _mm256_add_ps(x, vm));
  }
  for (; e < end; ++e) out[e] = DecodeOne<kBf16>(GetCode<kBits>(codes, e), s, m);
}

// Decodes eight whole groups g0..g0+7 laid out as in EncodeValueGroups8.
template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeValueGroups8(const uint8_t* payload, uint64_t g0, uint32_t group,
                                    const Layout& l, uint16_t* out) {
  alignas(32) float s[8], m[8];
  _mm256_store_ps(
      s, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + 2 * g0))));
  _mm256_store_ps(m, _mm256_cvtph_ps(_mm_loadu_si128(
                         reinterpret_cast<const __m128i*>(payload + 2 * (l.groups + g0)))));
  const uint8_t* codes = payload + l.codes_offset;
  for (int j = 0; j < 8; ++j) {
    const __m256 vs = _mm256_broadcast_ss(s + j), vm = _mm256_broadcast_ss(m + j);
    for (uint64_t e = (g0 + j) * group, end = e + group; e < end; e += 8) {
      const __m256 x = _mm256_mul_ps(Codes8<kBits>(codes + e / 8 * kBits), vs);
      Store8<kBf16>(out + e, _mm256_add_ps(x, vm));
    }
  }
}

// ---- Keys: one row of C channels, elements [e, e + C), per-channel scale/minimum sf/mf
// (when encoding, sf holds the divisors: Divisor(scale)).

template <int kBits, bool kBf16>
KVPOOL_AVX2 void EncodeKeyRow(const uint16_t* in, uint64_t e, uint64_t channels, const float* sf,
                              const float* mf, uint8_t* codes) {
  constexpr uint32_t kLevels = (1u << kBits) - 1;
  const uint64_t row = e, end = e + channels;
  for (; e < end && e % 8 != 0; ++e) {
    SetCode<kBits>(codes, e, Quantize(ToFloat<kBf16>(in[e]), sf[e - row], mf[e - row], kLevels));
  }
  const __m256 levels = _mm256_set1_ps(static_cast<float>(kLevels));
  for (; e + 32 <= end; e += 32) {
    __m256 d[4], m[4];
    for (int i = 0; i < 4; ++i) {
      d[i] = _mm256_loadu_ps(sf + (e - row) + 8 * i);
      m[i] = _mm256_loadu_ps(mf + (e - row) + 8 * i);
    }
    Quantize32<kBits, kBf16>(in + e, d, m, levels, codes + e / 8 * kBits);
  }
  for (; e + 8 <= end; e += 8) {
    const __m256 d = _mm256_loadu_ps(sf + (e - row)), m = _mm256_loadu_ps(mf + (e - row));
    Pack8<kBits>(Quantize8(Load8<kBf16>(in + e), d, m, levels), codes + e / 8 * kBits);
  }
  for (; e < end; ++e) {
    SetCode<kBits>(codes, e, Quantize(ToFloat<kBf16>(in[e]), sf[e - row], mf[e - row], kLevels));
  }
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeKeyRow(const uint8_t* codes, uint64_t e, uint64_t channels, const float* sf,
                              const float* mf, uint16_t* out) {
  const uint64_t row = e, end = e + channels;
  for (; e < end && e % 8 != 0; ++e) {
    out[e] = DecodeOne<kBf16>(GetCode<kBits>(codes, e), sf[e - row], mf[e - row]);
  }
  for (; e + 8 <= end; e += 8) {
    const __m256 s = _mm256_loadu_ps(sf + (e - row)), m = _mm256_loadu_ps(mf + (e - row));
    Store8<kBf16>(out + e,
                  _mm256_add_ps(_mm256_mul_ps(Codes8<kBits>(codes + e / 8 * kBits), s), m));
  }
  for (; e < end; ++e) {
    out[e] = DecodeOne<kBf16>(GetCode<kBits>(codes, e), sf[e - row], mf[e - row]);
  }
}

// Per-channel minimum and maximum of 8 * kVecs channels at p over `rows` rows `stride`
// elements apart, kept in registers, then stored to lo/hi; false on a NaN.
template <bool kBf16, int kVecs>
KVPOOL_AVX2 inline bool KeyTile(const uint16_t* p, uint64_t rows, uint64_t stride, float* lo,
                                float* hi) {
  __m256 vlo[kVecs], vhi[kVecs];
  __m256 nan = _mm256_setzero_ps();
  for (int i = 0; i < kVecs; ++i) {
    vlo[i] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    vhi[i] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  }
  for (uint64_t r = 0; r < rows; ++r, p += stride) {
    for (int i = 0; i < kVecs; ++i) {
      const __m256 x = Load8<kBf16>(p + 8 * i);
      vlo[i] = _mm256_min_ps(x, vlo[i]);
      vhi[i] = _mm256_max_ps(x, vhi[i]);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
  }
  for (int i = 0; i < kVecs; ++i) {
    _mm256_storeu_ps(lo + 8 * i, vlo[i]);
    _mm256_storeu_ps(hi + 8 * i, vhi[i]);
  }
  return _mm256_testz_ps(nan, nan);
}

// Per-channel minimum and maximum of rows [t0, t0 + rows) into lo/hi; false on a NaN.
template <bool kBf16>
KVPOOL_AVX2 bool KeyMinMax(const uint16_t* in, uint64_t t0, uint64_t rows, uint64_t channels,
                           float* lo, float* hi) {
  const uint16_t* block = in + t0 * channels;
  bool ok = true;
  uint64_t c = 0;
  for (; c + 32 <= channels; c += 32) {
    ok &= KeyTile<kBf16, 4>(block + c, rows, channels, lo + c, hi + c);
  }
  for (; c + 8 <= channels; c += 8) {
    ok &= KeyTile<kBf16, 1>(block + c, rows, channels, lo + c, hi + c);
  }
  for (; c < channels; ++c) {
    lo[c] = std::numeric_limits<float>::infinity();
    hi[c] = -std::numeric_limits<float>::infinity();
    for (uint64_t r = 0; r < rows; ++r) {
      const float x = ToFloat<kBf16>(block[r * channels + c]);
      ok &= !std::isnan(x);
      lo[c] = x < lo[c] ? x : lo[c];
      hi[c] = x > hi[c] ? x : hi[c];
    }
  }
  return ok;
}

// Scales and minimums of token group tb (channels' lo/hi in, fp16 to the payload, the divisors
// and minimums as floats to sf/mf); false when one is not finite.
template <int kBits>
KVPOOL_AVX2 bool KeyScales(const float* lo, const float* hi, uint64_t channels, uint64_t g0,
                           const Layout& l, uint8_t* out, float* sf, float* mf) {
  constexpr uint32_t kLevels = (1u << kBits) - 1;
  const __m256 zero = _mm256_setzero_ps(), levels = _mm256_set1_ps(static_cast<float>(kLevels));
  __m256i bad = _mm256_setzero_si256();
  uint64_t c = 0;
  for (; c + 8 <= channels; c += 8) {
    const __m256 vlo = _mm256_add_ps(_mm256_loadu_ps(lo + c), zero);
    const __m256 vhi = _mm256_add_ps(_mm256_loadu_ps(hi + c), zero);
    const __m128i sh =
        _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(vhi, vlo), levels), _MM_FROUND_TO_NEAREST_INT);
    const __m128i mh = _mm256_cvtps_ph(vlo, _MM_FROUND_TO_NEAREST_INT);
    bad = _mm256_or_si256(bad, NonFinite16(_mm256_set_m128i(sh, mh)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * (g0 + c)), sh);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * (l.groups + g0 + c)), mh);
    _mm256_storeu_ps(sf + c, Divisor8(_mm256_cvtph_ps(sh)));
    _mm256_storeu_ps(mf + c, _mm256_cvtph_ps(mh));
  }
  bool bad_tail = false;
  for (; c < channels; ++c) {
    const float vlo = lo[c] + 0.0f, vhi = hi[c] + 0.0f;
    const uint16_t sh =
        _cvtss_sh((vhi - vlo) / static_cast<float>(kLevels), _MM_FROUND_TO_NEAREST_INT);
    const uint16_t mh = _cvtss_sh(vlo, _MM_FROUND_TO_NEAREST_INT);
    bad_tail |= (sh & 0x7c00) == 0x7c00 || (mh & 0x7c00) == 0x7c00;
    std::memcpy(out + 2 * (g0 + c), &sh, 2);
    std::memcpy(out + 2 * (l.groups + g0 + c), &mh, 2);
    sf[c] = Divisor(_cvtsh_ss(sh));
    mf[c] = _cvtsh_ss(mh);
  }
  return !bad_tail && _mm256_testz_si256(bad, bad);
}

// ---- Whole segments.

// Token group [t0, t0 + rows) of keys with H*D % 32 == 0, 32 channels at a time, so that a
// tile's elements are still in L1 when they are quantised.
template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeKeyTiles(const uint16_t* in, uint64_t t0, uint64_t rows, uint64_t channels,
                                uint64_t g0, const Layout& l, uint8_t* out) {
  const __m256 levels = _mm256_set1_ps(static_cast<float>((1u << kBits) - 1));
  uint8_t* codes = out + l.codes_offset;
  alignas(32) float lo[32], hi[32], d[32], m[32];
  for (uint64_t c = 0; c < channels; c += 32) {
    if (!KeyTile<kBf16, 4>(in + t0 * channels + c, rows, channels, lo, hi)) return false;
    if (!KeyScales<kBits>(lo, hi, 32, g0 + c, l, out, d, m)) return false;
    __m256 vd[4], vm[4];
    for (int i = 0; i < 4; ++i) {
      vd[i] = _mm256_load_ps(d + 8 * i);
      vm[i] = _mm256_load_ps(m + 8 * i);
    }
    for (uint64_t e = t0 * channels + c, r = 0; r < rows; ++r, e += channels) {
      Quantize32<kBits, kBf16>(in + e, vd, vm, levels, codes + e / 8 * kBits);
    }
  }
  return true;
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeKeys(const SegmentShape& shape, uint32_t group, const Layout& l,
                            const uint16_t* in, uint8_t* out) {
  const uint64_t channels = uint64_t{shape.kv_heads} * shape.head_dim;
  std::vector<float> scratch(channels % 32 == 0 ? 0 : 4 * channels);  // the untiled path's
  float* lo = scratch.data();
  float* hi = lo + channels;
  float* sf = hi + channels;
  float* mf = sf + channels;
  for (uint64_t t0 = 0, tb = 0; t0 < shape.tokens; t0 += group, ++tb) {
    const uint64_t rows = std::min<uint64_t>(group, shape.tokens - t0);
    if (channels % 32 == 0) {
      if (!EncodeKeyTiles<kBits, kBf16>(in, t0, rows, channels, tb * channels, l, out)) {
        return false;
      }
      continue;
    }
    if (!KeyMinMax<kBf16>(in, t0, rows, channels, lo, hi)) return false;
    if (!KeyScales<kBits>(lo, hi, channels, tb * channels, l, out, sf, mf)) return false;
    for (uint64_t t = t0; t < t0 + rows; ++t) {
      EncodeKeyRow<kBits, kBf16>(in, t * channels, channels, sf, mf, out + l.codes_offset);
    }
  }
  return true;
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeKeys(const SegmentShape& shape, uint32_t group, const Layout& l,
                            const uint8_t* payload, uint16_t* out) {
  const uint64_t channels = uint64_t{shape.kv_heads} * shape.head_dim;
  std::vector<float> scratch(2 * channels);
  float* sf = scratch.data();
  float* mf = sf + channels;
  for (uint64_t t0 = 0, tb = 0; t0 < shape.tokens; t0 += group, ++tb) {
    const uint8_t* sh = payload + 2 * tb * channels;
    const uint8_t* mh = payload + 2 * (l.groups + tb * channels);
    uint64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      _mm256_storeu_ps(
          sf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sh + 2 * c))));
      _mm256_storeu_ps(
          mf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mh + 2 * c))));
    }
    for (; c < channels; ++c) {
      sf[c] = _cvtsh_ss(Load16(sh + 2 * c));
      mf[c] = _cvtsh_ss(Load16(mh + 2 * c));
    }
    const uint64_t t1 = std::min<uint64_t>(shape.tokens, t0 + group);
    for (uint64_t t = t0; t < t1; ++t) {
      DecodeKeyRow<kBits, kBf16>(payload + l.codes_offset, t * channels, channels, sf, mf, out);
    }
  }
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeValues(const SegmentShape& shape, uint32_t group, const Layout& l,
                              const uint16_t* in, uint8_t* out) {
  const uint64_t rows = uint64_t{shape.tokens} * shape.kv_heads, dim = shape.head_dim;
  if (group % 8 == 0 && dim % group == 0) {  // every group whole and 8-aligned
    uint64_t g = 0;
    for (; g + 8 <= l.groups; g += 8) {
      if (!EncodeValueGroups8<kBits, kBf16>(in, g, group, l, out)) return false;
    }
    for (; g < l.groups; ++g) {
      if (!EncodeValueGroup<kBits, kBf16>(in, g * group, group, g, l, out)) return false;
    }
    return true;
  }
  uint64_t g = 0;
  for (uint64_t r = 0; r < rows; ++r) {
    for (uint64_t d0 = 0; d0 < dim; d0 += group, ++g) {
      const uint64_t n = std::min<uint64_t>(group, dim - d0);
      if (!EncodeValueGroup<kBits, kBf16>(in, r * dim + d0, n, g, l, out)) return false;
    }
  }
  return true;
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeValues(const SegmentShape& shape, uint32_t group, const Layout& l,
                              const uint8_t* payload, uint16_t* out) {
  const uint64_t rows = uint64_t{shape.tokens} * shape.kv_heads, dim = shape.head_dim;
  uint64_t g = 0;
  if (group % 8 == 0 && dim % group == 0) {  // every group whole and 8-aligned
    for (; g + 8 <= l.groups; g += 8) DecodeValueGroups8<kBits, kBf16>(payload, g, group, l, out);
    for (; g < l.groups; ++g) {
      const float s = _cvtsh_ss(Load16(payload + 2 * g));
      const float m = _cvtsh_ss(Load16(payload + 2 * (l.groups + g)));
      DecodeValueGroup<kBits, kBf16>(payload + l.codes_offset, g * group, (g + 1) * group, s, m,
                                     out);
    }
    return;
  }
  for (uint64_t r = 0; r < rows; ++r) {
    for (uint64_t d0 = 0; d0 < dim; d0 += group, ++g) {
      const uint64_t e = r * dim + d0, n = std::min<uint64_t>(group, dim - d0);
      const float s = _cvtsh_ss(Load16(payload + 2 * g));
      const float m = _cvtsh_ss(Load16(payload + 2 * (l.groups + g)));
      DecodeValueGroup<kBits, kBf16>(payload + l.codes_offset, e, e + n, s, m, out);
    }
  }
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 bool EncodeAvx2(const SegmentShape& shape, uint32_t group, const Layout& l,
                            const uint16_t* in, uint8_t* out) {
  // Zero what no element writes: the padding after the minimums and the last code byte's
  // unused bits (whole-chunk stores and scalar stores both leave other bits alone).
  std::memset(out + 4 * l.groups, 0, l.codes_offset - 4 * l.groups);
  if (shape.Elements() * kBits % 8 != 0) out[l.size - 1] = 0;
  return shape.kind == SegmentKind::kKey ? EncodeKeys<kBits, kBf16>(shape, group, l, in, out)
                                         : EncodeValues<kBits, kBf16>(shape, group, l, in, out);
}

template <int kBits, bool kBf16>
KVPOOL_AVX2 void DecodeAvx2(const SegmentShape& shape, uint32_t group, const Layout& l,
                            const uint8_t* payload, uint16_t* out) {
  if (shape.kind == SegmentKind::kKey) {
    DecodeKeys<kBits, kBf16>(shape, group, l, payload, out);
  } else {
    DecodeValues<kBits, kBf16>(shape, group, l, payload, out);
  }
}

// True when every scale and minimum (the first 4n bytes) is finite.
KVPOOL_AVX2 bool ScalesFinite(const uint8_t* payload, uint64_t groups) {
  const uint64_t words = 2 * groups;
  __m256i bad = _mm256_setzero_si256();
  uint64_t i = 0;
  for (; i + 16 <= words; i += 16) {
    bad = _mm256_or_si256(
        bad, NonFinite16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(payload + 2 * i))));
  }
  bool bad_tail = false;
  for (; i < words; ++i) bad_tail |= (Load16(payload + 2 * i) & 0x7c00) == 0x7c00;
  return !bad_tail && _mm256_testz_si256(bad, bad);
}

using EncodeFn = bool (*)(const SegmentShape&, uint32_t, const Layout&, const uint16_t*, uint8_t*);
using DecodeFn = void (*)(const SegmentShape&, uint32_t, const Layout&, const uint8_t*, uint16_t*);

// Index: (bits / 4) * 2 + bf16, bits 2 -> 0, 4 -> 1, 8 -> 2.
constexpr EncodeFn kEncoders[] = {
    &EncodeAvx2<2, false>, &EncodeAvx2<2, true>,  &EncodeAvx2<4, false>,
    &EncodeAvx2<4, true>,  &EncodeAvx2<8, false>, &EncodeAvx2<8, true>,
};
constexpr DecodeFn kDecoders[] = {
    &DecodeAvx2<2, false>, &DecodeAvx2<2, true>,  &DecodeAvx2<4, false>,
    &DecodeAvx2<4, true>,  &DecodeAvx2<8, false>, &DecodeAvx2<8, true>,
};

int KernelIndex(const SegmentShape& shape, const CodecParams& params) {
  return (params.bits / 4) * 2 + (shape.dtype == DType::kBf16 ? 1 : 0);
}


}  // namespace

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  if (!CpuHasAvx2() || !ValidParams(params)) return EncodeRef(shape, params, in, out, capacity);
  const Layout l = ComputeLayout(shape, params);
  if (capacity < l.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("kivi: output has ", capacity, " bytes, the payload needs ", l.size));
  }
  if (l.size == 0) return uint64_t{0};
  if (!kEncoders[KernelIndex(shape, params)](shape, params.group, l, in, out)) {
    return NotRepresentable();
  }
  return l.size;
}

absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params, const uint8_t* payload,
                       uint64_t size, uint16_t* out) {
  if (!CpuHasAvx2() || !ValidParams(params)) return DecodeRef(shape, params, payload, size, out);
  const Layout l = ComputeLayout(shape, params);
  if (size != l.size) {
    return absl::DataLossError(
        absl::StrCat("kivi payload is ", size, " bytes, the shape and parameters need ", l.size));
  }
  if (l.size == 0) return absl::OkStatus();
  if (!ScalesFinite(payload, l.groups)) {
    return absl::DataLossError("kivi payload has a non-finite scale or minimum");
  }
  kDecoders[KernelIndex(shape, params)](shape, params.group, l, payload, out);
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kivi
