// The kvpool codec's payload mode 4 on AVX-512 (F, BW, VL, DQ, VBMI; kvpool_rows.cc defines the
// format and the reference kernels): the encoder's row kernels, for head_dim a multiple of 32 up
// to kMaxDim (the decoder is kvpool_rows_decode_avx512.cc). Float operations are the reference's,
// in its order (16 lanes d mod 16, channels in order, Tree16 to combine), so payloads and decoded
// values are bit-identical to the reference's. A row's 32 channels are one 32-bit word of each
// plane. GCC 12 warns of its own intrinsics headers (their undefined-value helpers) once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "kernels/kvpool_avx512.h"
#include "kernels/kvpool_rows.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr uint32_t kMaxDim = 512;  // Widest head the fast kernels take (stack buffers).

// Tree16 of the 16 lanes (l[i] = l[i] + l[i + k] for k = 8, 4, 2, 1).
KVPOOL_AVX512 inline float Tree16v(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

template <bool kBf16>
KVPOOL_AVX512 inline __m512 LoadFloats16(const uint16_t* p) {
  return ToFloats<kBf16>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <bool kBf16>
KVPOOL_AVX512 inline __m512 RoundTrip(__m512 y) {
  return ToFloats<kBf16>(FromFloats<kBf16>(y));
}

// Outlier lanes of channels 16k .. 16k + 15.
inline __mmask16 OutlierLanes(const RowHead& hd, uint32_t k) {
  return __mmask16(hd.outlier_masks[k / 2] >> (16 * (k & 1)));
}

// The Tree16 sums of 8 vectors at once (the same additions in the same order as Tree16v), left
// in the lanes of one vector: lane 4k the sum of v[k], lane 4k + 1 that of v[4 + k] (k < 4).
KVPOOL_AVX512 inline __m512 Tree16x8v(const __m512* v) {
  __m512 a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // l[i] + l[i + 8]: [v0 | v1], [v2 | v3], ...
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  }
  for (int i = 0; i < 2; ++i) {  // + l[i + 4]: 128-bit lanes [v0, v1, v2, v3], [v4 .. v7]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xdd));
  }
  // + l[i + 2]: lane j of 128-bit lane k: v_k (j < 2), v_{4+k} (j >= 2)
  const __m512 c =
      _mm512_add_ps(_mm512_shuffle_ps(b[0], b[1], 0x44), _mm512_shuffle_ps(b[0], b[1], 0xee));
  // + l[i + 1]: lane 0 of 128-bit lane k: v_k, lane 1: v_{4+k}
  return _mm512_add_ps(_mm512_shuffle_ps(c, c, 0x88), _mm512_shuffle_ps(c, c, 0xdd));
}

// out[j] = Tree16 of v[j], j < 8.
KVPOOL_AVX512 inline void Tree16x8(const __m512* v, float* out) {
  alignas(64) float f[16];
  _mm512_store_ps(f, Tree16x8v(v));
  for (int k = 0; k < 4; ++k) {
    out[k] = f[4 * k];
    out[4 + k] = f[4 * k + 1];
  }
}

// Projects N rows x[r] of one head (RowKernels::encode's projection), interleaved so that their
// dependency chains overlap: x as floats into xf[r * D ..], the prediction into
// zf[r * D ..], the coefficient codes into c[r * kMaxRank ..]. Non-finite elements show
// as a non-finite energy.
template <bool kBf16, uint32_t R, uint32_t N>
KVPOOL_AVX512 inline void ProjectCore(const RowHead& hd, const uint16_t* const* x, float* xf,
                                      float* zf, int16_t* c, RowStats* st) {
  const uint32_t D = hd.D, nv = D / 16;
  __m512 dot[N][8], dist[N], en[N];
#pragma GCC unroll 2
  for (uint32_t r = 0; r < N; ++r) {
    for (uint32_t j = 0; j < 8; ++j) dot[r][j] = _mm512_setzero_ps();
    dist[r] = en[r] = _mm512_setzero_ps();
  }
  for (uint32_t k = 0; k < nv; ++k) {
    const __m512 m = _mm512_loadu_ps(hd.means + 16 * k);
    const float* chunk = hd.chunks + 128 * k;
#pragma GCC unroll 2
    for (uint32_t r = 0; r < N; ++r) {
      const __m512 v = LoadFloats16<kBf16>(x[r] + 16 * k);
      _mm512_store_ps(xf + r * D + 16 * k, v);
      const __m512 xc = _mm512_sub_ps(v, m);
      for (uint32_t j = 0; j < R; ++j) {
        dot[r][j] = _mm512_fmadd_ps(xc, _mm512_load_ps(chunk + 16 * j), dot[r][j]);
      }
      dist[r] = _mm512_fmadd_ps(xc, xc, dist[r]);
      en[r] = _mm512_fmadd_ps(v, v, en[r]);
    }
  }
  __m512i bc[N][4];
  if constexpr (R > 0) {
    // The coefficient codes in vector lanes (no trip through memory): lane j = dot j.
    const __mmask16 live = __mmask16((1u << R) - 1);
    const __m512 inv = _mm512_maskz_loadu_ps(live, hd.inv_step);
    const __m512 lim = _mm512_set1_ps(float(kMaxCoefCode));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
#pragma GCC unroll 2
    for (uint32_t r = 0; r < N; ++r) {
      const __m512 sums = _mm512_permutexvar_ps(order, Tree16x8v(dot[r]));
      const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(sums, inv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 clamped =
          _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), q));
      const __m256i codes = _mm512_cvtepi32_epi16(_mm512_maskz_cvtps_epi32(live, clamped));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + r * kMaxRank), _mm256_castsi256_si128(codes));
      const __m512i wide = _mm512_castsi256_si512(codes);
      for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
        bc[r][i] = _mm512_permutexvar_epi32(_mm512_set1_epi32(int(i)), wide);
      }
    }
  }
  const __m512 scale = _mm512_set1_ps(hd.lr_scale);
  __m512 reg[N], out[N];
