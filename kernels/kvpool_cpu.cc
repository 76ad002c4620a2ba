// The kvpool codec, fast CPU path: AVX2/F16C residual quantisation and decoding, chosen at run
// time; the analysis (means, low-rank basis) is the reference's. Decoding is bit-identical to
// the reference (multiply and add kept separate, round to nearest even), and the encoder writes
// the reference's payload (same step search, same error summation order).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_format.h"
#include "kernels/kvpool_rows.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::kvpool {
namespace {

using internal::Analysis;

// Rounds 8 floats to the dtype and back (finite inputs; NaN lanes take the scalar path).
__attribute__((target("avx2,fma,f16c"))) inline __m256 RoundTrip(DType dtype, __m256 y) {
  if (dtype == DType::kFp16) return _mm256_cvtph_ps(_mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
  const __m256i u = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
  return _mm256_castsi256_ps(r);
}

// Stores 8 floats as the dtype at out (bit-identical to FromFloat, NaN included).
__attribute__((target("avx2,fma,f16c"))) inline void Store8(DType dtype, __m256 y, uint16_t* out) {
  if (_mm256_movemask_ps(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)) != 0) {
    alignas(32) float f[8];
    _mm256_store_ps(f, y);
    for (int l = 0; l < 8; ++l) out[l] = internal::FromFloat(dtype, f[l]);
    return;
  }
  if (dtype == DType::kFp16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
  const __m256i u = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// Encoder kernels (internal::EncodeKernels): the reference's operations, lane by lane.
template <bool kBf16>
KVPOOL_AVX2 bool LoadT(const uint16_t* in, uint64_t n, float* x, double* energy) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  __m256 bad = _mm256_setzero_ps();
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = simd::Load8<kBf16>(in + i);
    _mm256_storeu_ps(x + i, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), v, _CMP_UNORD_Q));
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(d0, d0));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(d1, d1));
  }
  bool finite = _mm256_movemask_ps(bad) == 0;
  double sums[8];
  _mm256_storeu_pd(sums, acc0);
  _mm256_storeu_pd(sums + 4, acc1);
  for (; i < n; ++i) {
    x[i] = internal::ToFloat(kBf16 ? DType::kBf16 : DType::kFp16, in[i]);
    if (!std::isfinite(x[i])) finite = false;
    sums[i % 8] += double(x[i]) * double(x[i]);
  }
  *energy = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
  return finite;
}

bool LoadAvx2(DType dtype, const uint16_t* in, uint64_t n, float* x, double* energy) {
  return dtype == DType::kBf16 ? LoadT<true>(in, n, x, energy) : LoadT<false>(in, n, x, energy);
}

// ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7)) of the lanes.
KVPOOL_AVX2 inline float Tree8(__m256 a) {
  const __m256 h = _mm256_hadd_ps(a, a);
  const __m256 q = _mm256_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}

template <int K>
KVPOOL_AVX2 void DotK(const float* rows, uint64_t ld, uint32_t count, uint32_t stride,
                      const float* s, uint32_t D, float* y) {
  for (uint32_t n = 0; n < count; ++n) {
    const float* r = rows + uint64_t{n} * stride * ld;
    __m256 acc[K];
    for (int j = 0; j < K; ++j) acc[j] = _mm256_setzero_ps();
    for (uint32_t d = 0; d < D; d += 8) {
      const __m256 v = _mm256_loadu_ps(r + d);
      for (int j = 0; j < K; ++j) {
        acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(v, _mm256_loadu_ps(s + j * D + d)));
      }
    }
    for (int j = 0; j < K; ++j) y[uint64_t{n} * K + j] = Tree8(acc[j]);
  }
}

void DotAvx2(const float* rows, uint64_t ld, uint32_t count, uint32_t stride, const float* s,
             uint32_t k, uint32_t D, float* y) {
  if (D % 8 != 0 || k > 8) return internal::RefKernels().dot(rows, ld, count, stride, s, k, D, y);
  if (k == 0) return;
  internal::ForRank(k, [](auto K) { return &DotK<decltype(K)::value ? decltype(K)::value : 1>; })(
      rows, ld, count, stride, s, D, y);
}

