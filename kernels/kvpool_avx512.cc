// The kvpool codec's fast profile on AVX-512 (F, BW, VL, VBMI, GFNI; kvpool_fast.cc defines
// it): the encoder's kernels and a decoder for mode 1 payloads without low-rank directions;
// and the default mode's (mode 3) reconstruction after its entropy streams (DecodeEntropyAvx512).
// Lanes are the 16 tokens of a pack: a 16 x 16 transpose of 16-bit elements turns 16 token
// rows of 16 columns into 16 packs and back, and a pack's bit planes are a 16 x 16 bit
// transpose (a byte permutation, GF(2) affine 8 x 8 bit transposes, a byte permutation).
// Float operations are the reference's, in its order; decoding is bit-identical to it.
// GCC 12 warns of its own intrinsics headers (their undefined-value helpers) once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernels/kvpool_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/codec.h"
#include "kernels/kvpool_fast_entry.h"
#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

// Bytes ahead of the current position that a stream (input rows, packed data) is prefetched:
// the hardware prefetcher of the machines measured (AMD EPYC under a hypervisor) did not keep
// up with either on its own.
constexpr int kPrefetchAhead = 1024;

// Permutation tables of the 16 x 16 transposes, built once.
struct Tables {
  __m256i gather;    // Planes (word b) -> four 8 x 8 bit blocks, rows reversed.
  __m256i scatter;   // Transposed blocks -> words (word i: token i).
  __m512i gather2;   // `gather` for two packs as _mm512_packs_epi32(a, b) lays them out.
  __m512i scatter2;  // `scatter` for both halves.
  __m512i word[6];   // 16 x 16 word transpose: 3 stages x 2 halves of vpermt2w indices.
};

KVPOOL_AVX512 Tables MakeTables() {
  Tables t;
  alignas(64) uint8_t g[32], s[32];
  for (int r = 0; r < 32; ++r) {
    // Byte i of qword q of `gather`: plane 7 - i (q = 0, 2) or 15 - i (q = 1, 3), its low
    // byte (tokens 0-7) for q < 2, its high byte (tokens 8-15) for q >= 2. The GF(2) affine
    // step with bytes 1 << k then makes byte k of each qword token k's 8 bits of those planes.
    const int q = r / 8, i = r % 8;
    const int plane = (q == 0 || q == 2) ? 7 - i : 15 - i;
    g[r] = uint8_t(2 * plane + (q >= 2 ? 1 : 0));
    // Word w of the result: (low byte, high byte) = bytes w % 8 of qwords (0, 1) for w < 8,
    // (2, 3) for w >= 8.
    const int w = r / 2, hi = r % 2;
    s[r] = uint8_t(((w < 8 ? 0 : 2) + hi) * 8 + w % 8);
  }
  t.gather = _mm256_load_si256(reinterpret_cast<const __m256i*>(g));
  t.scatter = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
  // packs_epi32(a, b): 128-bit lane k holds words a[4k .. 4k + 3], then b[4k .. 4k + 3].
  alignas(64) uint8_t g2[64], s2[64];
  for (int r = 0; r < 64; ++r) {
    const int pack = r / 32, word = g[r % 32] / 2, byte = g[r % 32] % 2;
    g2[r] = uint8_t(2 * (8 * (word / 4) + 4 * pack + word % 4) + byte);
    s2[r] = uint8_t(32 * pack + s[r % 32]);
  }
  t.gather2 = _mm512_load_si512(g2);
  t.scatter2 = _mm512_load_si512(s2);
  // Register j holds rows 2j, 2j+1 (position = row bit 0 * 16 + column). Stage st swaps
  // register bit 2 - st with position bit 3 - st; the last stage also swaps position bits 0
  // and 4, so that register j ends up with columns 2j, 2j+1 as rows.
  for (int st = 0; st < 3; ++st)
    for (int v = 0; v < 2; ++v) {
      alignas(64) uint16_t x[32];
      const int p = 3 - st;
      for (int ef = 0; ef < 32; ++ef) {
        int e = ef;
        if (st == 2) e = (ef & ~17) | ((ef & 1) << 4) | ((ef >> 4) & 1);
        const int src = (e >> p) & 1;
        x[ef] = uint16_t(src * 32 + ((e & ~(1 << p)) | (v << p)));
      }
      t.word[st * 2 + v] = _mm512_load_si512(x);
    }
  return t;
}

