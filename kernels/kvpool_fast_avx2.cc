// The kvpool codec's fast profile on AVX2 (with FMA and F16C), for CPUs without AVX-512: the
// encoder's kernels (kvpool_fast.cc defines them; kvpool_avx512.cc has the AVX-512 ones). The
// quantisation takes a token's 16 columns of a head at a time (two vectors of 8), so each
// token's error and energy chains run over its columns in the reference's order (c mod 4: one
// 4-lane chain per token, the low then the high half of each vector); a 16 x 16 transpose of
// the codes turns 16 tokens' rows into 16 packs, whose bit planes come two at a time from a
// saturating pack and a byte mask. Float operations are the reference's, in its order, so the
// payloads are the reference's byte for byte (tests). Thread-safe (stateless, or thread-local
// scratch).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/codec.h"
#include "kernels/kvpool_fast_entry.h"
#include "kernels/kvpool_format.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

using simd::FromFloats8;
using simd::Load8;
using simd::RoundTrip8;
using simd::Store8;
using simd::Tree16;

// The largest (h & 0x7fff) of 8 elements, kept as a running maximum: an element is not finite
// when its exponent bits are all set, i.e. when that reaches the dtype's exponent mask.
KVPOOL_AVX2 inline __m128i Magnitudes(const uint16_t* p, __m128i top) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_max_epu16(top, _mm_and_si128(h, _mm_set1_epi16(0x7fff)));
}

template <bool kBf16>
KVPOOL_AVX2 bool AllFinite(__m128i top) {
  const __m128i exp = _mm_set1_epi16(kBf16 ? 0x7f80 : 0x7c00);
  return _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_max_epu16(top, exp), top)) == 0;
}

// Columns c0 .. c0 + 8 * kBlock - 1 of rows t0 .. t1 - 1, carried in registers over the rows.
template <bool kBf16, int kBlock>
KVPOOL_AVX2 inline void SumRows(const uint16_t* in, uint32_t t0, uint32_t t1, uint64_t HD,
                                uint64_t c0, float* sums, float* sq, __m128i* top) {
  __m256 s[kBlock], q[kBlock];
  for (int j = 0; j < kBlock; ++j) {
    s[j] = _mm256_loadu_ps(sums + c0 + 8 * j);
    q[j] = _mm256_loadu_ps(sq + c0 + 8 * j);
  }
  for (uint32_t t = t0; t < t1; ++t) {
    const uint16_t* row = in + t * HD + c0;
    for (int j = 0; j < kBlock; ++j) {
      *top = Magnitudes(row + 8 * j, *top);
      const __m256 x = Load8<kBf16>(row + 8 * j);
      s[j] = _mm256_add_ps(s[j], x);
      q[j] = _mm256_add_ps(q[j], _mm256_mul_ps(x, x));
    }
  }
  for (int j = 0; j < kBlock; ++j) {
    _mm256_storeu_ps(sums + c0 + 8 * j, s[j]);
    _mm256_storeu_ps(sq + c0 + 8 * j, q[j]);
  }
}

template <bool kBf16>
KVPOOL_AVX2 bool StatsT(const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride, float* sums,
                        float* sq) {
  std::fill(sums, sums + HD, 0.f);
  std::fill(sq, sq + HD, 0.f);
  __m128i top = _mm_setzero_si128();
  for (uint32_t t0 = 0; t0 < T; t0 += stride * kPack) {
    const uint32_t t1 = std::min<uint32_t>(T, t0 + kPack);
    uint64_t c0 = 0;
    for (; c0 + 64 <= HD; c0 += 64) SumRows<kBf16, 8>(in, t0, t1, HD, c0, sums, sq, &top);
    for (; c0 < HD; c0 += 8) SumRows<kBf16, 1>(in, t0, t1, HD, c0, sums, sq, &top);
  }
  return AllFinite<kBf16>(top);
}

