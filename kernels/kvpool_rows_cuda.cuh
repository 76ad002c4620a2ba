// The kvpool codec's CUDA decoding of payload mode 4 (kvpool_rows.cc defines the format),
// included by kvpool_cuda_kernels.cuh, whose ParseKernel and DecodeKernel call these for mode 4
// payloads. Kept in a header so that tests/kernels/kvpool_cuda_kernels_test.cc runs it on the
// host under tests/util/cuda_emulation.h. Not a public API. Thread-safe (stateless).
//
//   RowsParse (every thread of ParseKernel's block, after thread 0 has read the header):
//     validates every field exactly as ParseRows does (a payload ParseRows rejects leaves
//     layout->ok 0, so DecodeKernel writes the sentinel), and writes each head's fields and
//     every row's data offset to the segment's scratch (a block-wide scan of the row sizes).
//   RowsDecodeGroup (DecodeKernel's block for 16 tokens): the rows' coefficient codes once into
//     shared memory, then a thread per channel forms its elements of the group's rows with
//     DecodeRowsRef's operations: integer prediction, planes, fma twice.
#ifndef KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_CUH_
#define KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_CUH_

#include <cstdint>

#include "kernels/kvpool_kernels.cuh"
#include "kernels/kvpool_rows.h"

namespace kvpool::kernels::kvpool::internal {

// One head's fields of a mode 4 payload, as the device parser found them.
struct RowsHeadDev {
  uint32_t rank, outliers, extra;
  float unit, lr_scale;
  uint32_t widths[kMaxRank];
  uint64_t basis;    // Offset of its basis codes in the payload.
  uint64_t outlier;  // Offset of its outlier channel list in the payload.
  uint64_t coef;     // Offset of its coefficient planes in the payload.
};

// Where a mode 4 payload's sections lie (offsets from its start).
struct RowsLayout {
  uint64_t means, classes, basis, basis_bytes, metas, data, coefs;
};

// Thread 0: header, head entries and the sizes of the fixed sections; offsets into *L.
// False on any inconsistency (ParseHeads' checks that need no loop over elements).
__device__ inline bool RowsHeads(const uint8_t* p, uint64_t size, uint32_t T, uint32_t H,
                                 uint32_t D, RowsHeadDev* heads, RowsLayout* L) {
  for (int i = 2; i < 8; ++i) {
    if (p[i] != 0) return false;
  }
  uint64_t pos = kHeaderBytes;
  if (size - pos < uint64_t{H} * kRowHeadBytes) return false;
  uint64_t basis = 0, outliers = 0;
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t h = 0; h < H; ++h) {
    const uint8_t* e = p + pos + uint64_t{h} * kRowHeadBytes;
    RowsHeadDev& hd = heads[h];
    hd.rank = e[0];
    hd.outliers = e[1];
    hd.extra = e[2];
    hd.unit = LoadF32Dev(e + 4);
    hd.lr_scale = LoadF32Dev(e + 8);
    if (hd.rank > kMaxRank || hd.outliers > min(D, kMaxOutliers) || hd.extra > kMaxPlanes ||
        (hd.outliers == 0 && hd.extra != 0) || e[3] != 0) {
      return false;
    }
    if (!(hd.unit > 0 && hd.unit <= kMaxHeadScale) || !(fabsf(hd.lr_scale) <= kMaxHeadScale)) {
      return false;
    }
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      hd.widths[j] = (e[12 + j / 2] >> (4 * (j & 1))) & 15;
      if (j >= hd.rank && hd.widths[j] != 0) return false;
    }
    hd.basis = basis;
    hd.outlier = outliers;
    basis += uint64_t{hd.rank} * D;
    outliers += hd.outliers;
  }
  pos += uint64_t{H} * kRowHeadBytes;
  if (size - pos < 2 * HD) return false;
  L->means = pos;
  pos += 2 * HD;
  if (size - pos < basis) return false;
  L->basis = pos;
  L->basis_bytes = basis;
  pos += basis;
  if (size - pos < 2 * outliers) return false;
  for (uint32_t h = 0; h < H; ++h) {
    heads[h].basis += L->basis;
    heads[h].outlier = pos + 2 * heads[h].outlier;
  }
  pos += 2 * outliers;
  L->classes = 0;
  if (p[1] & kHeadClasses) {
    const uint64_t n = uint64_t{T} * H, bytes = (n + 1) / 2;
    if (size - pos < bytes || ((n & 1) && (p[pos + bytes - 1] >> 4) != 0)) return false;
    L->classes = pos;
    pos += bytes;
  }
  if (size - pos < uint64_t{T} * H) return false;
  L->metas = pos;
  L->data = pos + uint64_t{T} * H;
  return true;
}