#pragma GCC unroll 2
  for (uint32_t r = 0; r < N; ++r) reg[r] = out[r] = _mm512_setzero_ps();
  for (uint32_t k = 0; k < nv; ++k) {
    const __m512 m = _mm512_loadu_ps(hd.means + 16 * k);
    const __mmask16 om = OutlierLanes(hd, k);
#pragma GCC unroll 2
    for (uint32_t r = 0; r < N; ++r) {
      __m512i P = _mm512_setzero_si512();
      for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
        P = _mm512_add_epi32(
            P, _mm512_madd_epi16(_mm512_load_si512(hd.pairs + 128 * k + 32 * i), bc[r][i]));
      }
      const __m512 zv = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(P), m);
      _mm512_storeu_ps(zf + r * D + 16 * k, zv);
      const __m512 res = _mm512_sub_ps(_mm512_load_ps(xf + r * D + 16 * k), zv);
      if (om == 0) {  // fma(0, 0, out) would leave out as it is.
        reg[r] = _mm512_fmadd_ps(res, res, reg[r]);
      } else {
        const __m512 rr = _mm512_maskz_mov_ps(__mmask16(~om), res);
        const __m512 ro = _mm512_maskz_mov_ps(om, res);
        reg[r] = _mm512_fmadd_ps(rr, rr, reg[r]);
        out[r] = _mm512_fmadd_ps(ro, ro, out[r]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  if constexpr (N == 2) {
    const __m512 v[8] = {dist[0], en[0], reg[0], out[0], dist[1], en[1], reg[1], out[1]};
    float sums[8];
    Tree16x8(v, sums);
    for (uint32_t r = 0; r < 2; ++r)
      st[r] = {sums[4 * r], sums[4 * r + 2], sums[4 * r + 3], sums[4 * r + 1]};
  } else {
    const __m512 v[8] = {dist[0], en[0], reg[0], out[0], zero, zero, zero, zero};
    float sums[8];
    Tree16x8(v, sums);
    st[0] = {sums[0], sums[2], sums[3], sums[1]};
  }
}

// The eight bit planes of 64 bytes (bit p of byte d), qword p holding plane p (bit d: bit p of
// byte d): the bytes reversed within each qword, a GF(2) affine map that transposes each 8x8 bit
// block (byte i of qword j: bit i of bytes 8j .. 8j + 7) and a byte transpose.
KVPOOL_AVX512 inline __m512i PlanesOf64(const uint8_t* bytes) {
  const __m512i reverse =
      _mm512_set_epi8(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                      14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4,
                      5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i select = _mm512_set1_epi64(int64_t(0x8040201008040201ull));
  const __m512i transpose = _mm512_set_epi8(
      63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29, 21, 13, 5,
      60, 52, 44, 36, 28, 20, 12, 4, 59, 51, 43, 35, 27, 19, 11, 3, 58, 50, 42, 34, 26, 18, 10, 2,
      57, 49, 41, 33, 25, 17, 9, 1, 56, 48, 40, 32, 24, 16, 8, 0);
  const __m512i x = _mm512_shuffle_epi8(_mm512_load_si512(bytes), reverse);
  return _mm512_permutexvar_epi8(transpose, _mm512_gf2p8affine_epi64_epi8(select, x, 0));
}

// A row's planes from .. from + 7 from its codes' bytes (`bytes`, channel d's code's low byte
// for planes 0 .. 7, its high byte for planes 8 .. 15), 64 channels at a time. All eight planes
// are stored whatever the row's b, so that the stores do not branch on it: those past the row's
// own are overwritten by what follows (RowKernels::encode's kRowStoreRoom).
KVPOOL_AVX512 inline void BytePlanes(const uint8_t* bytes, uint32_t D, uint32_t from,
                                     uint8_t* out) {
  const uint32_t pb = D / 8;
  uint8_t* dst = out + from * pb;
  if (D == 64) {  // Plane p: qword p.
    _mm512_storeu_si512(dst, PlanesOf64(bytes));
  } else if (D == 128) {  // Plane p: qword p of channels 0 .. 63, then of 64 .. 127.
    const __m512i a = PlanesOf64(bytes), b = PlanesOf64(bytes + 64);
    _mm512_storeu_si512(
        dst, _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), b));
    _mm512_storeu_si512(
        dst + 64, _mm512_permutex2var_epi64(a, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), b));
  } else {
    for (uint32_t g = 0; g < D; g += 64) {
      alignas(64) uint64_t q[8];
      _mm512_store_si512(q, PlanesOf64(bytes + g));
      const uint32_t n = std::min(8u, (D - g) / 8);  // Bytes of each plane from these channels.
      for (uint32_t p = 0; p < 8; ++p) std::memcpy(dst + p * pb + g / 8, &q[p], n);
    }
  }
}

