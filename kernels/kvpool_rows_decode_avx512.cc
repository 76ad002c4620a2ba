// The kvpool codec's payload mode 4 decoder on AVX-512 (kvpool_rows.cc defines the format):
// bit-identical to DecodeRowsRef, for head_dim a multiple of 32. Compiled twice: as itself, for
// AVX-512 F/BW/VL/DQ/VBMI, and from kvpool_rows_decode_vnni.cc with KVPOOL_ROWS_VNNI defined, for
// CPUs with AVX-512 VNNI, whose vpdpwssd forms the integer prediction in one instruction per
// pair of directions instead of two (the same integers either way). Per segment: the
// coefficient codes from their planes, the means as floats and the basis codes in pairs; then
// token after token, head after head (the output streams out in order), each head's rows
// (head-major in the payload) read through a pointer of their own. Under a StreamingOutput
// (codec.h) it writes a 16-byte aligned output with streaming stores (StoreOut).
// GCC 12 warns of its own intrinsics headers (their undefined-value helpers) once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/kvpool_avx512.h"
#include "kernels/kvpool_rows.h"

#ifdef KVPOOL_ROWS_VNNI
#define KVPOOL_ROWS_TARGET                                                         \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq,gfni,f16c,bmi2,lzcnt," \
             "prfchw,avx512vnni")))
#define KVPOOL_ROWS_DECODE DecodeRowsAvx512Vnni
#else
#define KVPOOL_ROWS_TARGET KVPOOL_AVX512
#define KVPOOL_ROWS_DECODE DecodeRowsAvx512Base
#endif