// Every thread of the block: element checks, row offsets (row_off[i] for row i = h * T + t,
// row_off[H * T] their total), coefficient and padding checks; *ok = 1 when all hold.
__device__ inline void RowsParse(const uint8_t* p, uint64_t size, uint32_t T, uint32_t H,
                                 uint32_t D, bool bf16, RowsHeadDev* heads, uint64_t* row_off,
                                 RowsLayout* L, uint32_t* ok, uint32_t* warp_sums) {
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const uint64_t HD = uint64_t{H} * D, rows = uint64_t{T} * H;
  const uint16_t exp = bf16 ? 0x7f80 : 0x7c00;
  int mine = 0;
  for (uint64_t c = threadIdx.x; c < HD; c += kThreads) {
    mine |= (Load16Dev(p + L->means + 2 * c) & exp) == exp;
  }
  for (uint64_t i = threadIdx.x; i < L->basis_bytes; i += kThreads) {
    mine |= p[L->basis + i] == 0x80;
  }
  for (uint32_t h = threadIdx.x; h < H; h += kThreads) {
    const RowsHeadDev& hd = heads[h];
    for (uint32_t k = 0; k < hd.outliers; ++k) {
      const uint32_t c = Load16Dev(p + hd.outlier + 2 * k);
      mine |= c >= D || (k > 0 && c <= Load16Dev(p + hd.outlier + 2 * (k - 1)));
    }
  }
  // Row sizes, scanned in chunks of the block.
  const uint8_t* metas = p + L->metas;
  uint64_t carry = 0;
  for (uint64_t base = 0; base < rows; base += kThreads) {
    const uint64_t i = base + threadIdx.x;
    uint32_t bytes = 0;
    if (i < rows) {
      const RowsHeadDev& hd = heads[i / T];
      const uint32_t b = metas[i] & 15;
      mine |= b + hd.extra > kMaxPlanes;
      bytes = uint32_t(RowDataBytes(D, hd.outliers, hd.extra, b));
    }
    uint32_t total;
    const uint32_t before = BlockExclusiveScan<uint32_t>(bytes, warp_sums, &total);
    if (i < rows) row_off[i] = carry + before;
    carry += total;
  }
  if (threadIdx.x == 0) {
    row_off[rows] = carry;
    uint64_t coefs = 0;
    for (uint32_t h = 0; h < H; ++h) {
      heads[h].coef = L->data + carry + coefs;
      for (uint32_t j = 0; j < heads[h].rank; ++j) coefs += heads[h].widths[j] * PlaneBytes(T);
    }
    const uint64_t start = L->data;
    mine |= size - start < carry || size - start - carry != coefs;
    L->coefs = start + carry;
  }
  if (mine) atomicExch(reinterpret_cast<unsigned*>(&bad), 1u);
  __syncthreads();
  if (bad) return;
  // Padding bits (only for shapes whose planes have any): rows, then coefficient planes.
  mine = 0;
  for (uint64_t i = threadIdx.x; i < rows; i += kThreads) {
    const RowsHeadDev& hd = heads[i / T];
    const uint8_t* row = p + L->data + row_off[i];
    const uint32_t b = metas[i] & 15;
    for (uint32_t q = 0; q < b && D % 8 != 0; ++q)
      mine |= !PaddingClear(row + q * PlaneBytes(D), D);
    row += b * PlaneBytes(D);
    for (uint32_t q = 0; hd.outliers % 8 != 0 && q < hd.extra; ++q) {
      mine |= !PaddingClear(row + q * PlaneBytes(hd.outliers), hd.outliers);
    }
  }
  const uint64_t planes = (size - L->coefs) / PlaneBytes(T);
  for (uint64_t q = threadIdx.x; T % 8 != 0 && q < planes; q += kThreads) {
    mine |= !PaddingClear(p + L->coefs + q * PlaneBytes(T), T);
  }
  if (mine) atomicExch(reinterpret_cast<unsigned*>(&bad), 1u);
  __syncthreads();
  if (threadIdx.x == 0) *ok = bad == 0;
}