// Quantises N projected rows (RowKernels::encode's quantisation) from their floats
// xf[r * D ..] and predictions zf[r * D ..], row r with meta[r] and half step hs[r],
// its planes at out[r]; err[r] its squared error. Vectors without outlier channels
// take a shorter path, and in rows without planes only the prediction's rounding is measured
// (n = 0: y = to_dtype(fma(hs, 0, z)), whose error equals to_dtype(z)'s, -0 and +0 alike).
// The codes' bytes go to a buffer from which BytePlanes takes the regular planes.
template <bool kBf16, uint32_t N>
KVPOOL_AVX512 inline void QuantizeCore(const RowHead& hd, const float* xf, const float* zf,
                                       const uint8_t* meta, const float* hs, uint8_t* const* out,
                                       float* err_out) {
  const uint32_t D = hd.D, nv = D / 16;
  uint32_t b[N], bo[N], seen = 0;
  alignas(64) uint8_t low[N][kMaxDim], high[N][kMaxDim];
  // The outlier channels' codes in channel order (kMaxOutliers, and room for a vector's store).
  alignas(64) uint32_t oc[N][kMaxOutliers + 16];
  __m512 vinv[N], vhs[N], half_r[N], top_r[N], half_o[N], top_o[N], err[N];
  const __m512 two = _mm512_set1_ps(2.f), zero = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (uint32_t r = 0; r < N; ++r) {
    b[r] = meta[r] & 15;
    bo[r] = hd.outliers ? b[r] + hd.extra : b[r];
    vinv[r] = _mm512_set1_ps(1.f / (2.f * hs[r]));
    vhs[r] = _mm512_set1_ps(hs[r]);
    half_r[r] = _mm512_set1_ps(b[r] ? float(1u << (b[r] - 1)) : 0.f);
    top_r[r] = _mm512_set1_ps(float((1u << b[r]) - 1));
    half_o[r] = _mm512_set1_ps(bo[r] ? float(1u << (bo[r] - 1)) : 0.f);
    top_o[r] = _mm512_set1_ps(float((1u << bo[r]) - 1));
    err[r] = zero;
  }
  for (uint32_t k = 0; k < nv; ++k) {
    const __mmask16 om = OutlierLanes(hd, k);
#pragma GCC unroll 2
    for (uint32_t r = 0; r < N; ++r) {
      const __m512 v = _mm512_load_ps(xf + r * D + 16 * k);
      const __m512 zv = _mm512_loadu_ps(zf + r * D + 16 * k);
      __m512 u;
      if (om == 0) {
        if (b[r] == 0) {  // Nothing to quantise: the prediction's rounding alone.
          const __m512 e = _mm512_sub_ps(RoundTrip<kBf16>(zv), v);
          err[r] = _mm512_fmadd_ps(e, e, err[r]);
          continue;
        }
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, zv), vinv[r]),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        u = _mm512_min_ps(top_r[r], _mm512_max_ps(zero, _mm512_add_ps(q, half_r[r])));
        const __m512 n = _mm512_fmsub_ps(two, u, top_r[r]);  // 2u is exact: one rounding.
        const __m512 e = _mm512_sub_ps(RoundTrip<kBf16>(_mm512_fmadd_ps(vhs[r], n, zv)), v);
        err[r] = _mm512_fmadd_ps(e, e, err[r]);
      } else {
        const __mmask16 active = __mmask16((b[r] ? 0xffff : 0) | (bo[r] ? om : 0));
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, zv), vinv[r]),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 top = _mm512_mask_blend_ps(om, top_r[r], top_o[r]);
        u = _mm512_add_ps(q, _mm512_mask_blend_ps(om, half_r[r], half_o[r]));
        u = _mm512_maskz_mov_ps(active, _mm512_min_ps(top, _mm512_max_ps(zero, u)));
        const __m512 n = _mm512_maskz_fmsub_ps(active, two, u, top);
        const __m512 e = _mm512_sub_ps(RoundTrip<kBf16>(_mm512_fmadd_ps(vhs[r], n, zv)), v);
        err[r] = _mm512_fmadd_ps(e, e, err[r]);
      }
      const __m512i ui = _mm512_cvtps_epi32(u);
      _mm_store_si128(reinterpret_cast<__m128i*>(low[r] + 16 * k), _mm512_cvtepi32_epi8(ui));
      if (b[r] > 8) {
        _mm_store_si128(reinterpret_cast<__m128i*>(high[r] + 16 * k),
                        _mm512_cvtepi32_epi8(_mm512_srli_epi32(ui, 8)));
      }
      if (om != 0) _mm512_storeu_si512(oc[r] + seen, _mm512_maskz_compress_epi32(om, ui));
    }
    seen += uint32_t(__builtin_popcount(om));
  }
