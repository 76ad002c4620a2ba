// The kvpool codec's payload mode 4 encoder kernels (RowKernels) on AVX2 with FMA and F16C, for
// CPUs without the AVX-512 of kvpool_rows_avx512.cc; head_dim a multiple of 32 up to
// kMaxDim. Float operations are the reference's in its order (kvpool_rows.cc): a sum over 16
// lanes d mod 16 is two 8-lane vectors, lanes 0-7 and 8-15 of each 16 channels, combined by
// Tree16's additions in Tree16's order, so the payloads are the reference's, byte for byte.
// A row's 32 channels are one 32-bit word of each plane: its codes packed to bytes, plane p is
// the bytes' bit p moved to the top (a 16-bit shift) and gathered by vpmovmskb.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kvpool_rows.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr uint32_t kMaxDim = kAvx2MaxHeadDim;  // (kvpool_rows.h)

using simd::Load8;
using simd::Tree16;

// Lanes of channels d .. d + 7 that are outlier channels, as an all-ones mask per lane.
KVPOOL_AVX2 inline __m256i OutlierLanes8(const RowHead& hd, uint32_t d) {
  const uint32_t bits = (hd.outlier_masks[d / 32] >> (d % 32)) & 0xff;
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), lane), lane);
}

// Plane p (< 8) of 32 code bytes: bit p of byte i at bit i.
KVPOOL_AVX2 inline uint32_t BytePlane(__m256i bytes, int p) {
  return uint32_t(_mm256_movemask_epi8(_mm256_sll_epi16(bytes, _mm_cvtsi32_si128(7 - p))));
}

// One row of RowKernels::encode's projection: x as floats into xf, the prediction into zf, the
// stats; outlier_lanes holds the head's outlier lanes' masks (heads with outliers).
template <bool kBf16, uint32_t R>
KVPOOL_AVX2 void ProjectRowAvx2(const RowHead& hd, const uint16_t* x, int16_t* coefs, float* xf,
                                float* zf, const float* outlier_lanes, RowStats* st) {
  const uint32_t D = hd.D;
  // Projection, lanes 0-7 of each 16 channels, then lanes 8-15 (8 dot products in registers).
  __m256 dot[2][8], dist[2], en[2];
  for (uint32_t half = 0; half < 2; ++half) {
    __m256 acc[8], ds = _mm256_setzero_ps(), e = _mm256_setzero_ps();
    for (uint32_t j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
    for (uint32_t d = 8 * half; d < D; d += 16) {
      const __m256 v = Load8<kBf16>(x + d);
      _mm256_store_ps(xf + d, v);
      const __m256 xc = _mm256_sub_ps(v, _mm256_loadu_ps(hd.means + d));
      const float* chunk = hd.chunks + 128 * (d / 16) + d % 16;  // direction j at + 16 j
      for (uint32_t j = 0; j < R; ++j) {
        acc[j] = _mm256_fmadd_ps(xc, _mm256_loadu_ps(chunk + 16 * j), acc[j]);
      }
      ds = _mm256_fmadd_ps(xc, xc, ds);
      e = _mm256_fmadd_ps(v, v, e);
    }
    for (uint32_t j = 0; j < R; ++j) dot[half][j] = acc[j];
    dist[half] = ds;
    en[half] = e;
  }
  __m256i bc[4];
  for (uint32_t j = 0; j < R; ++j) {
    const float q = _mm_cvtss_f32(
        _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(Tree16(dot[0][j], dot[1][j]) * hd.inv_step[j]),
                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    coefs[j] = int16_t(std::min(float(kMaxCoefCode), std::max(-float(kMaxCoefCode), q)));
  }
  for (uint32_t k = 0; k < (R + 1) / 2; ++k) {
    const uint32_t lo = uint16_t(coefs[2 * k]);
    const uint32_t hi = 2 * k + 1 < R ? uint16_t(coefs[2 * k + 1]) : 0;
    bc[k] = _mm256_set1_epi32(int(lo | hi << 16));
  }
  // Prediction and the residual's energy, regular and outlier channels apart.
  const __m256 scale = _mm256_set1_ps(hd.lr_scale), zero = _mm256_setzero_ps();
  __m256 reg[2] = {zero, zero}, outl[2] = {zero, zero};
  for (uint32_t d = 0; d < D; d += 8) {
    const uint32_t half = (d / 8) & 1;
    const int16_t* slot = hd.pairs + PairSlot(d, 0);  // Pair k of channels d .. d + 7 at + 32 k.
    __m256i P = _mm256_setzero_si256();
    for (uint32_t k = 0; k < (R + 1) / 2; ++k) {
      P = _mm256_add_epi32(
          P, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(slot + 32 * k)),
                               bc[k]));
    }
    const __m256 z = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(P), _mm256_loadu_ps(hd.means + d));
    _mm256_store_ps(zf + d, z);
    const __m256 r = _mm256_sub_ps(_mm256_load_ps(xf + d), z);
    if (hd.outliers == 0) {
      reg[half] = _mm256_fmadd_ps(r, r, reg[half]);
    } else {  // fma(0, 0, acc) leaves acc as it is (never -0).
      const __m256 om = _mm256_load_ps(outlier_lanes + d);
      const __m256 rr = _mm256_andnot_ps(om, r), ro = _mm256_and_ps(om, r);
      reg[half] = _mm256_fmadd_ps(rr, rr, reg[half]);
      outl[half] = _mm256_fmadd_ps(ro, ro, outl[half]);
    }
  }
  *st = {Tree16(dist[0], dist[1]), Tree16(reg[0], reg[1]), Tree16(outl[0], outl[1]),
         Tree16(en[0], en[1])};
}