// The coefficient code of direction j of head hd, token t.
__device__ inline int32_t RowsCoefDev(const uint8_t* p, const RowsHeadDev& hd, uint32_t j,
                                      uint32_t t, uint32_t T) {
  const uint8_t* plane = p + hd.coef;
  for (uint32_t i = 0; i < j; ++i) plane += hd.widths[i] * PlaneBytes(T);
  const uint32_t w = hd.widths[j];
  int32_t c = 0;
  for (uint32_t q = 0; q < w; ++q) c |= int32_t(PlaneBit(plane + q * PlaneBytes(T), t)) << q;
  return w ? c - (1 << (w - 1)) : 0;
}

// Heads whose coefficient codes RowsDecodeGroup stages in shared memory at a time.
inline constexpr uint32_t kRowsStagedHeads = 32;

// Elements of rows (h, t) for the n tokens of group g, DecodeRowsRef's operations in its order.
// Per chunk of kRowsStagedHeads heads, every thread of the block: the rows' coefficient codes
// decoded once into shared memory; then a thread per channel (h, d) finds its outlier index,
// mean and basis codes once and forms the channel's element for each of the n tokens (the
// block's writes to one token's row coalesce). Every thread of the block calls it.
__device__ inline void RowsDecodeGroup(const uint8_t* p, const RowsLayout& L, uint32_t T,
                                       uint32_t H, uint32_t D, bool bf16, const RowsHeadDev* heads,
                                       const uint64_t* row_off, uint32_t g, uint32_t n,
                                       uint16_t* out) {
  __shared__ int32_t coefs[kPack][kRowsStagedHeads][kMaxRank];
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t h0 = 0; h0 < H; h0 += kRowsStagedHeads) {
    const uint32_t heads_here = min(kRowsStagedHeads, H - h0);
    __syncthreads();  // The last chunk's codes are read.
    for (uint32_t k = threadIdx.x; k < n * heads_here * kMaxRank; k += kThreads) {
      const uint32_t i = k / (heads_here * kMaxRank), hh = (k / kMaxRank) % heads_here;
      const uint32_t j = k % kMaxRank;
      const RowsHeadDev& hd = heads[h0 + hh];
      coefs[i][hh][j] = j < hd.rank ? RowsCoefDev(p, hd, j, g * kPack + i, T) : 0;
    }
    __syncthreads();
    const uint64_t first = uint64_t{h0} * D, last = uint64_t{h0 + heads_here} * D;
    for (uint64_t c = first + threadIdx.x; c < last; c += kThreads) {
      const uint32_t h = uint32_t(c / D), d = uint32_t(c % D), hh = h - h0;
      const RowsHeadDev& hd = heads[h];
      int32_t outlier = -1;
      for (uint32_t k = 0; k < hd.outliers; ++k) {
        if (Load16Dev(p + hd.outlier + 2 * k) == d) outlier = int32_t(k);
      }
      int32_t basis[kMaxRank];
#pragma unroll
      for (uint32_t j = 0; j < kMaxRank; ++j) {
        basis[j] = j < hd.rank ? int32_t(int8_t(p[hd.basis + uint64_t{j} * D + d])) : 0;
      }
      const float m = ToFloatDev(bf16, Load16Dev(p + L.means + 2 * c));
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t t = g * kPack + i;
        const uint64_t r = uint64_t{h} * T + t;
        const uint8_t meta = p[L.metas + r];
        const uint32_t b = meta & 15;
        const uint8_t* row = p + L.data + row_off[r];
        int32_t q = 0;
        for (uint32_t k = 0; k < b; ++k)
          q += PlaneBit(row + k * PlaneBytes(D), d) ? (1 << k) : -(1 << k);
        if (outlier >= 0) {
          const uint8_t* extra = row + b * PlaneBytes(D);
          for (uint32_t x = 0; x < hd.extra; ++x) {
            q += PlaneBit(extra + x * PlaneBytes(hd.outliers), uint32_t(outlier)) ? (1 << (b + x))
                                                                                  : -(1 << (b + x));
          }
        }
        int32_t P = 0;
#pragma unroll
        for (uint32_t j = 0; j < kMaxRank; ++j) P += coefs[i][hh][j] * basis[j];
        const float hs = RowHalfStep(hd.unit, meta);
        const float z = __fmaf_rn(hd.lr_scale, float(P), m);
        out[uint64_t{t} * HD + c] = FromFloatDev(bf16, __fmaf_rn(hs, float(q), z));
      }
    }
  }
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_CUH_