#pragma GCC unroll 2
  for (uint32_t r = 0; r < N; ++r) {
    if (b[r] > 0) BytePlanes(low[r], D, 0, out[r]);
    if (b[r] > 8) BytePlanes(high[r], D, 8, out[r]);
    if (hd.outliers) {  // Extra plane p: bit b + p of each outlier channel's code.
      const uint64_t ob = PlaneBytes(hd.outliers);
      const __mmask16 m0 = __mmask16(_bzhi_u32(0xffff, hd.outliers)),
                      m1 = __mmask16(hd.outliers > 16 ? _bzhi_u32(0xffff, hd.outliers - 16) : 0);
      const __m512i c0 = _mm512_maskz_load_epi32(m0, oc[r]);
      const __m512i c1 = _mm512_maskz_load_epi32(m1, oc[r] + 16);
      for (uint32_t p = 0; p < hd.extra; ++p) {
        const __m512i bit = _mm512_set1_epi32(1 << (b[r] + p));
        const uint32_t bits = uint32_t(_mm512_test_epi32_mask(c0, bit)) |
                              uint32_t(_mm512_test_epi32_mask(c1, bit)) << 16;
        std::memcpy(out[r] + b[r] * (D / 8) + p * ob, &bits, ob);
      }
    }
    err_out[r] = Tree16v(err[r]);
  }
}