template <bool kBf16>
KVPOOL_AVX2 bool MeansT(const float* sums, uint32_t n, uint64_t HD, uint16_t* stored, float* m) {
  const __m256 count = _mm256_set1_ps(float(n)), inf = _mm256_set1_ps(INFINITY);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (uint64_t c = 0; c < HD; c += 8) {
    const __m256 mean = _mm256_div_ps(_mm256_loadu_ps(sums + c), count);
    // Store8 rounds finite floats only (bf16 sums may overflow).
    const __m256 finite = _mm256_cmp_ps(_mm256_and_ps(mean, magnitude), inf, _CMP_LT_OQ);
    if (_mm256_movemask_ps(finite) != 0xff) return false;
    Store8<kBf16>(stored + c, mean);
    _mm256_storeu_ps(m + c, Load8<kBf16>(stored + c));
  }
  return true;
}

template <bool kBf16>
KVPOOL_AVX2 void DistancesT(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D, const float* m,
                            float* dist) {
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t t = 0; t < T; ++t)
    for (uint32_t h = 0; h < H; ++h) {
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      const uint16_t* x = in + t * HD + h * D;
      const float* mh = m + h * D;
      for (uint32_t d = 0; d < D; d += 16) {
        const __m256 a = _mm256_sub_ps(Load8<kBf16>(x + d), _mm256_loadu_ps(mh + d));
        const __m256 b = _mm256_sub_ps(Load8<kBf16>(x + d + 8), _mm256_loadu_ps(mh + d + 8));
        lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
      }
      dist[uint64_t{t} * H + h] = Tree16(lo, hi);
    }
}

// 16 x 16 transpose of 16-bit elements: r[i] word j -> o[j] word i. Within 128-bit lanes the
// 8 x 8 blocks are transposed by three rounds of unpacks (rows 0-7 and 8-15 apart), then the
// lanes are exchanged.
KVPOOL_AVX2 inline void Transpose16(const __m256i* r, __m256i* o) {
  __m256i v[2][8];
  for (int half = 0; half < 2; ++half) {
    const __m256i* x = r + 8 * half;
    __m256i t[8], u[8];
    for (int k = 0; k < 4; ++k) {  // t[2k]: columns 0-3 (8-11) of rows 2k, 2k + 1; t[2k + 1]: 4-7.
      t[2 * k] = _mm256_unpacklo_epi16(x[2 * k], x[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_epi16(x[2 * k], x[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {  // u[4k + j]: columns 2j, 2j + 1 of rows 4k .. 4k + 3.
      u[4 * k + 0] = _mm256_unpacklo_epi32(t[4 * k], t[4 * k + 2]);
      u[4 * k + 1] = _mm256_unpackhi_epi32(t[4 * k], t[4 * k + 2]);
      u[4 * k + 2] = _mm256_unpacklo_epi32(t[4 * k + 1], t[4 * k + 3]);
      u[4 * k + 3] = _mm256_unpackhi_epi32(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int j = 0; j < 4; ++j) {  // v[half][c]: column c (low lane) and c + 8 (high lane).
      v[half][2 * j] = _mm256_unpacklo_epi64(u[j], u[4 + j]);
      v[half][2 * j + 1] = _mm256_unpackhi_epi64(u[j], u[4 + j]);
    }
  }
  for (int c = 0; c < 8; ++c) {
    o[c] = _mm256_permute2x128_si256(v[0][c], v[1][c], 0x20);
    o[c + 8] = _mm256_permute2x128_si256(v[0][c], v[1][c], 0x31);
  }
}

// Writes planes 0 .. w - 1 of a pack (word i: token i's code) as w 16-bit words (bit i: token
// i); two planes per store, so it may write one plane's zero word past them.
KVPOOL_AVX2 inline uint8_t* StorePlanes(__m256i pack, uint32_t w, uint8_t* data) {
  for (uint32_t b = 0; b < w; b += 2) {
    // Bit b (b + 1) of each word to its sign; the saturating pack keeps the sign in a byte.
    const __m256i lo = _mm256_sll_epi16(pack, _mm_cvtsi32_si128(int(15 - b)));
    const __m256i hi = _mm256_sll_epi16(pack, _mm_cvtsi32_si128(int(14 - b)));
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xd8);
    const uint32_t planes = uint32_t(_mm256_movemask_epi8(bytes));
    std::memcpy(data + 2 * b, &planes, 4);
  }
  return data + 2 * w;
}

// One token's 16 columns c0 .. c0 + 15 (means m0, m1; step s and its inverse): their codes,
// the decoded error e and the elements x (two vectors each); the largest |code| into qmax.
template <bool kBf16>
KVPOOL_AVX2 inline void QuantizeToken(const uint16_t* row, __m256 m0, __m256 m1, float s, float inv,
                                      __m256* qmax, __m256* e, __m256* x, __m256* q) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vi = _mm256_set1_ps(inv), vs = _mm256_set1_ps(s);
  x[0] = Load8<kBf16>(row);
  x[1] = Load8<kBf16>(row + 8);
  q[0] = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x[0], m0), vi),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q[1] = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x[1], m1), vi),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  *qmax = _mm256_max_ps(
      *qmax, _mm256_max_ps(_mm256_and_ps(q[0], magnitude), _mm256_and_ps(q[1], magnitude)));
  e[0] = _mm256_sub_ps(RoundTrip8<kBf16>(_mm256_add_ps(m0, _mm256_mul_ps(q[0], vs))), x[0]);
  e[1] = _mm256_sub_ps(RoundTrip8<kBf16>(_mm256_add_ps(m1, _mm256_mul_ps(q[1], vs))), x[1]);
}