KVPOOL_AVX512 const Tables& Get() {
  static const Tables t = MakeTables();
  return t;
}

// 16 x 16 transpose of 16-bit elements: r[l] (16 words each) -> o[j] = rows 2j (low half) and
// 2j + 1 (high half) of the transpose.
KVPOOL_AVX512 inline void TransposeWords(const Tables& tb, const __m256i* r, __m512i* o) {
  __m512i z[8], y[8];
  for (int j = 0; j < 8; ++j)
    z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(r[2 * j]), r[2 * j + 1], 1);
  for (int st = 0; st < 3; ++st) {
    const int m = 4 >> st;
    for (int j = 0; j < 8; ++j) {
      y[j] = _mm512_permutex2var_epi16(z[j & ~m], tb.word[st * 2 + ((j & m) ? 1 : 0)], z[j | m]);
    }
    for (int j = 0; j < 8; ++j) z[j] = y[j];
  }
  for (int j = 0; j < 8; ++j) o[j] = z[j];
}

// 16 x 16 bit transpose: word b bit i -> word i bit b.
KVPOOL_AVX512 inline __m256i TransposeBits(const Tables& tb, __m256i v) {
  const __m256i id = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  v = _mm256_permutexvar_epi8(tb.gather, v);
  v = _mm256_gf2p8affine_epi64_epi8(id, v, 0);
  return _mm256_permutexvar_epi8(tb.scatter, v);
}

// TransposeBits of two packs laid out as _mm512_packs_epi32 leaves them: the first's planes in
// the low half, the second's in the high half.
KVPOOL_AVX512 inline __m512i TransposeBitsPair(const Tables& tb, __m512i v) {
  const __m512i id = _mm512_set1_epi64(int64_t(0x8040201008040201ull));
  v = _mm512_permutexvar_epi8(tb.gather2, v);
  v = _mm512_gf2p8affine_epi64_epi8(id, v, 0);
  return _mm512_permutexvar_epi8(tb.scatter2, v);
}

// The 16 token rows of columns c0 .. c0 + 15 (rows >= valid: 0) as 16 packs.
KVPOOL_AVX512 inline void LoadPacks(const Tables& tb, const uint16_t* in, uint64_t HD,
                                    uint32_t valid, __m512i* packs) {
  __m256i r[16];
  for (uint32_t i = 0; i < 16; ++i) {
    r[i] = i < valid ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i * HD))
                     : _mm256_setzero_si256();
  }
  TransposeWords(tb, r, packs);
}

KVPOOL_AVX512 inline __m256i Half(__m512i v, int hi) {
  return hi ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
}

// Adds rows t0 .. t1 - 1 of kBlock 16-column vectors from column c0 into sums / sq, carried in
// registers, prefetching the same lines `ahead` elements on; `top` keeps the largest
// magnitude bits seen.
template <bool kBf16, int kBlock>
KVPOOL_AVX512 inline void SumRows(const uint16_t* in, uint32_t t0, uint32_t t1, uint64_t HD,
                                  uint64_t c0, uint64_t ahead, float* sums, float* sq,
                                  __m256i* top) {
  const __m256i magnitude = _mm256_set1_epi16(0x7fff);
  __m512 s[kBlock], q[kBlock];
  for (int j = 0; j < kBlock; ++j) {
    s[j] = _mm512_loadu_ps(sums + c0 + 16 * j);
    q[j] = _mm512_loadu_ps(sq + c0 + 16 * j);
  }
  for (uint32_t t = t0; t < t1; ++t) {
    const uint16_t* row = in + t * HD + c0;
    for (int j = 0; j < kBlock; j += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(row + ahead + 16 * j), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kBlock; ++j) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * j));
      *top = _mm256_max_epu16(*top, _mm256_and_si256(h, magnitude));
      const __m512 x = ToFloats<kBf16>(h);
      s[j] = _mm512_add_ps(s[j], x);
      q[j] = _mm512_add_ps(q[j], _mm512_mul_ps(x, x));
    }
  }
  for (int j = 0; j < kBlock; ++j) {
    _mm512_storeu_ps(sums + c0 + 16 * j, s[j]);
    _mm512_storeu_ps(sq + c0 + 16 * j, q[j]);
  }
}

