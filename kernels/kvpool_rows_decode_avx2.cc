// The kvpool codec's payload mode 4 decoder on AVX2 with FMA and F16C (kvpool_rows.cc defines
// the format), for CPUs without the AVX-512 that kvpool_rows_decode_avx512.cc needs (AMD before
// Zen 4, Intel before Ice Lake): bit-identical to DecodeRowsRef, for head_dim a multiple of 32
// up to 512. A row's codes come from its planes 32 channels at a time as bytes: each plane's
// 32-bit word spread to one byte per channel (vpshufb, then a compare against each byte's bit),
// summed by Horner's rule (u = 2u + bit), the bytes laid out so that one more vpshufb widens 8
// channels to 32-bit lanes. The outlier channels' extra planes are summed 8 outliers at a time
// and added only to the groups of 8 channels that hold one. The prediction and the output are
// the reference's float operations, 8 channels at a time. Like the AVX-512 decoder it goes
// token after token, a pointer per head, so the output streams out in order, and under a
// StreamingOutput (codec.h) writes a 16-byte aligned output with streaming stores.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/kvpool_rows.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr uint32_t kMaxDim = kAvx2MaxHeadDim;  // (kvpool_rows.h)

// Per-segment tables, kept per thread.
struct Avx2Scratch {
  std::vector<int16_t> coefs;       // [H][kMaxRank][T16], T16 = T rounded up to 16.
  std::vector<int32_t> pair_coefs;  // [H][4][T]: (code 2i, code 2i + 1) of token t.
  std::vector<float> means;         // [H][D]
  AlignedVector<int16_t> pairs;     // [H][D / 16][4][16][2] (PairSlot's layout)
  std::vector<uint16_t> outliers;   // [H][32] outlier channels
  std::vector<uint64_t> groups;     // [H]: bit k set when channels 8k .. 8k + 7 hold an outlier.
};

template <bool kBf16>
KVPOOL_AVX2 void Avx2Tables(const SegmentShape& shape, const ParsedRows& parsed, Avx2Scratch* s) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t T16 = (T + 15) / 16 * 16;
  const uint64_t pb = PlaneBytes(T);
  s->coefs.assign(uint64_t{H} * kMaxRank * T16, 0);
  s->pair_coefs.resize(uint64_t{H} * 4 * T);
  s->means.resize(uint64_t{H} * D);
  s->pairs.assign(uint64_t{H} * kMaxRank * D, 0);
  s->outliers.assign(uint64_t{H} * kMaxOutliers, 0);
  s->groups.assign(H, 0);
  for (uint32_t h = 0; h < H; ++h) {
    const ParsedRows::Head& hd = parsed.heads[h];
    // Coefficient codes, 16 tokens at a time: plane p's 16 bits spread to one lane per token
    // (-1 where set), summed by Horner's rule from the top plane, less 2^(w - 1).
    const __m256i lane = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                           8192, 16384, -32768);
    const uint8_t* plane = parsed.coefs + hd.coef;
    for (uint32_t j = 0; j < hd.rank; ++j) {
      const uint32_t w = hd.widths[j];
      int16_t* c = &s->coefs[(uint64_t{h} * kMaxRank + j) * T16];
      for (uint32_t t = 0; t < T; t += 16) {
        __m256i acc = _mm256_setzero_si256();
        for (uint32_t p = w; p-- > 0;) {
          const uint8_t* at = plane + p * pb + t / 8;
          uint16_t bits = at[0];  // A plane of T = 8 (mod 16) ends a byte short of 16 bits.
          if (t / 8 + 1 < pb) bits = uint16_t(bits | at[1] << 8);
          const __m256i v = _mm256_and_si256(_mm256_set1_epi16(int16_t(bits)), lane);
          acc = _mm256_sub_epi16(_mm256_add_epi16(acc, acc), _mm256_cmpeq_epi16(v, lane));
        }
        if (w > 0) acc = _mm256_sub_epi16(acc, _mm256_set1_epi16(int16_t(1 << (w - 1))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + t), acc);
      }
      plane += w * pb;
    }
    for (uint32_t i = 0; i < 4; ++i) {
      const int16_t* lo = &s->coefs[(uint64_t{h} * kMaxRank + 2 * i) * T16];
      int32_t* pc = &s->pair_coefs[(uint64_t{h} * 4 + i) * T];
      for (uint32_t t = 0; t < T; ++t) {
        pc[t] = int32_t(uint32_t(uint16_t(lo[t])) | (uint32_t(uint16_t(lo[T16 + t])) << 16));
      }
    }
    for (uint32_t d = 0; d < D; d += 8) {
      const uint16_t* m = reinterpret_cast<const uint16_t*>(parsed.means) + uint64_t{h} * D + d;
      uint16_t e[8];
      std::memcpy(e, m, sizeof e);  // The payload's means need not be 2-byte aligned.
      _mm256_storeu_ps(&s->means[uint64_t{h} * D + d], simd::Load8<kBf16>(e));
    }
    const int8_t* basis = reinterpret_cast<const int8_t*>(parsed.basis + hd.basis);
    int16_t* pairs = &s->pairs[uint64_t{h} * kMaxRank * D];
    FillPairs(basis, hd.rank, D, pairs);
    for (uint32_t k = 0; k < hd.outliers; ++k) {
      const uint16_t d = Load16(parsed.outliers + 2 * (hd.outlier + k));
      s->outliers[uint64_t{h} * kMaxOutliers + k] = d;
      s->groups[h] |= uint64_t{1} << (d / 8);
    }
  }
}