// 32 int32 codes, all below 2^15, to bytes: their low bytes (`mask`: codes may pass 255) or
// bits 8-15 (`shift` 8), in channel order.
KVPOOL_AVX2 inline __m256i PackBytes(const __m256i* u, int shift, bool mask) {
  __m256i v[4];
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_srli_epi32(u[i], shift);
    if (mask) v[i] = _mm256_and_si256(v[i], _mm256_set1_epi32(0xff));
  }
  const __m256i ab = _mm256_packus_epi32(v[0], v[1]), cd = _mm256_packus_epi32(v[2], v[3]);
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One row's quantisation (the reference's QuantizeRowRef) from ProjectRowAvx2's arrays, with
// its meta byte and half step: its planes into `out`, its squared error. Groups of 8 channels
// without an outlier channel (bit g of `groups` clear) skip the blends between the regular and
// the outlier parameters; a row without planes measures only its prediction's rounding (n = 0:
// y = to_dtype(fma(hs, 0, z)), whose error equals to_dtype(z)'s, -0 and +0 alike). The codes go
// to bytes in registers, 32 channels at a time.
template <bool kBf16>
KVPOOL_AVX2 float QuantizeRowAvx2(const RowHead& hd, const float* xf, const float* zf,
                                  const float* outlier_lanes, uint64_t groups, uint8_t meta,
                                  float hs, uint8_t* out) {
  const uint32_t D = hd.D;
  const __m256 zero = _mm256_setzero_ps();
  const uint32_t b = meta & 15, bo = hd.outliers ? b + hd.extra : b;
  __m256 err[2] = {zero, zero};
  if (b == 0 && hd.outliers == 0) {
    for (uint32_t d = 0; d < D; d += 8) {
      const __m256 e =
          _mm256_sub_ps(simd::RoundTrip8<kBf16>(_mm256_load_ps(zf + d)), _mm256_load_ps(xf + d));
      err[(d / 8) & 1] = _mm256_fmadd_ps(e, e, err[(d / 8) & 1]);
    }
    return Tree16(err[0], err[1]);
  }
  alignas(32) int32_t codes[kMaxDim];  // The outlier channels' (for their extra planes).
  const __m256 vinv = _mm256_set1_ps(1.f / (2.f * hs)), vhs = _mm256_set1_ps(hs);
  const __m256 half_r = _mm256_set1_ps(b ? float(1u << (b - 1)) : 0.f);
  const __m256 top_r = _mm256_set1_ps(float((1u << b) - 1));
  const __m256 half_o = _mm256_set1_ps(bo ? float(1u << (bo - 1)) : 0.f);
  const __m256 top_o = _mm256_set1_ps(float((1u << bo) - 1));
  const __m256 two = _mm256_set1_ps(2.f);
  const __m256 live_r = _mm256_castsi256_ps(_mm256_set1_epi32(b ? -1 : 0));
  const __m256 live_o = _mm256_castsi256_ps(_mm256_set1_epi32(bo ? -1 : 0));
  const uint64_t pd = D / 8;
  for (uint32_t c = 0; c < D; c += 32) {
    __m256i ui[4];
    for (uint32_t g = 0; g < 4; ++g) {
      const uint32_t d = c + 8 * g;
      const __m256 v = _mm256_load_ps(xf + d), z = _mm256_load_ps(zf + d);
      const __m256 q = _mm256_floor_ps(_mm256_mul_ps(_mm256_sub_ps(v, z), vinv));
      __m256 u, n;
      if (((groups >> (d / 8)) & 1) == 0) {  // Regular channels only.
        u = _mm256_and_ps(live_r,
                          _mm256_min_ps(top_r, _mm256_max_ps(zero, _mm256_add_ps(q, half_r))));
        n = _mm256_and_ps(live_r, _mm256_fmsub_ps(two, u, top_r));  // 2u exact
      } else {
        const __m256 om = _mm256_load_ps(outlier_lanes + d);
        const __m256 top = _mm256_blendv_ps(top_r, top_o, om);
        const __m256 live = _mm256_blendv_ps(live_r, live_o, om);
        u = _mm256_add_ps(q, _mm256_blendv_ps(half_r, half_o, om));
        u = _mm256_and_ps(live, _mm256_min_ps(top, _mm256_max_ps(zero, u)));
        n = _mm256_and_ps(live, _mm256_fmsub_ps(two, u, top));
      }
      const __m256 e = _mm256_sub_ps(simd::RoundTrip8<kBf16>(_mm256_fmadd_ps(vhs, n, z)), v);
      err[g & 1] = _mm256_fmadd_ps(e, e, err[g & 1]);
      ui[g] = _mm256_cvtps_epi32(u);
      if (hd.outliers) _mm256_store_si256(reinterpret_cast<__m256i*>(codes + d), ui[g]);
    }
    // Planes: b regular planes of every channel (the low b bits of outlier channels' codes).
    if (b > 0) {
      const __m256i low = PackBytes(ui, 0, hd.outliers != 0 || b > 8);
      for (uint32_t p = 0; p < std::min(b, 8u); ++p) {
        const uint32_t w = BytePlane(low, int(p));
        std::memcpy(out + p * pd + c / 8, &w, 4);
      }
    }
    if (b > 8) {
      const __m256i high = PackBytes(ui, 8, true);
      for (uint32_t p = 8; p < b; ++p) {
        const uint32_t w = BytePlane(high, int(p - 8));
        std::memcpy(out + p * pd + c / 8, &w, 4);
      }
    }
  }
  const float row_err = Tree16(err[0], err[1]);
  if (hd.outliers) {  // Extra plane q: bit b + q of each outlier channel's code, 8 at a time.
    const uint64_t ob = PlaneBytes(hd.outliers);
    alignas(32) int32_t oc[kMaxOutliers] = {};  // Lanes past the outliers are loaded, not used.
    for (uint32_t k = 0; k < hd.outliers; ++k) oc[k] = codes[hd.outlier[k]];
    for (uint32_t q = 0; q < hd.extra; ++q) {
      const __m128i shift = _mm_cvtsi32_si128(31 - int(b + q));  // Bit b + q to the sign.
      uint32_t bits = 0;
      for (uint32_t k = 0; k < hd.outliers; k += 8) {
        const __m256i v =
            _mm256_sll_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(oc + k)), shift);
        bits |= uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(v))) << k;
      }
      if (hd.outliers < 32) bits &= (1u << hd.outliers) - 1;
      std::memcpy(out + b * pd + q * ob, &bits, ob);
    }
  }
  return row_err;
}