// 16 codes (two vectors of integral floats) as ZigZag words in column order.
KVPOOL_AVX2 inline __m256i ZigZagWords(const __m256* q) {
  const __m256i z0 = _mm256_cvtps_epi32(q[0]), z1 = _mm256_cvtps_epi32(q[1]);
  const __m256i u0 = _mm256_xor_si256(_mm256_slli_epi32(z0, 1), _mm256_srai_epi32(z0, 31));
  const __m256i u1 = _mm256_xor_si256(_mm256_slli_epi32(z1, 1), _mm256_srai_epi32(z1, 31));
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(u0, u1), 0xd8);
}

// Two tokens' errors and elements of columns c0 + 0-3, 4-7, 8-11, 12-15 into their chains (lanes
// 0-3: the first token's a[c mod 4], 4-7: the second's), in column order.
KVPOOL_AVX2 inline void AddChains(const __m256 (*e)[2], const __m256 (*x)[2], __m256* acc,
                                  __m256* pow) {
  for (uint32_t v = 0; v < 2; ++v) {
    const __m256 elo = _mm256_permute2f128_ps(e[0][v], e[1][v], 0x20);
    const __m256 ehi = _mm256_permute2f128_ps(e[0][v], e[1][v], 0x31);
    const __m256 xlo = _mm256_permute2f128_ps(x[0][v], x[1][v], 0x20);
    const __m256 xhi = _mm256_permute2f128_ps(x[0][v], x[1][v], 0x31);
    *acc = _mm256_fmadd_ps(elo, elo, *acc);
    *acc = _mm256_fmadd_ps(ehi, ehi, *acc);
    *pow = _mm256_fmadd_ps(xlo, xlo, *pow);
    *pow = _mm256_fmadd_ps(xhi, xhi, *pow);
  }
}

// The 16 packs of a block (codes[i]: token i's 16 columns, zero past T; `all` their OR): widths
// as 16 nibbles at `widths`, planes from `data`; returns the end of the planes.
KVPOOL_AVX2 inline uint8_t* WritePacks(const __m256i* codes, __m256i all, uint8_t* widths,
                                       uint8_t* data) {
  __m256i pack[kPack];
  Transpose16(codes, pack);
  alignas(32) uint16_t ors[kPack];
  _mm256_store_si256(reinterpret_cast<__m256i*>(ors), all);
  uint64_t nibbles = 0;
  for (uint32_t j = 0; j < kPack; ++j) {
    const uint32_t w = ors[j] ? 32 - uint32_t(__builtin_clz(ors[j])) : 0;
    nibbles |= uint64_t(w) << (4 * j);
    data = StorePlanes(pack[j], w, data);
  }
  std::memcpy(widths, &nibbles, 8);
  return data;
}