// u = 2u + bit, per byte, over planes [from, to) downwards, for the 32 channels of one 32-bit
// word of each plane (plane p at row + p * pd). The bytes are in "group order": 128-bit lane L,
// byte 4g + i holds channel 8g + 4L + i, so that one in-lane vpshufb (Widen) turns group g's
// bytes into its 8 channels as 32-bit lanes, in channel order.
KVPOOL_AVX2 inline __m256i Horner(const uint8_t* row, uint64_t pd, uint32_t from, uint32_t to) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0, 0, 0,
                                          0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 16, 32, 64,
                                       -128, 16, 32, 64, -128, 16, 32, 64, -128, 16, 32, 64, -128);
  __m256i u = _mm256_setzero_si256();
  for (uint32_t p = to; p-- > from;) {
    int32_t word;
    std::memcpy(&word, row + p * pd, 4);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(word), spread);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);  // -1 where set
    u = _mm256_sub_epi8(_mm256_add_epi8(u, u), set);
  }
  return u;
}

// Group g's 8 channels of Horner's bytes, zero-extended to 32 bits in channel order.
template <uint32_t g>
KVPOOL_AVX2 inline __m256i Widen(__m256i bytes) {
  constexpr char z = char(0x80), b = char(4 * g);
  return _mm256_shuffle_epi8(
      bytes, _mm256_setr_epi8(b, z, z, z, char(b + 1), z, z, z, char(b + 2), z, z, z, char(b + 3),
                              z, z, z, b, z, z, z, char(b + 1), z, z, z, char(b + 2), z, z, z,
                              char(b + 3), z, z, z));
}

// 8 elements to o: with a streaming (non-temporal) store when `stream` (o 16-byte aligned; see
// StreamingOutput in codec.h).
template <bool kBf16>
KVPOOL_AVX2 inline void StoreOut(uint16_t* o, __m256 v, bool stream) {
  if (stream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(o), simd::FromFloats8<kBf16>(v));
  } else {
    simd::Store8<kBf16>(o, v);
  }
}