template <bool kBf16, uint32_t R>
KVPOOL_AVX2 bool EncodeR(const RowHead& hd, const uint16_t* const* x, uint32_t rows, int16_t* coefs,
                         ChooseFn choose, void* ctx, uint8_t* out, RowStats* st, uint8_t* meta,
                         float* err) {
  // Phase by phase over the block (project all, choose all, quantise all), as on AVX-512.
  alignas(32) float xf[kRowBlock * kMaxDim], zf[kRowBlock * kMaxDim], outlier_lanes[kMaxDim];
  const uint32_t D = hd.D;
  uint64_t groups = 0;  // Bit g: channels 8g .. 8g + 7 hold an outlier channel.
  for (uint32_t d = 0; d < D && hd.outliers; d += 8) {  // The head's, once for the block.
    const __m256i lanes = OutlierLanes8(hd, d);
    _mm256_store_ps(outlier_lanes + d, _mm256_castsi256_ps(lanes));
    groups |= uint64_t{_mm256_movemask_ps(_mm256_castsi256_ps(lanes)) != 0} << (d / 8);
  }
  for (uint32_t i = 0; i < rows; ++i) {
    ProjectRowAvx2<kBf16, R>(hd, x[i], coefs + i * kMaxRank, xf + i * D, zf + i * D,
                             outlier_lanes, &st[i]);
  }
  float hs[kRowBlock];
  for (uint32_t i = 0; i < rows; ++i) {
    if (!std::isfinite(st[i].energy)) return false;
    meta[i] = choose(ctx, i, st[i], &hs[i]);
  }
  for (uint32_t i = 0; i < rows; ++i) {
    err[i] = QuantizeRowAvx2<kBf16>(hd, xf + i * D, zf + i * D, outlier_lanes, groups, meta[i],
                                    hs[i], out);
    out += RowBytesOf(hd, meta[i]);
  }
  return true;
}