KVPOOL_AVX2 void AccumulateAvx2(const float* rows, uint64_t ld, uint32_t count, uint32_t stride,
                                const float* w, uint32_t k, uint32_t D, float* out) {
  const uint32_t D8 = D & ~7u;
  for (uint32_t j = 0; j < k; ++j) {
    float* o = out + j * D;
    for (uint32_t d = 0; d < D8; d += 8) {
      __m256 acc = _mm256_loadu_ps(o + d);
      for (uint32_t n = 0; n < count; ++n) {
        const __m256 v = _mm256_loadu_ps(rows + uint64_t{n} * stride * ld + d);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(w[uint64_t{n} * k + j]), v));
      }
      _mm256_storeu_ps(o + d, acc);
    }
    for (uint32_t n = 0; n < count; ++n) {
      const float* r = rows + uint64_t{n} * stride * ld;
      const float wj = w[uint64_t{n} * k + j];
      for (uint32_t d = D8; d < D; ++d) o[d] = o[d] + wj * r[d];
    }
  }
}

KVPOOL_AVX2 void PredictAvx2(uint32_t T, uint64_t HD, uint32_t D, uint32_t r, const float* m,
                             const float* cf, const float* basis, float* pred) {
  const uint32_t G = internal::Groups(T);
  const uint64_t rows = uint64_t{G} * internal::kPack;
  for (uint32_t g = 0; g < G; ++g) {
    const uint32_t valid = std::min<uint32_t>(16, T - g * 16);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
    const __m256 keep1 = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid) - 8), lane));
    const float* c = cf + uint64_t{g} * 16;
    for (uint32_t d = 0; d < D; ++d) {
      __m256 p0 = _mm256_set1_ps(m[d]), p1 = p0;
      for (uint32_t j = 0; j < r; ++j) {
        const __m256 b = _mm256_set1_ps(basis[j * D + d]);
        p0 = _mm256_add_ps(p0, _mm256_mul_ps(_mm256_loadu_ps(c + j * rows), b));
        p1 = _mm256_add_ps(p1, _mm256_mul_ps(_mm256_loadu_ps(c + j * rows + 8), b));
      }
      float* o = pred + (uint64_t{g} * HD + d) * 16;
      _mm256_storeu_ps(o, _mm256_and_ps(p0, keep0));
      _mm256_storeu_ps(o + 8, _mm256_and_ps(p1, keep1));
    }
  }
}

// Transposes 8 rows of 8 floats in place.
KVPOOL_AVX2 inline void Transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

KVPOOL_AVX2 void ToPacksAvx2(const float* x, uint32_t T, uint64_t HD, float* xp) {
  if (HD % 8 != 0) return internal::RefKernels().to_packs(x, T, HD, xp);
  const uint32_t G = internal::Groups(T);
  for (uint32_t g = 0; g < G; ++g)
    for (uint32_t half = 0; half < 2; ++half) {
      const uint32_t t0 = g * 16 + half * 8;
      for (uint64_t c0 = 0; c0 < HD; c0 += 8) {
        __m256 r[8];
        for (uint32_t l = 0; l < 8; ++l) {
          r[l] = t0 + l < T ? _mm256_loadu_ps(x + (t0 + l) * HD + c0) : _mm256_setzero_ps();
        }
        Transpose8(r);
        float* o = xp + (uint64_t{g} * HD + c0) * 16 + half * 8;
        for (int l = 0; l < 8; ++l) _mm256_storeu_ps(o + l * 16, r[l]);
      }
    }
}

template <bool kBf16>
KVPOOL_AVX2 bool QuantizeT(const Analysis& a, uint64_t packs, uint32_t stride, float step,
                           uint16_t* codes, double* err) {
  const DType dtype = kBf16 ? DType::kBf16 : DType::kFp16;
  // The steps and their inverses per token and head for this pass (the reference's
  // step * scale and 1 / that, computed once instead of per element).
  thread_local std::vector<float> steps, invs;
  steps.resize(a.scale.size());
  invs.resize(a.scale.size());
  for (uint64_t i = 0; i < a.scale.size(); ++i) {
    steps[i] = step * a.scale[i];
    invs[i] = 1.f / steps[i];
  }
  const __m256 vmax = _mm256_set1_ps(internal::kMaxCode), sign = _mm256_set1_ps(-0.f);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  const float* xp = a.xp.data();
  const float* pp = a.prediction.data();
  for (uint64_t k = 0; k < packs; k += stride) {
    __m256i z[2];
    const uint64_t at = k / a.head_dim * 16;
    for (int h = 0; h < 2; ++h) {
      const __m256 x = _mm256_loadu_ps(xp + k * 16 + 8 * h), p = _mm256_loadu_ps(pp + k * 16 + 8 * h);
      const __m256 s = _mm256_loadu_ps(&steps[at + 8 * h]);
      const __m256 vinv = _mm256_loadu_ps(&invs[at + 8 * h]);
      const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, p), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), vmax, _CMP_LE_OQ)) != 0xff) {
        return false;
      }
      const __m256i q = _mm256_cvtps_epi32(v);
      z[h] = _mm256_xor_si256(_mm256_slli_epi32(q, 1), _mm256_srai_epi32(q, 31));
      const __m256 y = RoundTrip(dtype, _mm256_add_ps(p, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s)));
      const __m256 diff = _mm256_sub_ps(y, x);
      const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(diff));
      const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(diff, 1));
      acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(d0, d0));
      acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(d1, d1));
    }
    if (codes != nullptr) {
      const __m256i u = _mm256_permute4x64_epi64(_mm256_packus_epi32(z[0], z[1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k * 16), u);
    }
  }
  double sums[8];
  _mm256_storeu_pd(sums, acc0);
  _mm256_storeu_pd(sums + 4, acc1);
  *err = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
  return std::isfinite(*err);
}