// A group's error and energy from its chains: per token (a0 + a1) + (a2 + a3), then Tree16.
KVPOOL_AVX2 inline void GroupSums(const __m256* acc, const __m256* pow, float* err, float* energy) {
  alignas(32) float l[kPack], v[kPack];
  for (uint32_t k = 0; k < kPack / 2; ++k) {
    alignas(32) float a[8], p[8];
    _mm256_store_ps(a, acc[k]);
    _mm256_store_ps(p, pow[k]);
    for (uint32_t j = 0; j < 2; ++j) {
      l[2 * k + j] = (a[4 * j] + a[4 * j + 1]) + (a[4 * j + 2] + a[4 * j + 3]);
      v[2 * k + j] = (p[4 * j] + p[4 * j + 1]) + (p[4 * j + 2] + p[4 * j + 3]);
    }
  }
  *err = Tree16(_mm256_load_ps(l), _mm256_load_ps(l + 8));
  *energy = Tree16(_mm256_load_ps(v), _mm256_load_ps(v + 8));
}

template <bool kBf16>
KVPOOL_AVX2 uint64_t QuantizeT(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                               const float* m, const float* steps, uint32_t stride, uint8_t* out,
                               double* err, double* energy) {
  const uint32_t G = Groups(T);
  const uint64_t HD = uint64_t{H} * D, packs = uint64_t{G} * HD;
  uint8_t* data = out == nullptr ? nullptr : out + (packs + 1) / 2;
  for (uint32_t g = 0; g < G; g += stride) {
    const uint32_t valid = std::min<uint32_t>(kPack, T - g * kPack);
    __m256 acc[kPack / 2], pow[kPack / 2];  // Per token pair (AddChains).
    for (uint32_t k = 0; k < kPack / 2; ++k) acc[k] = pow[k] = _mm256_setzero_ps();
    __m256 qmax = _mm256_setzero_ps();  // Largest |code| (a NaN shows in the error instead).
    for (uint32_t h = 0; h < H; ++h) {
      float s[kPack], inv[kPack];
      for (uint32_t i = 0; i < valid; ++i) {
        s[i] = steps[(uint64_t{g} * H + h) * kPack + i];
        inv[i] = 1.f / s[i];
      }
      for (uint32_t d0 = 0; d0 < D; d0 += 16) {
        const uint64_t c0 = uint64_t{h} * D + d0;
        const __m256 m0 = _mm256_loadu_ps(m + c0), m1 = _mm256_loadu_ps(m + c0 + 8);
        __m256i codes[kPack], all = _mm256_setzero_si256();
        for (uint32_t i = 0; i < kPack; ++i) codes[i] = _mm256_setzero_si256();
        for (uint32_t i = 0; i < valid; i += 2) {  // A token pair (the second may be past T).
          __m256 e[2][2] = {}, x[2][2] = {}, q[2];  // Past T: no error, no energy, code 0.
          for (uint32_t j = 0; j < 2 && i + j < valid; ++j) {
            const uint16_t* row = in + (uint64_t{g} * kPack + i + j) * HD + c0;
            if ((d0 & 16) == 0 && g + stride < G) {  // The next group's line of this row.
              _mm_prefetch(reinterpret_cast<const char*>(row + uint64_t{stride} * kPack * HD),
                           _MM_HINT_T0);
            }
            QuantizeToken<kBf16>(row, m0, m1, s[i + j], inv[i + j], &qmax, e[j], x[j], q);
            if (out == nullptr) continue;
            codes[i + j] = ZigZagWords(q);  // A failing group's are garbage, within PackBound.
            all = _mm256_or_si256(all, codes[i + j]);
          }
          AddChains(e, x, &acc[i / 2], &pow[i / 2]);
        }
        if (out != nullptr) data = WritePacks(codes, all, out + (uint64_t{g} * HD + c0) / 2, data);
      }
    }
    float group_err, group_energy;
    GroupSums(acc, pow, &group_err, &group_energy);
    if (_mm256_movemask_ps(_mm256_cmp_ps(qmax, _mm256_set1_ps(kMaxCode), _CMP_GT_OQ)) != 0 ||
        std::isnan(group_err)) {
      return kQuantizeFailed;
    }
    *err += double(group_err);
    *energy += double(group_energy);
  }
  return out == nullptr ? 0 : uint64_t(data - out);
}