bool Encode(const RowHead& hd, DType dtype, const uint16_t* const* x, uint32_t rows, int16_t* coefs,
            ChooseFn choose, void* ctx, uint8_t* out, RowStats* st, uint8_t* meta, float* err) {
  const auto fn =
      dtype == DType::kBf16
          ? ForRank(hd.rank, [](auto R) { return &EncodeR<true, decltype(R)::value>; })
          : ForRank(hd.rank, [](auto R) { return &EncodeR<false, decltype(R)::value>; });
  return fn(hd, x, rows, coefs, choose, ctx, out, st, meta, err);
}

// out[j * D + d]: fma chain over n in order, 8 channels at a time (the reference's per element);
// four vectors of channels at once where they fill, so that four chains are in flight.
KVPOOL_AVX2 void Accumulate(const float* x, uint64_t ld, uint32_t count, const float* w, uint32_t k,
                            uint32_t D, float* out) {
  for (uint32_t j = 0; j < k; ++j) {
    uint32_t d = 0;
    for (; d + 32 <= D; d += 32) {
      __m256 acc[4];
      for (uint32_t v = 0; v < 4; ++v) acc[v] = _mm256_loadu_ps(out + j * D + d + 8 * v);
      for (uint32_t n = 0; n < count; ++n) {
        const __m256 wn = _mm256_set1_ps(w[uint64_t{n} * k + j]);
        for (uint32_t v = 0; v < 4; ++v) {
          acc[v] = _mm256_fmadd_ps(wn, _mm256_loadu_ps(x + n * ld + d + 8 * v), acc[v]);
        }
      }
      for (uint32_t v = 0; v < 4; ++v) _mm256_storeu_ps(out + j * D + d + 8 * v, acc[v]);
    }
    for (; d + 8 <= D; d += 8) {
      __m256 acc = _mm256_loadu_ps(out + j * D + d);
      for (uint32_t n = 0; n < count; ++n) {
        acc = _mm256_fmadd_ps(_mm256_set1_ps(w[uint64_t{n} * k + j]),
                              _mm256_loadu_ps(x + n * ld + d), acc);
      }
      _mm256_storeu_ps(out + j * D + d, acc);
    }
    for (; d < D; ++d) {
      float acc = out[j * D + d];
      for (uint32_t n = 0; n < count; ++n)
        acc = std::fma(w[uint64_t{n} * k + j], x[n * ld + d], acc);
      out[j * D + d] = acc;
    }
  }
}

// Up to 8 floats from p (lanes at `count` and beyond zero).
KVPOOL_AVX2 inline __m256 LoadUpTo8(const float* p, uint32_t count) {
  if (count >= 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count)), lane));
}

// y[n * k + j]: 16 lanes d mod 16 (two vectors), Tree16. Past D the lanes add fma(0, 0, .),
// which leaves them as they are (they never hold -0).
KVPOOL_AVX2 void Dot(const float* x, uint64_t ld, uint32_t count, const float* s, uint32_t k,
                     uint32_t D, float* y) {
  for (uint32_t n = 0; n < count; ++n) {
    uint32_t j = 0;
    if (D % 16 == 0) {  // Four directions at once: eight chains in flight, the row read once.
      for (; j + 4 <= k; j += 4) {
        __m256 lo[4], hi[4];
        for (uint32_t i = 0; i < 4; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
        const float* a = x + n * ld;
        for (uint32_t d = 0; d < D; d += 16) {
          const __m256 a0 = _mm256_loadu_ps(a + d), a1 = _mm256_loadu_ps(a + d + 8);
          for (uint32_t i = 0; i < 4; ++i) {
            const float* b = s + uint64_t{j + i} * D + d;
            lo[i] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b), lo[i]);
            hi[i] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + 8), hi[i]);
          }
        }
        for (uint32_t i = 0; i < 4; ++i) y[uint64_t{n} * k + j + i] = Tree16(lo[i], hi[i]);
      }
    }
    for (; j < k; ++j) {
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      const float* a = x + n * ld;
      const float* b = s + uint64_t{j} * D;
      uint32_t d = 0;
      for (; d + 16 <= D; d += 16) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), hi);
      }
      if (d < D) {
        const uint32_t rest = D - d;
        lo = _mm256_fmadd_ps(LoadUpTo8(a + d, rest), LoadUpTo8(b + d, rest), lo);
        if (rest > 8) {
          hi = _mm256_fmadd_ps(LoadUpTo8(a + d + 8, rest - 8), LoadUpTo8(b + d + 8, rest - 8), hi);
        }
      }
      y[uint64_t{n} * k + j] = Tree16(lo, hi);
    }
  }
}