bool QuantizeAvx2(const Analysis& a, DType dtype, uint64_t packs, uint32_t stride, float step,
                  uint16_t* codes, double* err) {
  return dtype == DType::kBf16 ? QuantizeT<true>(a, packs, stride, step, codes, err)
                               : QuantizeT<false>(a, packs, stride, step, codes, err);
}

// Bit planes with movemask: the low bytes of the 16 codes in the low half, the high bytes in
// the high half; shifting each 16-bit lane left by 7 - b puts bit b at the top of every byte.
KVPOOL_AVX2 uint64_t PackAvx2(const uint16_t* codes, uint64_t packs, uint8_t* out) {
  const uint64_t width_bytes = (packs + 1) / 2;
  uint8_t* wp = out;
  uint8_t* dp = wp + width_bytes;
  std::memset(wp, 0, width_bytes);
  const __m256i shuf = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (uint64_t k = 0; k < packs; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 16));
    __m128i o = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    o = _mm_or_si128(o, _mm_srli_si128(o, 8));
    o = _mm_or_si128(o, _mm_srli_si128(o, 4));
    o = _mm_or_si128(o, _mm_srli_si128(o, 2));
    const uint32_t all = uint32_t(_mm_cvtsi128_si32(o)) & 0xffffu;
    if (all == 0) continue;
    const uint32_t w = 32 - __builtin_clz(all);
    wp[k / 2] |= uint8_t(w << (4 * (k & 1)));
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, shuf), 0xD8);
    for (uint32_t b = 0; b < w && b < 8; ++b) {
      const uint32_t mask = uint32_t(_mm256_movemask_epi8(
          _mm256_sll_epi16(bytes, _mm_cvtsi32_si128(int(7 - b)))));
      std::memcpy(dp + 2 * b, &mask, 2);
      if (b + 8 < w) std::memcpy(dp + 2 * (b + 8), reinterpret_cast<const uint8_t*>(&mask) + 2, 2);
    }
    dp += 2 * w;
  }
  return uint64_t(dp - out);
}

const internal::EncodeKernels& CpuKernels() {
  static const internal::EncodeKernels k = {&LoadAvx2,    &DotAvx2,      &AccumulateAvx2,
                                            &PredictAvx2, &ToPacksAvx2,  &QuantizeAvx2,
                                            &PackAvx2};
  return k;
}

