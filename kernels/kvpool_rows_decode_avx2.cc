// The kvpool codec's payload mode 4 decoder on AVX2 with FMA and F16C (kvpool_rows.cc defines
// the format), for CPUs without the AVX-512 that kvpool_rows_decode_avx512.cc needs (AMD before
// Zen 4, Intel before Ice Lake): bit-identical to DecodeRowsRef, for head_dim a multiple of 32.
// A row's codes come from its planes 32 channels at a time as bytes: each plane's 32-bit word
// spread to one byte per channel (vpshufb, then a compare against each byte's bit), summed by
// Horner's rule (u = 2u + bit); the outlier channels' extra planes are added per channel. The
// prediction and the output are the reference's float operations, 8 channels at a time. Like
// the AVX-512 decoder it goes token after token, a pointer per head, so the output streams out
// in order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/kvpool_rows.h"
#include "kernels/simd_avx2.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

// Per-segment tables, kept per thread.
struct Avx2Scratch {
  std::vector<int16_t> coefs;       // [H][kMaxRank][T16], T16 = T rounded up to 16.
  std::vector<int32_t> pair_coefs;  // [H][4][T]: (code 2i, code 2i + 1) of token t.
  std::vector<float> means;         // [H][D]
  AlignedVector<int16_t> pairs;     // [H][D / 16][4][16][2] (PairSlot's layout)
  std::vector<uint16_t> outliers;   // [H][32] outlier channels
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
      s->outliers[uint64_t{h} * kMaxOutliers + k] = Load16(parsed.outliers + 2 * (hd.outlier + k));
    }
  }
}

// u = 2u + bit, per byte, over planes [from, to) downwards: byte i of the chunk's 32 channels
// takes bit i of each plane's 32-bit word (plane p at row + p * pd).
KVPOOL_AVX2 inline __m256i Horner(const uint8_t* row, uint64_t pd, uint32_t from, uint32_t to) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
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

// Decodes one row (meta, its data at `row`, its coefficient pairs c[i * pitch]) into o. `adj`
// (D entries, zero) takes the outlier channels' extra planes for the row and is zero again
// after it.
template <bool kBf16, uint32_t R>
KVPOOL_AVX2 void DecodeRowAvx2(const ParsedRows::Head& hd, const Avx2Scratch& s, uint32_t h,
                               uint32_t D, uint8_t meta, const uint8_t* row, const int32_t* c,
                               uint64_t pitch, int32_t* adj, uint16_t* o) {
  const uint32_t b = meta & 15;
  const uint64_t pd = D / 8;
  const uint16_t* outlier = &s.outliers[uint64_t{h} * kMaxOutliers];
  if (hd.outliers) {  // Outlier k's extra planes: +-2^(b + q), bit k of extra plane q.
    const uint64_t ob = PlaneBytes(hd.outliers);
    const uint8_t* extra = row + b * pd;
    for (uint32_t k = 0; k < hd.outliers; ++k) {
      int32_t add = 0;
      for (uint32_t q = 0; q < hd.extra; ++q) {
        add += PlaneBit(extra + q * ob, k) ? (1 << (b + q)) : -(1 << (b + q));
      }
      adj[outlier[k]] = add;
    }
  }
  const __m256i top = _mm256_set1_epi32((1 << b) - 1);
  const __m256 vhs = _mm256_set1_ps(RowHalfStep(hd.unit, meta));
  const __m256 scale = _mm256_set1_ps(hd.lr_scale);
  const float* m = &s.means[uint64_t{h} * D];
  const int16_t* pairs = &s.pairs[uint64_t{h} * kMaxRank * D];
  __m256i bc[4];
  for (uint32_t i = 0; i < (R + 1) / 2; ++i) bc[i] = _mm256_set1_epi32(c[i * pitch]);
  for (uint32_t ch = 0; ch < D / 32; ++ch) {
    // u, the regular planes' code of the chunk's 32 channels, as bytes (high bytes past 8).
    const uint8_t* at = row + 4 * ch;
    const __m256i lo = Horner(at, pd, 0, std::min(b, 8u));
    const __m256i hi = b > 8 ? Horner(at, pd, 8, b) : _mm256_setzero_si256();
    alignas(32) uint8_t bytes[64];
    _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bytes + 32), hi);
    for (uint32_t g = 0; g < 4; ++g) {
      const uint32_t d = 32 * ch + 8 * g;
      __m256i u =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * g)));
      if (b > 8) {
        u = _mm256_or_si256(
            u, _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                     reinterpret_cast<const __m128i*>(bytes + 32 + 8 * g))),
                                 8));
      }
      __m256i n = _mm256_sub_epi32(_mm256_add_epi32(u, u), top);  // 2u - (2^b - 1)
      if (hd.outliers)
        n = _mm256_add_epi32(n, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(adj + d)));
      __m256i P = _mm256_setzero_si256();
      const int16_t* slot = pairs + PairSlot(d, 0);  // Channels d .. d + 7, pair i at + 32 i.
      for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
        P = _mm256_add_epi32(
            P, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(slot + 32 * i)),
                                 bc[i]));
      }
      const __m256 z = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(P), _mm256_loadu_ps(m + d));
      simd::Store8<kBf16>(o + d, _mm256_fmadd_ps(vhs, _mm256_cvtepi32_ps(n), z));
    }
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
  alignas(32) int32_t adj[512] = {};  // kMaxDim of the fast paths (head_dim checked below).
  ForEachRowTokenMajor(shape, parsed, out,
                       [&](uint32_t h, uint32_t t, uint8_t meta, const uint8_t* row, uint16_t* o) {
                         fns[h](parsed.heads[h], s, h, D, meta, row,
                                &s.pair_coefs[uint64_t{h} * 4 * T + t], T, adj, o);
                       });
}

}  // namespace

bool DecodeRowsAvx2(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  if (!CpuHasAvx2() || shape.head_dim % 32 != 0 || shape.head_dim > 512 || shape.tokens == 0) {
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