// Plane p of codes + 2^(width - 1), 32 tokens at a time: bit p moved to the sign of each 16-bit
// lane, packed to bytes (signed saturation keeps the sign) and gathered by vpmovmskb.
KVPOOL_AVX2 void Planes(const int16_t* codes, uint32_t T, uint32_t width, uint8_t* out) {
  const uint64_t pb = PlaneBytes(T);
  const __m256i offset = _mm256_set1_epi16(int16_t(1 << (width - 1)));
  for (uint32_t t = 0; t < T; t += 32) {
    alignas(32) int16_t c[32] = {};
    std::memcpy(c, codes + t, 2 * std::min(32u, T - t));
    const uint32_t valid = T - t >= 32 ? ~0u : (1u << (T - t)) - 1;
    const __m256i a =
        _mm256_add_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(c)), offset);
    const __m256i b =
        _mm256_add_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(c + 16)), offset);
    const uint64_t bytes = std::min<uint64_t>(4, pb - t / 8);
    for (uint32_t p = 0; p < width; ++p) {
      const __m128i shift = _mm_cvtsi32_si128(15 - int(p));
      const __m256i packed = _mm256_permute4x64_epi64(
          _mm256_packs_epi16(_mm256_sll_epi16(a, shift), _mm256_sll_epi16(b, shift)), 0xd8);
      const uint32_t bits = uint32_t(_mm256_movemask_epi8(packed)) & valid;
      std::memcpy(out + p * pb + t / 8, &bits, bytes);
    }
  }
}

template <bool kBf16>
KVPOOL_AVX2 float LoadT(const uint16_t* x, uint64_t n, float* out, float* sums) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  uint64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256 a = Load8<kBf16>(x + c), b = Load8<kBf16>(x + c + 8);
    _mm256_storeu_ps(out + c, a);
    _mm256_storeu_ps(out + c + 8, b);
    _mm256_storeu_ps(sums + c, _mm256_add_ps(_mm256_loadu_ps(sums + c), a));
    _mm256_storeu_ps(sums + c + 8, _mm256_add_ps(_mm256_loadu_ps(sums + c + 8), b));
    lo = _mm256_fmadd_ps(a, a, lo);
    hi = _mm256_fmadd_ps(b, b, hi);
  }
  alignas(32) float l[16];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(l + 8, hi);
  for (; c < n; ++c) {
    out[c] = ToFloat(kBf16 ? DType::kBf16 : DType::kFp16, x[c]);
    sums[c] = sums[c] + out[c];
    l[c % 16] = std::fma(out[c], out[c], l[c % 16]);
  }
  return Tree16(_mm256_load_ps(l), _mm256_load_ps(l + 8));
}

KVPOOL_AVX2 float Load(DType dtype, const uint16_t* x, uint64_t n, float* out, float* sums) {
  return dtype == DType::kBf16 ? LoadT<true>(x, n, out, sums) : LoadT<false>(x, n, out, sums);
}

KVPOOL_AVX2 float Centre(const float* x, const float* m, uint32_t D, float* xc, float* var) {
  __m256 l[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (uint32_t d = 0; d < D; d += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(m + d));
    _mm256_storeu_ps(xc + d, v);
    _mm256_storeu_ps(var + d, _mm256_add_ps(_mm256_loadu_ps(var + d), _mm256_mul_ps(v, v)));
    l[(d / 8) & 1] = _mm256_fmadd_ps(v, v, l[(d / 8) & 1]);
  }
  return Tree16(l[0], l[1]);
}

}  // namespace

const RowKernels* RowKernelsAvx2(uint32_t head_dim) {
  static const RowKernels k = {&Encode, &Accumulate, &Dot, &Planes, &Load, &Centre};
  if (!CpuHasAvx2() || head_dim % 32 != 0 || head_dim > kMaxDim) return nullptr;
  return &k;
}

}  // namespace kvpool::kernels::kvpool::internal
