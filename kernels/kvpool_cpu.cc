// The kvpool codec, fast CPU path: AVX2/F16C residual quantisation and decoding, chosen at run
// time; the analysis (means, low-rank basis) is the reference's. Decoding is bit-identical to
// the reference (multiply and add kept separate, round to nearest even), and the encoder writes
// the reference's payload (same step search, same error summation order).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "common/half.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_format.h"

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

__attribute__((target("avx2,fma,f16c"))) bool QuantizeAvx2(const SegmentShape& shape,
                                                           const Analysis& a, float step,
                                                           std::vector<int32_t>* codes,
                                                           double* err) {
  const uint64_t N = shape.Elements();
  codes->assign(uint64_t{internal::Groups(shape.tokens)} * internal::kPack * shape.kv_heads *
                    shape.head_dim, 0);
  const __m256 vstep = _mm256_set1_ps(step), vmax = _mm256_set1_ps(internal::kMaxCode);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  uint64_t i = 0;
  for (; i + 8 <= N; i += 8) {
    const __m256 x = _mm256_loadu_ps(&a.x[i]), p = _mm256_loadu_ps(&a.prediction[i]);
    const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, p), vstep),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), vmax, _CMP_LE_OQ)) != 0xff) {
      return false;
    }
    const __m256i q = _mm256_cvtps_epi32(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&(*codes)[i]), q);
    const __m256 y = RoundTrip(shape.dtype, _mm256_add_ps(p, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vstep)));
    const __m256 diff = _mm256_sub_ps(y, x);
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(diff));
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(diff, 1));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(d0, d0));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(d1, d1));
  }
  double sums[8];
  _mm256_storeu_pd(sums, acc0);
  _mm256_storeu_pd(sums + 4, acc1);
  for (; i < N; ++i) {
    const float v = std::nearbyint((a.x[i] - a.prediction[i]) / step);
    if (!(std::fabs(v) <= internal::kMaxCode)) return false;
    const int32_t q = int32_t(v);
    (*codes)[i] = q;
    const float y = internal::ToFloat(
        shape.dtype, internal::FromFloat(shape.dtype, a.prediction[i] + float(q) * step));
    const float diff = y - a.x[i];
    sums[i % 8] += double(diff) * double(diff);
  }
  *err = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
  return std::isfinite(*err);
}

// Decodes a coded payload whose head_dim is a multiple of 8.
__attribute__((target("avx2,fma,f16c"))) void DecodeAvx2(const SegmentShape& shape,
                                                         const internal::Parsed& parsed,
                                                         uint16_t* out) {
  using internal::kPack;
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t G = internal::Groups(T), R = parsed.coef_cols;
  const uint64_t HD = uint64_t{H} * D;
  internal::LowRank lr;
  internal::DecodeLowRank(shape, parsed, &lr);
  std::vector<float> means(HD);
  for (uint64_t c = 0; c < HD; ++c) {
    means[c] = internal::ToFloat(shape.dtype, internal::Load16(parsed.means + 2 * c));
  }
  const __m256 vstep = _mm256_set1_ps(parsed.step);
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
        for (uint32_t l = 0; l < 8; ++l) {
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
          const __m256i q = _mm256_xor_si256(_mm256_srli_epi32(u, 1),
                                             _mm256_sub_epi32(zero, _mm256_and_si256(u, one)));
          __m256 p = mean;
          const float* ct = coef + uint64_t{i} * R;
          for (uint32_t j = 0; j < r; ++j) {
            const __m256 b = _mm256_loadu_ps(&lr.basis[(uint64_t{h} * internal::kMaxRank + j) * D + d0]);
            p = _mm256_add_ps(p, _mm256_mul_ps(_mm256_set1_ps(ct[j]), b));
          }
          const __m256 y = _mm256_add_ps(p, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vstep));
          Store8(shape.dtype, y, out + (uint64_t{g} * kPack + i) * HD + c0);
        }
      }
    }
  }
}

}  // namespace

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  if (!CpuHasAvx2()) return EncodeRef(shape, params, in, out, capacity);
  if (!(params.budget > 0 && params.budget < 1)) {
    return absl::InvalidArgumentError("kvpool: budget must be in (0, 1)");
  }
  Analysis a;
  internal::Analyze(shape, params, in, &a);
  return internal::FinishEncode(shape, params, in, &a, &QuantizeAvx2, out, capacity);
}

absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out) {
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
  DecodeAvx2(shape, parsed, out);
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kvpool