template <bool kBf16, uint32_t R>
KVPOOL_AVX512 bool EncodeR(const RowHead& hd, const uint16_t* const* x, uint32_t rows,
                           int16_t* coefs, ChooseFn choose, void* ctx, uint8_t* out, RowStats* st,
                           uint8_t* meta, float* err) {
  // The block's rows phase by phase (project all, choose all, quantise all), so that one row's
  // tail overlaps the next row's start instead of waiting on its own reductions.
  alignas(64) float xf[kRowBlock * kMaxDim], zf[kRowBlock * kMaxDim];
  const uint32_t D = hd.D;
  uint32_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    ProjectCore<kBf16, R, 2>(hd, x + i, xf + i * D, zf + i * D, coefs + i * kMaxRank, st + i);
  }
  if (i < rows) {
    ProjectCore<kBf16, R, 1>(hd, x + i, xf + i * D, zf + i * D, coefs + i * kMaxRank, st + i);
  }
  float hs[kRowBlock];
  uint8_t* dst[kRowBlock + 1];
  dst[0] = out;
  for (i = 0; i < rows; ++i) {
    if (!std::isfinite(st[i].energy)) return false;
    meta[i] = choose(ctx, i, st[i], &hs[i]);
    dst[i + 1] = dst[i] + RowBytesOf(hd, meta[i]);
  }
  for (i = 0; i + 2 <= rows; i += 2) {
    QuantizeCore<kBf16, 2>(hd, xf + i * D, zf + i * D, meta + i, hs + i, dst + i, err + i);
  }
  if (i < rows)
    QuantizeCore<kBf16, 1>(hd, xf + i * D, zf + i * D, meta + i, hs + i, dst + i, err + i);
  return true;
}

// Lanes of 16 columns from d on, of D: all, or the tail's.
inline __mmask16 Columns(uint32_t d, uint32_t D) {
  return D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
}

template <uint32_t K>
KVPOOL_AVX512 void AccumulateK(const float* x, uint64_t ld, uint32_t count, const float* w,
                               uint32_t D, float* out) {
  for (uint32_t d = 0; d < D; d += 32) {
    const __mmask16 m0 = Columns(d, D), m1 = d + 16 < D ? Columns(d + 16, D) : 0;
    __m512 acc[K][2];
    for (uint32_t j = 0; j < K; ++j) {
      acc[j][0] = _mm512_maskz_loadu_ps(m0, out + j * D + d);
      acc[j][1] = _mm512_maskz_loadu_ps(m1, out + j * D + d + 16);
    }
    for (uint32_t n = 0; n < count; ++n) {
      const __m512 a = _mm512_maskz_loadu_ps(m0, x + n * ld + d);
      const __m512 b = _mm512_maskz_loadu_ps(m1, x + n * ld + d + 16);
      for (uint32_t j = 0; j < K; ++j) {
        const __m512 wj = _mm512_set1_ps(w[uint64_t{n} * K + j]);
        acc[j][0] = _mm512_fmadd_ps(wj, a, acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(wj, b, acc[j][1]);
      }
    }
    for (uint32_t j = 0; j < K; ++j) {
      _mm512_mask_storeu_ps(out + j * D + d, m0, acc[j][0]);
      _mm512_mask_storeu_ps(out + j * D + d + 16, m1, acc[j][1]);
    }
  }
}

template <uint32_t K>
KVPOOL_AVX512 void DotK(const float* x, uint64_t ld, uint32_t count, const float* s, uint32_t D,
                        float* y) {
  uint32_t n = 0;
  for (; n + 2 <= count && D % 16 == 0; n += 2) {  // Two rows at a time: 16 chains in flight.
    __m512 a[8], b[8];
    for (uint32_t j = 0; j < 8; ++j) a[j] = b[j] = _mm512_setzero_ps();
    for (uint32_t d = 0; d < D; d += 16) {
      const __m512 u = _mm512_loadu_ps(x + n * ld + d), v = _mm512_loadu_ps(x + (n + 1) * ld + d);
      for (uint32_t j = 0; j < K; ++j) {
        const __m512 sj = _mm512_loadu_ps(s + j * D + d);
        a[j] = _mm512_fmadd_ps(u, sj, a[j]);
        b[j] = _mm512_fmadd_ps(v, sj, b[j]);
      }
    }
    float sums[8];
    Tree16x8(a, sums);
    for (uint32_t j = 0; j < K; ++j) y[uint64_t{n} * K + j] = sums[j];
    Tree16x8(b, sums);
    for (uint32_t j = 0; j < K; ++j) y[uint64_t{n + 1} * K + j] = sums[j];
  }
  for (; n < count; ++n) {
    __m512 acc[8];
    for (uint32_t j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (uint32_t d = 0; d < D; d += 16) {
      const __mmask16 m = Columns(d, D);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + n * ld + d);
      for (uint32_t j = 0; j < K; ++j) {  // Lanes past D keep their sums as they are.
        acc[j] = _mm512_mask3_fmadd_ps(v, _mm512_maskz_loadu_ps(m, s + j * D + d), acc[j], m);
      }
    }
    float sums[8];
    Tree16x8(acc, sums);
    for (uint32_t j = 0; j < K; ++j) y[uint64_t{n} * K + j] = sums[j];
  }
}

KVPOOL_AVX512 void Accumulate(const float* x, uint64_t ld, uint32_t count, const float* w,
                              uint32_t k, uint32_t D, float* out) {
  if (k == 0) return;
  ForRank(k, [](auto K) { return &AccumulateK < decltype(K)::value ? decltype(K)::value : 1 > ; })(
      x, ld, count, w, D, out);
}

KVPOOL_AVX512 void Dot(const float* x, uint64_t ld, uint32_t count, const float* s, uint32_t k,
                       uint32_t D, float* y) {
  if (k == 0) return;
  ForRank(k, [](auto K) { return &DotK < decltype(K)::value ? decltype(K)::value : 1 > ; })(
      x, ld, count, s, D, y);
}

KVPOOL_AVX512 void Planes(const int16_t* codes, uint32_t T, uint32_t width, uint8_t* out) {
  const uint64_t pb = PlaneBytes(T);
  const __m512i offset = _mm512_set1_epi16(int16_t(1 << (width - 1)));
  for (uint32_t t = 0; t < T; t += 32) {
    const __mmask32 valid = T - t >= 32 ? ~__mmask32{0} : (__mmask32{1} << (T - t)) - 1;
    const __m512i u = _mm512_add_epi16(_mm512_maskz_loadu_epi16(valid, codes + t), offset);
    const uint64_t bytes = std::min<uint64_t>(4, pb - t / 8);
    for (uint32_t p = 0; p < width; ++p) {
      const uint32_t bits =
          _mm512_mask_test_epi16_mask(valid, u, _mm512_set1_epi16(int16_t(1 << p)));
      std::memcpy(out + p * pb + t / 8, &bits, bytes);
    }
  }
}

template <bool kBf16>
KVPOOL_AVX512 float LoadT(const uint16_t* x, uint64_t n, float* out, float* sums) {
  __m512 en = _mm512_setzero_ps();
  uint64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v = LoadFloats16<kBf16>(x + c);
    _mm512_storeu_ps(out + c, v);
    _mm512_storeu_ps(sums + c, _mm512_add_ps(_mm512_loadu_ps(sums + c), v));
    en = _mm512_fmadd_ps(v, v, en);
  }
  alignas(64) float l[16];
  _mm512_store_ps(l, en);
  for (; c < n; ++c) {
    out[c] = ToFloat(kBf16 ? DType::kBf16 : DType::kFp16, x[c]);
    sums[c] = sums[c] + out[c];
    l[c % 16] = std::fma(out[c], out[c], l[c % 16]);
  }
  return Tree16(l);
}