// Decodes a coded payload (mode 1 or 2) whose head_dim is a multiple of 8.
__attribute__((target("avx2,fma,f16c"))) absl::Status DecodeAvx2(const SegmentShape& shape,
                                                         const internal::Parsed& parsed,
                                                         uint16_t* out) {
  using internal::kPack;
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t G = internal::Groups(T), R = parsed.coef_cols;
  const uint64_t HD = uint64_t{H} * D;
  internal::LowRank lr;
  absl::Status status = internal::DecodeLowRank(shape, parsed, &lr);
  const bool entropy = parsed.mode == internal::kModeEntropy;
  std::vector<int32_t> codes;  // Mode 3: the residual codes, decoded up front.
  if (status.ok() && entropy) status = internal::DecodeResidualCodes(shape, parsed, &codes);
  if (!status.ok()) return status;
  const std::vector<float>& means = lr.means;
  std::vector<float> steps;
  internal::TokenSteps(shape, parsed, &steps);
  const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const uint8_t* data = parsed.res_data;
  for (uint32_t g = 0; g < G; ++g) {
    const uint32_t n = std::min<uint32_t>(kPack, T - g * kPack);
    for (uint32_t h = 0; h < H; ++h) {
      const uint32_t r = parsed.ranks[h];
      const float* coef = &lr.coefficients[uint64_t{g} * kPack * R + lr.first_col[h]];
      for (uint32_t d0 = 0; d0 < D; d0 += 8) {
        const uint64_t c0 = uint64_t{h} * D + d0;
        alignas(32) int32_t planes[internal::kMaxWidth][8] = {};
        uint32_t wmax = 0;
        for (uint32_t l = 0; l < 8 && !entropy; ++l) {
          const uint64_t k = uint64_t{g} * HD + c0 + l;
          const uint32_t w = (parsed.res_widths[k / 2] >> (4 * (k & 1))) & 15;
          for (uint32_t b = 0; b < w; ++b) planes[b][l] = internal::Load16(data + 2 * b);
          data += 2 * w;
          wmax = w > wmax ? w : wmax;
        }
        __m256i pv[internal::kMaxWidth];
        for (uint32_t b = 0; b < wmax; ++b) {
          pv[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes[b]));
        }
        const __m256 mean = _mm256_loadu_ps(&means[c0]);
        for (uint32_t i = 0; i < n; ++i) {
          __m256i u = zero;
          for (uint32_t b = 0; b < wmax; ++b) {
            u = _mm256_or_si256(u, _mm256_slli_epi32(_mm256_and_si256(pv[b], one), int(b)));
            pv[b] = _mm256_srli_epi32(pv[b], 1);
          }
          const __m256i q =
              entropy ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                            &codes[(uint64_t{g} * kPack + i) * HD + c0]))
                      : _mm256_xor_si256(_mm256_srli_epi32(u, 1),
                                         _mm256_sub_epi32(zero, _mm256_and_si256(u, one)));
          __m256 p = mean;
          const float* ct = coef + uint64_t{i} * R;
          for (uint32_t j = 0; j < r; ++j) {
            const __m256 b = _mm256_loadu_ps(&lr.basis[(uint64_t{h} * internal::kMaxRank + j) * D + d0]);
            p = _mm256_add_ps(p, _mm256_mul_ps(_mm256_set1_ps(ct[j]), b));
          }
          const __m256 vstep = _mm256_set1_ps(steps[(uint64_t{g} * kPack + i) * H + h]);
          const __m256 y = _mm256_add_ps(p, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vstep));
          Store8(shape.dtype, y, out + (uint64_t{g} * kPack + i) * HD + c0);
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  return EncodeCpu(shape, params, in, LayerKeys{}, out, capacity);
}

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, const LayerKeys& keys, uint8_t* out,
                                   uint64_t capacity) {
  if (!CpuHasAvx2()) return EncodeRef(shape, params, in, keys, out, capacity);
  if (!(params.budget > 0 && params.budget < 1)) {
    return absl::InvalidArgumentError("kvpool: budget must be in (0, 1)");
  }
  if (params.flags & internal::kFlagFast) {
    return internal::FastEncode(shape, params, in, keys, internal::FastCpuKernels(), out, capacity);
  }
  if (IsKvpoolRowsMode(params)) {
    return internal::EncodeRows(shape, params, in, keys, internal::FastCpuKernels(),
                                internal::CpuRowKernels(shape.head_dim), out, capacity);
  }
  thread_local Analysis a;  // Scratch reused by this thread's encodes (a few MiB at most).
  internal::Analyze(shape, params, in, keys, CpuKernels(), &a);
  return internal::FinishEncode(shape, params, in, CpuKernels(), &a, out, capacity);
}

absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out) {
  if (size > 0 && payload[0] == internal::kModeRows) {
    return internal::DecodeRows(shape, payload, size, /*fast=*/true, out);
  }
  if (!CpuHasAvx2() || shape.head_dim % 8 != 0) {
    return DecodeRef(shape, params, payload, size, out);
  }
  internal::Parsed parsed;
  absl::Status s = internal::ParsePayload(shape, payload, size, &parsed);
  if (!s.ok()) return s;
  if (parsed.mode == internal::kModeRaw) {
    std::memcpy(out, parsed.raw, shape.Bytes());  // Little-endian host.
    return absl::OkStatus();
  }
  if (internal::DecodePacksAvx512(shape, parsed, out)) return absl::OkStatus();
  if (internal::DecodePacksAvx2(shape, parsed, out)) return absl::OkStatus();
  s = internal::DecodeEntropyAvx512(shape, parsed, out);
  if (!absl::IsUnimplemented(s)) return s;
  return DecodeAvx2(shape, parsed, out);
}

}  // namespace kvpool::kernels::kvpool
