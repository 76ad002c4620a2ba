// Sixteen lanes of an entropy stream decoded together on AVX-512 (kvpool_entropy.h defines
// the format and DecodeLane the decoding): element i of each vector is lane l0 + i's state,
// position and codes. A step takes a column of every lane at once: one gather of the table
// slots, and one masked gather of the refill words for the lanes whose state fell below 2^16;
// escapes (rare) and the low bits of shifted columns are masked steps of the same kind. The
// sixteen codes of a lane's row are a column of the sixteen steps' vectors: a 16 x 16
// transpose writes them as rows. The arithmetic is DecodeLane's, integer only, so the codes
// are identical; a lane that would fail there fails here.
// GCC 12 warns of its own intrinsics headers (their undefined-value helpers) once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <cstddef>

#include "kernels/kvpool_entropy.h"

#define KVPOOL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr uint32_t kWidth = 16;  // Lanes per vector.
static_assert(kLaneCols == 16, "a lane's row is one vector of codes");
static_assert(sizeof(DecodeTable) == 4 * (kProbScale + 1) && offsetof(DecodeTable, slot) == 4,
              "tables are gathered as one array of 32-bit words");

// The 16 x 16 transpose of 32-bit elements: r[j][i] -> r[i][j].
KVPOOL_AVX512 void Transpose(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  // In each 128-bit block b, u[4q + m] holds elements 4b + m of rows 4q .. 4q + 3.
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  // Row 4b + m gathers block b of u[m], u[4 + m], u[8 + m], u[12 + m].
  for (int m = 0; m < 4; ++m) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88);  // blocks 0, 2 of each
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
    const __m512i w0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd);  // blocks 1, 3 of each
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
    r[m] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(w0, w1, 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(v0, v1, 0xdd);
    r[12 + m] = _mm512_shuffle_i32x4(w0, w1, 0xdd);
  }
}

// The decoders of 16 lanes.
struct Lanes {
  __m512i x, pos, end;   // State; byte position and end of each lane's words in s.data.
  __mmask16 bad = 0;     // Lanes that ran out of words or decoded an invalid code.
  const uint8_t* words;  // s.data - 2: a word at pos is the high half of a dword at pos.
};

// Refills the lanes in `active` whose state fell below 2^16 (Advance's renormalisation).
KVPOOL_AVX512 inline void Refill(Lanes* l, __mmask16 active) {
  const __mmask16 need = _mm512_mask_cmplt_epu32_mask(active, l->x, _mm512_set1_epi32(kStateLow));
  if (need == 0) return;
  const __m512i next = _mm512_add_epi32(l->pos, _mm512_set1_epi32(2));
  const __mmask16 can = _mm512_mask_cmple_epu32_mask(need, next, l->end);
  l->bad |= need & ~can;
  const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), can, l->pos, l->words, 1);
  l->x = _mm512_mask_or_epi32(l->x, can, _mm512_slli_epi32(l->x, 16), _mm512_srli_epi32(w, 16));
  l->pos = _mm512_mask_mov_epi32(l->pos, can, next);
}

// DecodeUniform of `bits` (0-12 per lane; 0 leaves the state as it is and gives 0) for the
// lanes in `active`; the others keep their state and give 0.
KVPOOL_AVX512 inline __m512i Uniform(Lanes* l, __mmask16 active, __m512i bits) {
  const __m512i slot = _mm512_and_si512(l->x, _mm512_set1_epi32(kProbScale - 1));
  const __m512i keep = _mm512_sub_epi32(_mm512_set1_epi32(kProbBits), bits);
  const __m512i low = _mm512_sub_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(kProbScale), bits),
                                       _mm512_set1_epi32(1));
  const __m512i x = _mm512_add_epi32(_mm512_sllv_epi32(_mm512_srli_epi32(l->x, kProbBits), keep),
                                     _mm512_and_si512(slot, low));
  l->x = _mm512_mask_mov_epi32(l->x, active, x);
  Refill(l, active);
  return _mm512_maskz_srlv_epi32(active, slot, keep);
}