// Mode 1 without low-rank parts (the fast profile's payload): per group, head and 16 columns,
// each pack's planes to 16 codes (a plane's word broadcast and tested against each lane's
// bit), y = m + q * s per token lane as the reference computes it, and a 16 x 16 transpose
// back to token rows.
template <bool kBf16>
KVPOOL_AVX2 void DecodePacksT(const SegmentShape& shape, const Parsed& parsed, const float* means,
                              const float* token_steps, uint16_t* out) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim, G = Groups(T);
  const uint64_t HD = uint64_t{H} * D;
  const uint8_t* widths = parsed.res_widths;
  const uint8_t* data = parsed.res_data;
  const __m256i lane_bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                             4096, 8192, 16384, int16_t(0x8000));
  const __m256i one = _mm256_set1_epi16(1);
  for (uint32_t g = 0; g < G; ++g) {
    const uint32_t valid = std::min<uint32_t>(kPack, T - g * kPack);
    for (uint32_t h = 0; h < H; ++h) {
      alignas(32) float s[kPack];
      for (uint32_t i = 0; i < kPack; ++i) {
        s[i] = i < valid ? token_steps[(uint64_t{g} * kPack + i) * H + h] : 0.f;
      }
      const __m256 s0 = _mm256_load_ps(s), s1 = _mm256_load_ps(s + 8);
      for (uint32_t d0 = 0; d0 < D; d0 += 16) {
        const uint64_t c0 = uint64_t{h} * D + d0;
        uint64_t nibbles;
        std::memcpy(&nibbles, widths + (uint64_t{g} * HD + c0) / 2, 8);
        __m256i r[kPack];
        for (uint32_t l = 0; l < kPack; ++l) {
          const uint32_t w = (nibbles >> (4 * l)) & 15;
          __m256i u = _mm256_setzero_si256();
          for (uint32_t b = 0; b < w; ++b) {
            uint16_t plane;
            std::memcpy(&plane, data + 2 * b, 2);
            const __m256i set = _mm256_cmpeq_epi16(
                _mm256_and_si256(_mm256_set1_epi16(int16_t(plane)), lane_bit), lane_bit);
            u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_slli_epi16(one, int(b))));
          }
          data += 2 * w;
          const __m256i q =
              _mm256_xor_si256(_mm256_srli_epi16(u, 1),
                               _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_and_si256(u, one)));
          const __m256 m = _mm256_set1_ps(means[c0 + l]);
          const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q)));
          const __m256 q1 =
              _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(q, 1)));
          r[l] = _mm256_set_m128i(FromFloats8<kBf16>(_mm256_add_ps(m, _mm256_mul_ps(q1, s1))),
                                  FromFloats8<kBf16>(_mm256_add_ps(m, _mm256_mul_ps(q0, s0))));
        }
        __m256i rows[kPack];
        Transpose16(r, rows);
        uint16_t* o = out + uint64_t{g} * kPack * HD + c0;
        for (uint32_t i = 0; i < valid; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i * HD), rows[i]);
        }
      }
    }
  }
}

// The fast profile's AVX2 kernels by dtype (FastEntries).
constexpr FastDtypeKernels kAvx2FastByDtype[2] = {
    {&StatsT<false>, &MeansT<false>, &DistancesT<false>, &QuantizeT<false>, &DecodePacksT<false>},
    {&StatsT<true>, &MeansT<true>, &DistancesT<true>, &QuantizeT<true>, &DecodePacksT<true>}};
using Avx2Fast = FastEntries<8, kAvx2FastByDtype>;

}  // namespace

bool DecodePacksAvx2(const SegmentShape& shape, const Parsed& parsed, uint16_t* out) {
  return CpuHasAvx2() && Avx2Fast::DecodePacks(shape, parsed, out);
}

const FastKernels* FastKernelsAvx2() { return CpuHasAvx2() ? &Avx2Fast::Kernels() : nullptr; }

}  // namespace kvpool::kernels::kvpool::internal