// The sampled groups' 16 rows (contiguous), and in each, blocks of 128 columns (4 cache lines
// a row), prefetched two sampled groups ahead; per column the reference's order over tokens.
// Not finite: every exponent bit set, i.e. (h & 0x7fff) >= the exponent mask, tracked as a
// running maximum.
template <bool kBf16>
KVPOOL_AVX512 bool StatsT(const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride, float* sums,
                          float* sq) {
  __m256i top = _mm256_setzero_si256();
  std::fill(sums, sums + HD, 0.f);
  std::fill(sq, sq + HD, 0.f);
  const uint64_t ahead = 2 * uint64_t{stride} * kPack * HD;
  for (uint32_t t0 = 0; t0 < T; t0 += stride * kPack) {
    const uint32_t t1 = std::min<uint32_t>(T, t0 + kPack);
    uint64_t c0 = 0;
    for (; c0 + 128 <= HD; c0 += 128) SumRows<kBf16, 8>(in, t0, t1, HD, c0, ahead, sums, sq, &top);
    for (; c0 < HD; c0 += 16) SumRows<kBf16, 1>(in, t0, t1, HD, c0, ahead, sums, sq, &top);
  }
  const __m256i exp = _mm256_set1_epi16(kBf16 ? 0x7f80 : 0x7c00);
  return _mm256_cmpge_epu16_mask(top, exp) == 0;
}

template <bool kBf16>
KVPOOL_AVX512 bool MeansT(const float* sums, uint32_t n, uint64_t HD, uint16_t* stored, float* m) {
  const __m512 count = _mm512_set1_ps(float(n)), inf = _mm512_set1_ps(INFINITY);
  for (uint64_t c = 0; c < HD; c += 16) {
    const __m512 mean = _mm512_div_ps(_mm512_loadu_ps(sums + c), count);
    // FromFloats rounds finite floats only (bf16 sums may overflow).
    if (_mm512_cmp_ps_mask(_mm512_abs_ps(mean), inf, _CMP_LT_OQ) != 0xffff) return false;
    const __m256i h = FromFloats<kBf16>(mean);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(stored + c), h);
    _mm512_storeu_ps(m + c, ToFloats<kBf16>(h));
  }
  return true;
}

// Tree16 of the lanes.
KVPOOL_AVX512 inline float Tree16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

template <bool kBf16>
KVPOOL_AVX512 void DistancesT(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                              const float* m, float* dist) {
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t t = 0; t < T; ++t)
    for (uint32_t h = 0; h < H; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (uint32_t d = 0; d < D; d += 16) {
        const __m256i e =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + t * HD + h * D + d));
        const __m512 v = _mm512_sub_ps(ToFloats<kBf16>(e), _mm512_loadu_ps(m + h * D + d));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
      }
      dist[uint64_t{t} * H + h] = Tree16(acc);
    }
}