// Groups of 16 lanes, decoded in step so that their gathers' latencies overlap: a group's
// steps form one chain (state, table gather, state, word gather), which alone leaves the core
// waiting on each gather.
template <int kGroups>
KVPOOL_AVX512 int64_t DecodeGroups(const Stream& s, const DecodeTable* tables, uint32_t l0,
                                   uint64_t offset, int32_t* codes, uint64_t ld) {
  constexpr uint32_t kLanes = kGroups * kWidth;
  alignas(64) uint32_t x0[kLanes], start[kLanes], end[kLanes];
  uint64_t at = offset;
  for (uint32_t i = 0; i < kLanes; ++i) {
    const uint8_t* e = s.lane_dir + uint64_t{l0 + i} * kLaneEntryBytes;
    x0[i] = LoadU32(e);
    start[i] = uint32_t(at);
    at += LoadU32(e + 4);
    end[i] = uint32_t(at);
  }
  if (at > (uint64_t{1} << 31)) return -2;  // Beyond a gather's 32-bit signed offsets.
  // Per group and column j of a lane: its table's first word in `tables`, its shift and its
  // largest high part, for the group's 16 lanes.
  alignas(64) int32_t base[kGroups][kLaneCols][kWidth], shift[kGroups][kLaneCols][kWidth],
      limit[kGroups][kLaneCols][kWidth];
  __mmask16 shifted[kGroups][kLaneCols];
  for (int g = 0; g < kGroups; ++g) {
    for (uint32_t j = 0; j < kLaneCols; ++j) {
      for (uint32_t i = 0; i < kWidth; ++i) {
        const uint32_t k = ColumnTable(s.column_tables, (l0 + g * kWidth + i) * kLaneCols + j);
        base[g][j][i] = int32_t(k * (kProbScale + 1) + 1);
        shift[g][j][i] = int32_t(tables[k].shift);
        limit[g][j][i] = int32_t(kMaxZigZagCode >> tables[k].shift);
      }
      const __m512i sh = _mm512_load_si512(shift[g][j]);
      shifted[g][j] = _mm512_test_epi32_mask(sh, sh);
    }
  }
  const int32_t* words = reinterpret_cast<const int32_t*>(tables);
  Lanes l[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    l[g].x = _mm512_load_si512(x0 + g * kWidth);
    l[g].pos = _mm512_load_si512(start + g * kWidth);
    l[g].end = _mm512_load_si512(end + g * kWidth);
    l[g].words = s.data - 2;  // Within the payload: the lane directory precedes the data.
    l[g].bad = _mm512_cmplt_epu32_mask(l[g].x, _mm512_set1_epi32(kStateLow));
  }
  const __m512i slot_mask = _mm512_set1_epi32(kProbScale - 1);
  const __m512i escape = _mm512_set1_epi32(kEscape), eight = _mm512_set1_epi32(8);
  const __m512i one = _mm512_set1_epi32(1), max_code = _mm512_set1_epi32(kMaxZigZagCode);
  alignas(64) int32_t rows[kGroups][kLaneCols][kWidth];
  for (uint32_t t = 0; t < s.rows; ++t) {
    for (uint32_t j = 0; j < kLaneCols; ++j) {
      __m512i e[kGroups];
      for (int g = 0; g < kGroups; ++g) {
        const __m512i slot = _mm512_and_si512(l[g].x, slot_mask);
        e[g] =
            _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_load_si512(base[g][j]), slot), words, 4);
      }
      for (int g = 0; g < kGroups; ++g) {
        const __m512i freq =
            _mm512_and_si512(_mm512_srli_epi32(e[g], 5), _mm512_set1_epi32(0x1fff));
        l[g].x = _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(l[g].x, kProbBits)),
                                  _mm512_srli_epi32(e[g], 18));
        Refill(&l[g], 0xffff);
      }
      for (int g = 0; g < kGroups; ++g) {
        __m512i hi = _mm512_and_si512(e[g], _mm512_set1_epi32(31));
        const __mmask16 esc = _mm512_cmpeq_epi32_mask(hi, escape);
        if (esc != 0) {
          const __m512i lo_byte = Uniform(&l[g], esc, eight);
          const __m512i hi_byte = Uniform(&l[g], esc, eight);
          hi = _mm512_mask_add_epi32(hi, esc, hi,
                                     _mm512_add_epi32(lo_byte, _mm512_slli_epi32(hi_byte, 8)));
        }
        const __m512i sh = _mm512_load_si512(shift[g][j]);
        const __mmask16 over = _mm512_cmpgt_epu32_mask(hi, _mm512_load_si512(limit[g][j]));
        l[g].bad |= over;
        hi = _mm512_mask_mov_epi32(hi, over, _mm512_setzero_si512());
        e[g] = _mm512_sllv_epi32(hi, sh);  // The code's high part, then the whole code.
      }
      for (int g = 0; g < kGroups; ++g) {
        __m512i u = e[g];
        if (shifted[g][j] != 0) {
          u = _mm512_or_si512(u, Uniform(&l[g], shifted[g][j], _mm512_load_si512(shift[g][j])));
        }
        l[g].bad |= _mm512_cmpgt_epu32_mask(u, max_code);
        _mm512_store_si512(
            rows[g][j],
            _mm512_xor_si512(_mm512_srli_epi32(u, 1),
                             _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_and_si512(u, one))));
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      __m512i r[kLaneCols];
      for (uint32_t j = 0; j < kLaneCols; ++j) r[j] = _mm512_load_si512(rows[g][j]);
      Transpose(r);
      int32_t* out = codes + uint64_t{t} * ld + uint64_t{l0 + g * kWidth} * kLaneCols;
      for (uint32_t i = 0; i < kWidth; ++i) _mm512_storeu_si512(out + i * kLaneCols, r[i]);
    }
  }
  for (int g = 0; g < kGroups; ++g) {
    const __mmask16 finished = ~l[g].bad & _mm512_cmpeq_epi32_mask(l[g].pos, l[g].end) &
                               _mm512_cmpeq_epi32_mask(l[g].x, _mm512_set1_epi32(kStateLow));
    if (finished != 0xffff) return g * kWidth + __builtin_ctz(~uint32_t{finished});
  }
  return -1;
}

}  // namespace

int64_t DecodeLanesAvx512(const Stream& s, const DecodeTable* tables, uint32_t l0, uint32_t groups,
                          uint64_t offset, int32_t* codes, uint64_t ld) {
  switch (groups) {
    case 1:
      return DecodeGroups<1>(s, tables, l0, offset, codes, ld);
    case 2:
      return DecodeGroups<2>(s, tables, l0, offset, codes, ld);
    case 4:
      return DecodeGroups<4>(s, tables, l0, offset, codes, ld);
  }
  return -2;
}

}  // namespace kvpool::kernels::kvpool::internal