KVPOOL_AVX512 float Load(DType dtype, const uint16_t* x, uint64_t n, float* out, float* sums) {
  return dtype == DType::kBf16 ? LoadT<true>(x, n, out, sums) : LoadT<false>(x, n, out, sums);
}

KVPOOL_AVX512 float Centre(const float* x, const float* m, uint32_t D, float* xc, float* var) {
  __m512 l = _mm512_setzero_ps();
  for (uint32_t d = 0; d < D; d += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(m + d));
    _mm512_storeu_ps(xc + d, v);
    _mm512_storeu_ps(var + d, _mm512_add_ps(_mm512_loadu_ps(var + d), _mm512_mul_ps(v, v)));
    l = _mm512_fmadd_ps(v, v, l);
  }
  return Tree16v(l);
}

KVPOOL_AVX512 bool Encode(const RowHead& hd, DType dtype, const uint16_t* const* x, uint32_t rows,
                          int16_t* coefs, ChooseFn choose, void* ctx, uint8_t* out, RowStats* st,
                          uint8_t* meta, float* err) {
  const auto fn =
      dtype == DType::kBf16
          ? ForRank(hd.rank, [](auto R) { return &EncodeR<true, decltype(R)::value>; })
          : ForRank(hd.rank, [](auto R) { return &EncodeR<false, decltype(R)::value>; });
  return fn(hd, x, rows, coefs, choose, ctx, out, st, meta, err);
}

}  // namespace

const RowKernels* RowKernelsAvx512(uint32_t head_dim) {
  static const RowKernels k = {&Encode, &Accumulate, &Dot, &Planes, &Load, &Centre};
  if (!CpuHasAvx512() || head_dim % 32 != 0 || head_dim > kMaxDim) return nullptr;
  return &k;
}

}  // namespace kvpool::kernels::kvpool::internal