template <bool kBf16>
KVPOOL_AVX512 uint64_t QuantizeT(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                                 const float* m, const float* steps, uint32_t stride, uint8_t* out,
                                 double* err, double* energy) {
  const Tables& tb = Get();
  const uint32_t G = Groups(T);
  const uint64_t HD = uint64_t{H} * D, packs = uint64_t{G} * HD;
  uint8_t* widths = out;
  uint8_t* data = out == nullptr ? nullptr : out + (packs + 1) / 2;
  const __m512 vmax = _mm512_set1_ps(kMaxCode);
  for (uint32_t g = 0; g < G; g += stride) {
    const uint32_t valid = std::min<uint32_t>(kPack, T - g * kPack);
    const __mmask16 keep = __mmask16((1u << valid) - 1);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    __m512 pow[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    __m512 qmax = _mm512_setzero_ps();
    for (uint32_t h = 0; h < H; ++h) {
      const __m512 s = _mm512_loadu_ps(steps + (uint64_t{g} * H + h) * kPack);
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), s);
      for (uint32_t d0 = 0; d0 < D; d0 += 16) {
        const uint64_t c0 = uint64_t{h} * D + d0;
        __m512i x16[8];
        LoadPacks(tb, in + uint64_t{g} * kPack * HD + c0, HD, valid, x16);
        uint64_t nibbles = 0;
#pragma GCC unroll 8
        for (uint32_t l = 0; l < 16; l += 2) {
          __m512i qi[2];
#pragma GCC unroll 2
          for (uint32_t k = 0; k < 2; ++k) {
            const __m512 x = ToFloats<kBf16>(Half(x16[l / 2], k));
            const __m512 mean = _mm512_set1_ps(m[c0 + l + k]);
            const __m512 q =
                _mm512_maskz_roundscale_ps(keep, _mm512_mul_ps(_mm512_sub_ps(x, mean), inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            qmax = _mm512_range_ps(qmax, q, 0x0b);  // max(|qmax|, |q|), NaN aside.
            const __m512 y =
                ToFloats<kBf16>(FromFloats<kBf16>(_mm512_add_ps(mean, _mm512_mul_ps(q, s))));
            const __m512 e = _mm512_maskz_sub_ps(keep, y, x);
            acc[(l + k) % 4] = _mm512_fmadd_ps(e, e, acc[(l + k) % 4]);
            pow[(l + k) % 4] = _mm512_fmadd_ps(x, x, pow[(l + k) % 4]);
            if (out != nullptr) qi[k] = _mm512_cvtps_epi32(q);
          }
          if (out == nullptr) continue;
          // Two packs at a time. Codes of a group that fails the kMaxCode check are garbage
          // (saturated) but stay within PackBound (<= 32 bytes a pack); the group then fails.
          const __m512i q16 = _mm512_packs_epi32(qi[0], qi[1]);
          const __m512i zz =
              _mm512_xor_si512(_mm512_slli_epi16(q16, 1), _mm512_srai_epi16(q16, 15));
          const __m512i planes = TransposeBitsPair(tb, zz);
          const uint32_t used = _mm512_test_epi16_mask(planes, planes);
          const uint32_t w0 = 32 - _lzcnt_u32(used & 0xffff), w1 = 32 - _lzcnt_u32(used >> 16);
          // All 32 bytes of each (planes >= w are zero; the next pack overwrites them):
          // PackBound leaves room for 32 bytes per pack.
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(data), _mm512_castsi512_si256(planes));
          data += 2 * w0;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(data),
                              _mm512_extracti64x4_epi64(planes, 1));
          data += 2 * w1;
          nibbles |= uint64_t(w0 | w1 << 4) << (4 * l);
        }
        if (out != nullptr) std::memcpy(widths + (uint64_t{g} * HD + c0) / 2, &nibbles, 8);
      }
    }
    // A NaN element gives a NaN code, which vrangeps does not carry into qmax, and a NaN
    // error, which the sum does.
    const float group_err =
        Tree16(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    if (_mm512_cmp_ps_mask(qmax, vmax, _CMP_NLE_UQ) != 0 || std::isnan(group_err)) {
      return kQuantizeFailed;
    }
    *err += double(group_err);
    *energy +=
        double(Tree16(_mm512_add_ps(_mm512_add_ps(pow[0], pow[1]), _mm512_add_ps(pow[2], pow[3]))));
  }
  return out == nullptr ? 0 : uint64_t(data - out);
}