namespace kvpool::kernels::kvpool::internal {
namespace {

// acc + the dot products of the int16 pairs of a and b, per 32-bit lane.
KVPOOL_ROWS_TARGET inline __m512i PairDot(__m512i acc, __m512i a, __m512i b) {
#ifdef KVPOOL_ROWS_VNNI
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// Up to 32 bits of a bit plane of `bytes` bytes, starting at bit 8 * byte (zero beyond it). A
// plane's last bytes are put together in a register: copied to memory byte by byte and read back
// as a word, they stalled on store forwarding (a tenth of the decode).
inline uint32_t Bits32(const uint8_t* plane, uint64_t bytes, uint64_t byte) {
  if (byte + 4 <= bytes) {
    uint32_t v;
    std::memcpy(&v, plane + byte, 4);
    return v;
  }
  uint32_t v = 0;
  for (uint64_t i = byte; i < bytes; ++i) v |= uint32_t(plane[i]) << (8 * (i - byte));
  return v;
}

// How StoreOut writes: plain stores, or streaming (non-temporal) ones of 32 bytes (o 32-byte
// aligned) or of twice 16 (16-byte aligned; large buffers from malloc lie at 16 mod 32). See
// StreamingOutput in codec.h.
enum class Stores { kPlain, kStream32, kStream16 };

// 16 elements to o.
KVPOOL_ROWS_TARGET inline void StoreOut(uint16_t* o, __m256i y, Stores stores) {
  switch (stores) {
    case Stores::kPlain:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), y);
      break;
    case Stores::kStream32:
      _mm256_stream_si256(reinterpret_cast<__m256i*>(o), y);
      break;
    case Stores::kStream16:
      _mm_stream_si128(reinterpret_cast<__m128i*>(o), _mm256_castsi256_si128(y));
      _mm_stream_si128(reinterpret_cast<__m128i*>(o + 8), _mm256_extracti128_si256(y, 1));
      break;
  }
}

// Per-segment tables of the decoder, kept per thread.
struct DecodeScratch {
  std::vector<int16_t> coefs;       // [H][kMaxRank][T32] codes, T32 = T rounded up to 32.
  std::vector<int32_t> pair_coefs;  // [H][4][T32]: (code 2i, code 2i + 1) of token t.
  std::vector<float> means;         // [H][D]
  AlignedVector<int16_t> pairs;     // [H][D / 16][4][16][2] (RowHead::pairs' layout)
  std::vector<int16_t> index;       // [H][D / 32][32] lane -> outlier index (vpermw)
  std::vector<uint32_t> mask;       // [H][D / 32] outlier lanes
};

template <bool kBf16>
KVPOOL_ROWS_TARGET void Tables(const SegmentShape& shape, const ParsedRows& parsed,
                               DecodeScratch* s) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t T32 = (T + 31) / 32 * 32;
  const uint64_t pb = PlaneBytes(T);
  s->coefs.resize(uint64_t{H} * kMaxRank * T32);
  s->pair_coefs.resize(uint64_t{H} * 4 * T32);
  s->means.resize(uint64_t{H} * D);
  s->pairs.assign(uint64_t{H} * kMaxRank * D, 0);
  s->index.assign(uint64_t{H} * D, 0);
  s->mask.assign(uint64_t{H} * (D / 32), 0);
  for (uint32_t h = 0; h < H; ++h) {
    const ParsedRows::Head& hd = parsed.heads[h];
    const uint8_t* plane = parsed.coefs + hd.coef;
    for (uint32_t j = 0; j < hd.rank; ++j) {
      const uint32_t w = hd.widths[j];
      int16_t* c = &s->coefs[(uint64_t{h} * kMaxRank + j) * T32];
      for (uint32_t t = 0; t < T32; t += 32) {
        __m512i acc = _mm512_set1_epi16(w ? int16_t(-(1 << (w - 1))) : 0);
        for (uint32_t p = 0; p < w; ++p) {
          const __mmask32 bits = Bits32(plane + p * pb, pb, t / 8);
          acc = _mm512_mask_add_epi16(acc, bits, acc, _mm512_set1_epi16(int16_t(1 << p)));
        }
        _mm512_storeu_si512(c + t, acc);
      }
      plane += w * pb;
    }
    // Pairs of codes as the predictions take them.
    for (uint32_t i = 0; i < (hd.rank + 1) / 2; ++i) {
      const int16_t* lo = &s->coefs[(uint64_t{h} * kMaxRank + 2 * i) * T32];
      const int16_t* hi = lo + T32;
      int32_t* pc = &s->pair_coefs[(uint64_t{h} * 4 + i) * T32];
      const bool odd = 2 * i + 1 >= hd.rank;
      for (uint32_t t = 0; t < T32; t += 32) {
        const __m512i a = _mm512_loadu_si512(lo + t);
        const __m512i b = odd ? _mm512_setzero_si512() : _mm512_loadu_si512(hi + t);
        // Interleave by 16-bit lanes: unpack within 128-bit lanes, then put them in order.
        const __m512i l = _mm512_unpacklo_epi16(a, b), u = _mm512_unpackhi_epi16(a, b);
        _mm512_storeu_si512(
            pc + t, _mm512_permutex2var_epi64(l, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), u));
        _mm512_storeu_si512(pc + t + 16, _mm512_permutex2var_epi64(
                                             l, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), u));
      }
    }
    for (uint32_t d = 0; d < D; d += 16) {
      const __m256i e = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(parsed.means + 2 * (uint64_t{h} * D + d)));
      _mm512_storeu_ps(&s->means[uint64_t{h} * D + d], ToFloats<kBf16>(e));
    }
    const int8_t* basis = reinterpret_cast<const int8_t*>(parsed.basis + hd.basis);
    int16_t* pairs = &s->pairs[uint64_t{h} * kMaxRank * D];
    FillPairs(basis, hd.rank, D, pairs);
    for (uint32_t k = 0; k < hd.outliers; ++k) {
      const uint32_t d = Load16(parsed.outliers + 2 * (hd.outlier + k));
      s->index[uint64_t{h} * D + d] = int16_t(k);
      s->mask[uint64_t{h} * (D / 32) + d / 32] |= 1u << (d % 32);
    }
  }
}