// Decodes one row (meta, its data at `row`, its coefficient pairs c[i * pitch]) into o. `adj`
// (D entries, zero) takes the outlier channels' extra planes for the row and is zero again
// after it; `groups` has bit k set when channels 8k .. 8k + 7 hold an outlier channel.
template <bool kBf16, uint32_t R>
KVPOOL_AVX2 void DecodeRowAvx2(const ParsedRows::Head& hd, const Avx2Scratch& s, uint32_t h,
                               uint32_t D, uint8_t meta, const uint8_t* row, const int32_t* c,
                               uint64_t pitch, int32_t* adj, uint16_t* o, bool stream) {
  const uint32_t b = meta & 15;
  const uint64_t pd = D / 8;
  const uint16_t* outlier = &s.outliers[uint64_t{h} * kMaxOutliers];
  const uint64_t groups = s.groups[h];
  if (hd.outliers) {
    // Outlier k's extra planes, 8 outliers at a time: -(2^(b + E) - 2^b) plus 2^(b + q + 1)
    // for each set bit k of extra plane q (the sum of +-2^(b + q)), then put at its channel.
    const uint64_t ob = PlaneBytes(hd.outliers);
    const uint8_t* extra = row + b * pd;
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    alignas(32) int32_t add[kMaxOutliers];
    for (uint32_t k = 0; k < hd.outliers; k += 8) {
      __m256i a = _mm256_set1_epi32(-((1 << (b + hd.extra)) - (1 << b)));
      for (uint32_t q = 0; q < hd.extra; ++q) {
        const __m256i v = _mm256_and_si256(_mm256_set1_epi32(extra[q * ob + k / 8]), lane);
        a = _mm256_add_epi32(
            a, _mm256_and_si256(_mm256_cmpeq_epi32(v, lane), _mm256_set1_epi32(1 << (b + q + 1))));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(add + k), a);
    }
    for (uint32_t k = 0; k < hd.outliers; ++k) adj[outlier[k]] = add[k];
  }
  const __m256i top = _mm256_set1_epi32((1 << b) - 1);
  const __m256 vhs = _mm256_set1_ps(RowHalfStep(hd.unit, meta));
  const __m256 scale = _mm256_set1_ps(hd.lr_scale);
  const float* m = &s.means[uint64_t{h} * D];
  const int16_t* pairs = &s.pairs[uint64_t{h} * kMaxRank * D];
  __m256i bc[4];
  for (uint32_t i = 0; i < (R + 1) / 2; ++i) bc[i] = _mm256_set1_epi32(c[i * pitch]);
  // Group g (channels d .. d + 7) of the chunk whose codes are lo (+ hi << 8).
  const auto group = [&](auto gc, uint32_t ch, __m256i lo, __m256i hi) KVPOOL_AVX2 {
    constexpr uint32_t g = decltype(gc)::value;
    const uint32_t d = 32 * ch + 8 * g;
    __m256i u = Widen<g>(lo);
    if (b > 8) u = _mm256_or_si256(u, _mm256_slli_epi32(Widen<g>(hi), 8));
    __m256i n = _mm256_sub_epi32(_mm256_add_epi32(u, u), top);  // 2u - (2^b - 1)
    if ((groups >> (d / 8)) & 1) {
      n = _mm256_add_epi32(n, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(adj + d)));
    }
    const int16_t* slot = pairs + PairSlot(d, 0);  // Channels d .. d + 7, pair i at + 32 i.
    __m256i P = _mm256_setzero_si256();
    for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
      P = _mm256_add_epi32(
          P, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(slot + 32 * i)),
                               bc[i]));
    }
    const __m256 z = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(P), _mm256_loadu_ps(m + d));
    StoreOut<kBf16>(o + d, _mm256_fmadd_ps(vhs, _mm256_cvtepi32_ps(n), z), stream);
  };
  for (uint32_t ch = 0; ch < D / 32; ++ch) {
    const uint8_t* at = row + 4 * ch;
    const __m256i lo = Horner(at, pd, 0, std::min(b, 8u));
    const __m256i hi = b > 8 ? Horner(at, pd, 8, b) : _mm256_setzero_si256();
    group(std::integral_constant<uint32_t, 0>(), ch, lo, hi);
    group(std::integral_constant<uint32_t, 1>(), ch, lo, hi);
    group(std::integral_constant<uint32_t, 2>(), ch, lo, hi);
    group(std::integral_constant<uint32_t, 3>(), ch, lo, hi);
  }
  for (uint32_t k = 0; k < hd.outliers; ++k) adj[outlier[k]] = 0;
}

template <bool kBf16>
KVPOOL_AVX2 void DecodeAvx2T(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  thread_local Avx2Scratch s;
  using RowFn = decltype(&DecodeRowAvx2<kBf16, 0>);
  thread_local std::vector<RowFn> fns;
  Avx2Tables<kBf16>(shape, parsed, &s);
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  fns.resize(H);
  for (uint32_t h = 0; h < H; ++h) {
    fns[h] = ForRank(parsed.heads[h].rank,
                     [](auto R) { return &DecodeRowAvx2<kBf16, decltype(R)::value>; });
  }
  alignas(32) int32_t adj[kMaxDim] = {};
  const bool stream = StreamingOutput::Wanted() && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  ForEachRowTokenMajor(shape, parsed, out,
                       [&](uint32_t h, uint32_t t, uint8_t meta, const uint8_t* row, uint16_t* o) {
                         fns[h](parsed.heads[h], s, h, D, meta, row,
                                &s.pair_coefs[uint64_t{h} * 4 * T + t], T, adj, o, stream);
                       });
  if (stream) _mm_sfence();  // Streaming stores are weakly ordered: order them before return.
}

}  // namespace

bool DecodeRowsAvx2(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  if (!CpuHasAvx2() || shape.head_dim % 32 != 0 || shape.head_dim > kMaxDim || shape.tokens == 0) {
    return false;
  }
  if (shape.dtype == DType::kBf16) {
    DecodeAvx2T<true>(shape, parsed, out);
  } else {
    DecodeAvx2T<false>(shape, parsed, out);
  }
  return true;
}

}  // namespace kvpool::kernels::kvpool::internal