template <bool kBf16>
KVPOOL_AVX512 void DecodeT(const SegmentShape& shape, const Parsed& parsed, const float* means,
                           const float* token_steps, uint16_t* out) {
  const Tables& tb = Get();
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim, G = Groups(T);
  const uint64_t HD = uint64_t{H} * D;
  const uint8_t* widths = parsed.res_widths;
  const uint8_t* data = parsed.res_data;
  // A pack's planes are read 32 bytes at a time and masked in registers, but for the packs
  // within 32 bytes of the payload's end (masked loads: slower, never past the end).
  const uint8_t* plain_end = parsed.end - 32;
  const __m512i lanes =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(int(H)));
  for (uint32_t g = 0; g < G; ++g) {
    const uint32_t valid = std::min<uint32_t>(kPack, T - g * kPack);
    const __mmask16 keep = __mmask16((1u << valid) - 1);
    for (uint32_t h = 0; h < H; ++h) {
      const __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, lanes,
                                                token_steps + uint64_t{g} * kPack * H + h, 4);
      for (uint32_t d0 = 0; d0 < D; d0 += 16) {
        const uint64_t c0 = uint64_t{h} * D + d0, k0 = uint64_t{g} * HD + c0;
        uint64_t nibbles;
        std::memcpy(&nibbles, widths + k0 / 2, 8);
        __m256i r[16];
        // A block of 16 packs takes 2 * sum(widths) <= 512 bytes, typically 128 - 256.
        for (int ahead = 0; ahead < 192; ahead += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(data) + kPrefetchAhead + ahead, _MM_HINT_T0);
        }
#pragma GCC unroll 16
        for (uint32_t l = 0; l < 16; ++l) {
          const uint32_t w = (nibbles >> (4 * l)) & 15;
          const __mmask16 used = __mmask16(_bzhi_u32(0xffff, w));
          const __m256i planes =
              data <= plain_end
                  ? _mm256_maskz_mov_epi16(
                        used, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data)))
                  : _mm256_maskz_loadu_epi16(used, data);
          data += 2 * w;
          const __m256i u = TransposeBits(tb, planes);
          const __m256i q = _mm256_xor_si256(
              _mm256_srli_epi16(u, 1),
              _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_and_si256(u, _mm256_set1_epi16(1))));
          const __m512 y =
              _mm512_add_ps(_mm512_set1_ps(means[c0 + l]),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(q)), s));
          r[l] = FromFloats<kBf16>(y);
        }
        __m512i rows[8];
        TransposeWords(tb, r, rows);
        uint16_t* o = out + uint64_t{g} * kPack * HD + c0;
        for (uint32_t i = 0; i < valid; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i * HD), Half(rows[i / 2], i & 1));
        }
      }
    }
  }
}

// The fast profile's AVX-512 kernels by dtype (FastEntries).
constexpr FastDtypeKernels kAvx512FastByDtype[2] = {
    {&StatsT<false>, &MeansT<false>, &DistancesT<false>, &QuantizeT<false>, &DecodeT<false>},
    {&StatsT<true>, &MeansT<true>, &DistancesT<true>, &QuantizeT<true>, &DecodeT<true>}};
using Avx512Fast = FastEntries<16, kAvx512FastByDtype>;

}  // namespace

const FastKernels& FastCpuKernels() {
  if (CpuHasAvx512()) return Avx512Fast::Kernels();
  return FastKernelsAvx2() != nullptr ? *FastKernelsAvx2() : FastRefKernels();
}

bool DecodePacksAvx512(const SegmentShape& shape, const Parsed& parsed, uint16_t* out) {
  return CpuHasAvx512() && Avx512Fast::DecodePacks(shape, parsed, out);
}