// Decodes one row: meta, its data at `row`, its coefficient codes c[j * pitch] (j < R), into
// the D elements at o (StoreOut's `stores`); `h` the head's index in the scratch tables.
template <bool kBf16, uint32_t R>
KVPOOL_ROWS_TARGET void DecodeRow(const ParsedRows::Head& hd, const DecodeScratch& s, uint32_t h,
                                  uint32_t D, uint8_t meta, const uint8_t* row, const int32_t* c,
                                  uint64_t pitch, uint16_t* o, Stores stores) {
  const uint32_t b = meta & 15, chunks = D / 32;
  const uint64_t pd = D / 8;
  const __m512 vhs = _mm512_set1_ps(RowHalfStep(hd.unit, meta));
  const __m512 scale = _mm512_set1_ps(hd.lr_scale);
  const float* m = &s.means[uint64_t{h} * D];
  const int16_t* pairs = &s.pairs[uint64_t{h} * 8 * D];
  __m512i bc[4];
  for (uint32_t i = 0; i < (R + 1) / 2; ++i) bc[i] = _mm512_set1_epi32(c[i * pitch]);
  // The outlier channels' high planes, outlier k in lane k.
  __m512i adj = _mm512_setzero_si512();
  if (hd.outliers) {
    const uint64_t ob = PlaneBytes(hd.outliers);
    adj = _mm512_set1_epi16(int16_t(-((1 << (b + hd.extra)) - (1 << b))));
    const uint8_t* planes = row + b * pd;
    for (uint32_t q = 0; q < hd.extra; ++q) {
      const __mmask32 bits = Bits32(planes + q * ob, ob, 0);
      adj = _mm512_mask_add_epi16(adj, bits, adj, _mm512_set1_epi16(int16_t(1 << (b + q + 1))));
    }
  }
  for (uint32_t ch = 0; ch < chunks; ++ch) {
    if (b == 0 && (!hd.outliers || s.mask[uint64_t{h} * chunks + ch] == 0)) {
      // No planes: fma(hs, 0, z) is z + 0 (-0 becomes +0 alike).
      for (uint32_t half = 0; half < 2; ++half) {
        const uint32_t k = 2 * ch + half;
        __m512i P = _mm512_setzero_si512();
        for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
          P = PairDot(P, _mm512_load_si512(pairs + 128 * k + 32 * i), bc[i]);
        }
        const __m512 zv =
            _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(P), _mm512_loadu_ps(m + 16 * k));
        const __m256i y = FromFloats<kBf16>(_mm512_add_ps(zv, _mm512_setzero_ps()));
        StoreOut(o + 16 * k, y, stores);
      }
      continue;
    }
    __m512i n = _mm512_set1_epi16(int16_t(-((1 << b) - 1)));
    for (uint32_t p = 0; p < b; ++p) {
      uint32_t bits;
      std::memcpy(&bits, row + p * pd + 4 * ch, 4);
      n = _mm512_mask_add_epi16(n, bits, n, _mm512_set1_epi16(int16_t(1 << (p + 1))));
    }
    if (hd.outliers) {
      const uint64_t at = uint64_t{h} * chunks + ch;
      const __m512i index = _mm512_loadu_si512(&s.index[at * 32]);
      n = _mm512_mask_add_epi16(n, s.mask[at], n, _mm512_permutexvar_epi16(index, adj));
    }
    for (uint32_t half = 0; half < 2; ++half) {
      const uint32_t k = 2 * ch + half;
      const __m256i nh = half ? _mm512_extracti64x4_epi64(n, 1) : _mm512_castsi512_si256(n);
      const __m512 nf = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(nh));
      __m512i P = _mm512_setzero_si512();
      for (uint32_t i = 0; i < (R + 1) / 2; ++i) {
        P = PairDot(P, _mm512_load_si512(pairs + 128 * k + 32 * i), bc[i]);
      }
      const __m512 zv = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(P), _mm512_loadu_ps(m + 16 * k));
      const __m256i y = FromFloats<kBf16>(_mm512_fmadd_ps(vhs, nf, zv));
      StoreOut(o + 16 * k, y, stores);
    }
  }
}

// Token after token, head after head, so that the output streams out in order; each head's rows
// (head-major in the payload) are read through a pointer of their own.
template <bool kBf16>
KVPOOL_ROWS_TARGET void DecodeT(const SegmentShape& shape, const ParsedRows& parsed,
                                uint16_t* out) {
  thread_local DecodeScratch s;
  using RowFn = decltype(&DecodeRow<kBf16, 0>);
  thread_local std::vector<RowFn> fns;
  Tables<kBf16>(shape, parsed, &s);
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint32_t T32 = (T + 31) / 32 * 32;
  fns.resize(H);
  for (uint32_t h = 0; h < H; ++h) {
    fns[h] =
        ForRank(parsed.heads[h].rank, [](auto R) { return &DecodeRow<kBf16, decltype(R)::value>; });
  }
  const uintptr_t at = reinterpret_cast<uintptr_t>(out);
  const Stores stores = !StreamingOutput::Wanted() || at % 16 != 0 ? Stores::kPlain
                        : at % 32 == 0                             ? Stores::kStream32
                                                                   : Stores::kStream16;
  ForEachRowTokenMajor(shape, parsed, out,
                       [&](uint32_t h, uint32_t t, uint8_t meta, const uint8_t* row, uint16_t* o) {
                         fns[h](parsed.heads[h], s, h, D, meta, row,
                                &s.pair_coefs[uint64_t{h} * 4 * T32 + t], T32, o, stores);
                       });
  if (stores != Stores::kPlain)
    _mm_sfence();  // Streaming stores are weakly ordered: order them before return.
}

}  // namespace

bool KVPOOL_ROWS_DECODE(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  if (shape.dtype == DType::kBf16) {
    DecodeT<true>(shape, parsed, out);
  } else {
    DecodeT<false>(shape, parsed, out);
  }
  return true;
}

}  // namespace kvpool::kernels::kvpool::internal