namespace {

// Stores 16 floats as the dtype (bit-identical to FromFloat: NaN lanes take it).
template <bool kBf16>
KVPOOL_AVX512 inline void Store16(__m512 y, uint16_t* out) {
  if (_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q) != 0) {
    alignas(64) float f[16];
    _mm512_store_ps(f, y);
    for (int l = 0; l < 16; ++l) out[l] = FromFloat(kBf16 ? DType::kBf16 : DType::kFp16, f[l]);
    return;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), FromFloats<kBf16>(y));
}

// out[t][h][d] = (means + sum_j coefficient_j * basis_j) + code * step, the reference's
// operations in its order, 16 channels at a time; token after token, so the codes and the
// output stream through once.
template <bool kBf16>
KVPOOL_AVX512 void ReconstructT(const SegmentShape& shape, const Parsed& parsed, const LowRank& lr,
                                const float* steps, const int32_t* codes, uint16_t* out) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t R = parsed.coef_cols;
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t t = 0; t < T; ++t) {
    const int32_t* row = codes + uint64_t{t} * HD;
    uint16_t* o = out + uint64_t{t} * HD;
    _mm_prefetch(reinterpret_cast<const char*>(row + 2 * HD), _MM_HINT_T0);
    for (uint32_t h = 0; h < H; ++h) {
      const uint32_t r = parsed.ranks[h];
      const float* coef = lr.coefficients.data() + uint64_t{t} * R + lr.first_col[h];
      const float* basis = lr.basis.data() + uint64_t{h} * kMaxRank * D;
      const __m512 step = _mm512_set1_ps(steps[uint64_t{t} * H + h]);
      for (uint32_t d0 = 0; d0 < D; d0 += 16) {
        const uint64_t c0 = uint64_t{h} * D + d0;
        __m512 p = _mm512_loadu_ps(lr.means.data() + c0);
        for (uint32_t j = 0; j < r; ++j) {
          p = _mm512_add_ps(p, _mm512_mul_ps(_mm512_set1_ps(coef[j]),
                                             _mm512_loadu_ps(basis + uint64_t{j} * D + d0)));
        }
        const __m512 q = _mm512_cvtepi32_ps(_mm512_loadu_si512(row + c0));
        Store16<kBf16>(_mm512_add_ps(p, _mm512_mul_ps(q, step)), o + c0);
      }
    }
  }
}

}  // namespace

absl::Status DecodeEntropyAvx512(const SegmentShape& shape, const Parsed& parsed, uint16_t* out) {
  if (!CpuHasAvx512() || parsed.mode != kModeEntropy || shape.head_dim % 16 != 0 ||
      shape.tokens == 0) {
    return absl::UnimplementedError("kvpool: payload does not take the AVX-512 decoder");
  }
  thread_local LowRank lr;
  thread_local std::vector<float> steps;
  // The residual codes, [tokens][kv_heads * head_dim]; every element is written by the stream
  // decoder before it is read, so the buffer is kept between calls and never cleared.
  thread_local std::unique_ptr<int32_t[]> codes;
  thread_local uint64_t capacity = 0;
  absl::Status s = DecodeLowRank(shape, parsed, &lr);
  if (!s.ok()) return s;
  const uint64_t n = shape.Elements();
  // Segments beyond 4 MiB of codes (e.g. 1024 tokens of 8 x 128) take a buffer of their own,
  // so that no thread holds more than that after a large one.
  constexpr uint64_t kKept = uint64_t{1} << 20;
  std::unique_ptr<int32_t[]> own;
  if (n > kKept) {
    own.reset(new int32_t[n]);
  } else if (capacity < n) {
    codes.reset(new int32_t[n]);
    capacity = n;
  }
  int32_t* c = n > kKept ? own.get() : codes.get();
  s = DecodeStream(parsed.res_stream, c, uint64_t{shape.kv_heads} * shape.head_dim);
  if (!s.ok()) return s;
  TokenSteps(shape, parsed, &steps);
  if (shape.dtype == DType::kBf16) {
    ReconstructT<true>(shape, parsed, lr, steps.data(), c, out);
  } else {
    ReconstructT<false>(shape, parsed, lr, steps.data(), c, out);
  }
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kvpool::internal
