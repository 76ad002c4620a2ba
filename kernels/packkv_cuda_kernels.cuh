// packkv's CUDA kernels (launched by packkv.cu), for batches of segments of one shape:
// blockIdx.y is the segment, each with its own input or payload, output and scratch (the
// *Batch and *ScratchSet structs say where). The payload format is packkv_ref.cc's. Kept in a
// header so that tests/kernels/packkv_cuda_kernels_test.cc runs them on the host under
// tests/util/cuda_emulation.h in every build; the GPU itself runs them in PackkvCodec.Cuda* and
// CodecBatch.* (label gpu). Not a public API. Thread-safe (stateless).
//
// Encoding, eight kernels per batch:
//   RowStats   - 8 threads per row, thread k summing lane k of the row's squares (the
//                reference's lanes), min and max; flags a non-finite element.
//   Scale      - a block per segment: thread j sums segment lane j sequentially, thread 0 runs
//                the reference's tree (TreeReduce) and ScaleFromSums.
//   Quantize   - a warp per row: the row quantiser (QuantizeRowWith, also the reference's), the
//                codes and their sum (the re-ordering key).
//   Order      - a thread per (head, token): its position (a stable rank by key when
//                re-ordering, else the token itself); writes the row parameters and permutation.
//   PackMeta   - a block per pack: column minimums and widths, the header, the pack's size.
//   EncodeScan - a block per segment: pack offsets (exclusive sum of the sizes), payload size.
//   StoreSize  - the payload size to sizes[y] (0 when an element was not finite: no non-empty
//                shape decodes from an empty payload, so such a segment fails with DataLoss).
//   PackWrite  - a block per pack: column offsets (a scan of the widths), the bit-packed
//                minimums (a thread per byte) and columns (a thread per column).
// Decoding, five kernels per batch: CheckRows (minimums, steps, permutation counts), CheckPerm,
// PackSizes (from the headers, checking the widths), DecodeScan, then DecodePacks (a block per
// pack, a thread per element). The launcher cannot see device-side checks without
// synchronising, so the host returns DataLoss only for what it can see (each size against the
// fixed sections); when the device finds a payload inconsistent (a bad minimum or step,
// permutation, width, or a size that does not match the packs) it writes zeros to that
// segment's whole output instead of decoding. Codes above 2^bits - 1 are decoded as they are
// (DecodeRef rejects them).
//
// Float operations are the reference's, with explicitly rounded intrinsics where the order
// matters (__fmul_rn, __fadd_rn, __fsub_rn, __dmul_rn, __dadd_rn, __float2half_rn,
// __float2bfloat16_rn; the build also passes --fmad=false), so that payloads are the
// reference's byte for byte and decoded values bit for bit.
#ifndef KVPOOL_KERNELS_PACKKV_CUDA_KERNELS_CUH_
#define KVPOOL_KERNELS_PACKKV_CUDA_KERNELS_CUH_

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cmath>
#include <cstdint>

#include "kernels/carver.h"
#include "kernels/host_device.h"
#include "kernels/packkv_kernels.cuh"

// A kernel's dynamic shared memory (tests/util/cuda_emulation.h defines its own).
#ifndef KVPOOL_DYNAMIC_SHARED
#define KVPOOL_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace kvpool::kernels::packkv::internal {

inline constexpr int kThreads = 256;      // Per block of the row, order and scan kernels.
inline constexpr int kPackThreads = 128;  // Per block of the pack kernels.

// ---- Conversions.

struct DevFp16 {
  __device__ static float ToFloat(uint16_t h) { return __half2float(__ushort_as_half(h)); }
  __device__ static uint16_t FromFloat(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static constexpr uint16_t kExponent = 0x7c00;
  static constexpr uint16_t kMinStep = 0x0001;
};
struct DevBf16 {
  __device__ static float ToFloat(uint16_t h) { return __bfloat162float(__ushort_as_bfloat16(h)); }
  __device__ static uint16_t FromFloat(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  static constexpr uint16_t kExponent = 0x7f80;
  static constexpr uint16_t kMinStep = 0x0080;
};

__device__ inline float ToFloat(uint16_t h, bool bf16) {
  return bf16 ? DevBf16::ToFloat(h) : DevFp16::ToFloat(h);
}
__device__ inline uint16_t FromFloat(float f, bool bf16) {
  return bf16 ? DevBf16::FromFloat(f) : DevFp16::FromFloat(f);
}
__device__ inline uint16_t Load16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
__device__ inline void Store16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// Bits [bit, bit + w) of base (w <= 16), reading only the bytes that hold them.
__device__ inline uint32_t GetBits(const uint8_t* base, uint64_t bit, int w) {
  if (w == 0) return 0;
  const uint64_t first = bit / 8, last = (bit + w - 1) / 8;
  uint32_t word = 0;
  for (uint64_t b = first; b <= last; ++b) word |= uint32_t{base[b]} << (8 * (b - first));
  return (word >> (bit % 8)) & ((1u << w) - 1);
}

__device__ inline int WidthAt(const uint8_t* header, uint32_t d, int bits) {
  return WidthFromCode((header[1 + d / 2] >> (4 * (d % 2))) & 15, bits);
}

KVPOOL_HD uint32_t Blocks(uint64_t items, uint64_t per_block) {
  return static_cast<uint32_t>((items + per_block - 1) / per_block);
}

// ---- Where a batch's segments are.

struct EncodeBatch {
  const uint16_t* in;  // Segment y: in + y * in_stride elements.
  uint64_t in_stride;
  uint8_t* out;  // Segment y's payload: out + y * out_stride.
  uint64_t out_stride;
  uint64_t* sizes;  // sizes[y]: segment y's payload size.
};

struct DecodeBatch {
  const uint8_t* payload;  // Segment y's payload: payload + y * payload_stride.
  uint64_t payload_stride;
  const uint64_t* sizes;  // sizes[y]: its size (device memory).
  uint16_t* out;          // Segment y: out + y * out_stride elements.
  uint64_t out_stride;
};

// ---- Scratch: one segment's, carved from its own region of the batch's allocation.

struct EncodeScratch {
  float* mn;
  float* mx;
  double* sum_sq;
  RowQuant* quant;
  uint32_t* keys;
  uint32_t* perm;  // [h * T + position] -> token
  uint16_t* codes;
  uint16_t* cmin;  // [pack * D + d]
  uint64_t* pack_size;
  uint64_t* pack_offset;
  float* scale;
  uint64_t* total;
  int* flag;  // Starts zeroed (the set's flags).
};

KVPOOL_HD EncodeScratch CarveEncode(Carver* c, const Layout& l) {
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  EncodeScratch s;
  s.mn = c->Take<float>(rows);
  s.mx = c->Take<float>(rows);
  s.sum_sq = c->Take<double>(rows);
  s.quant = c->Take<RowQuant>(rows);
  s.keys = c->Take<uint32_t>(rows);
  s.perm = c->Take<uint32_t>(rows);
  s.codes = c->Take<uint16_t>(rows * l.dim);
  s.cmin = c->Take<uint16_t>(l.num_packs * l.dim);
  s.pack_size = c->Take<uint64_t>(l.num_packs);
  s.pack_offset = c->Take<uint64_t>(l.num_packs);
  s.scale = c->Take<float>(1);
  s.total = c->Take<uint64_t>(1);
  s.flag = nullptr;
  return s;
}

// A batch's encoding scratch: `count` flags (to be zeroed before the launches), then each
// segment's region at a fixed stride.
struct EncodeScratchSet {
  int* flags;
  uint8_t* base;
  uint64_t stride;
  Layout l;
  __device__ EncodeScratch At(uint32_t y) const {
    Carver c(base + y * stride);
    EncodeScratch s = CarveEncode(&c, l);
    s.flag = flags + y;
    return s;
  }
};

struct DecodeScratch {
  uint64_t* pack_size;
  uint64_t* pack_offset;
  uint64_t* total;
  uint32_t* seen;  // [h * T + token]: how many positions hold the token (zeroed, reorder only).
  int* flag;       // Zeroed.
};

KVPOOL_HD DecodeScratch CarveDecode(Carver* c, const Layout& l) {
  DecodeScratch s;
  s.pack_size = c->Take<uint64_t>(l.num_packs);
  s.pack_offset = c->Take<uint64_t>(l.num_packs);
  s.total = c->Take<uint64_t>(1);
  s.seen = nullptr;
  s.flag = nullptr;
  return s;
}

// A batch's decoding scratch: the parts that start zeroed for every segment (flags, and the
// permutation counts when re-ordering), `zeroed_bytes` from `flags`, then each segment's region.
struct DecodeScratchSet {
  int* flags;
  uint32_t* seen;
  uint64_t zeroed_bytes;
  uint8_t* base;
  uint64_t stride;
  Layout l;
  __device__ DecodeScratch At(uint32_t y) const {
    Carver c(base + y * stride);
    DecodeScratch s = CarveDecode(&c, l);
    s.seen = seen + (l.reorder ? y * uint64_t{l.tokens} * l.heads : 0);
    s.flag = flags + y;
    return s;
  }
};

// ---- Encoding kernels. Grids: (blocks per segment, segments).

static __global__ void RowStats(EncodeBatch b, Layout l, bool bf16, EncodeScratchSet set) {
  const uint16_t* in = b.in + blockIdx.y * b.in_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  const uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kRowLanes;
  const int lane = threadIdx.x % kRowLanes;
  const bool live = r < rows;
  float mn = INFINITY, mx = -INFINITY;
  double acc = 0;
  bool bad = false;
  for (uint32_t d = lane; live && d < l.dim; d += kRowLanes) {
    const float v = ToFloat(in[r * l.dim + d], bf16);
    bad |= !isfinite(v);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
    const double x = v;
    acc = __dadd_rn(acc, __dmul_rn(x, x));
  }
  double lanes[kRowLanes];
  const unsigned all = 0xffffffffu;  // every lane of the warp runs the shuffles
  for (int k = 0; k < kRowLanes; ++k) lanes[k] = __shfl_sync(all, acc, k, kRowLanes);
  for (int k = kRowLanes / 2; k > 0; k /= 2) {
    mn = fminf(mn, __shfl_xor_sync(all, mn, k, kRowLanes));
    mx = fmaxf(mx, __shfl_xor_sync(all, mx, k, kRowLanes));
  }
  if (bad) atomicOr(s.flag, 1);
  if (live && lane == 0) {
    s.mn[r] = __fadd_rn(mn, 0.0f);
    s.mx[r] = __fadd_rn(mx, 0.0f);
    s.sum_sq[r] = CombineRowLanes(lanes);
  }
}

// kSegmentLanes threads per block.
static __global__ void Scale(Layout l, double budget_q, EncodeScratchSet set) {
  __shared__ double sq[kSegmentLanes], r2[kSegmentLanes];
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  double a = 0, b = 0;
  for (uint64_t r = threadIdx.x; r < rows; r += kSegmentLanes) {
    const double range = __fsub_rn(s.mx[r], s.mn[r]);
    a = __dadd_rn(a, s.sum_sq[r]);
    b = __dadd_rn(b, __dmul_rn(range, range));
  }
  sq[threadIdx.x] = a;
  r2[threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.x == 0) {
    *s.scale = ScaleFromSums(TreeReduce(sq), TreeReduce(r2), l.dim, budget_q, l.qmax);
  }
}

template <typename Conv>
static __global__ void Quantize(EncodeBatch b, Layout l, EncodeScratchSet set) {
  const uint16_t* in = b.in + blockIdx.y * b.in_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  const uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps leave together
  const RowQuant q = QuantizeRowWith<Conv>(s.mn[r], s.mx[r], *s.scale, l.qmax);
  const float top = static_cast<float>(q.top);
  uint32_t key = 0;
  for (uint32_t d = lane; d < l.dim; d += 32) {
    float v = __fmul_rn(__fsub_rn(Conv::ToFloat(in[r * l.dim + d]), q.mn), q.inv);
    v = top < v ? top : v;
    const uint32_t c = __float2uint_rn(v);
    s.codes[r * l.dim + d] = static_cast<uint16_t>(c);
    key += c;
  }
  for (int k = 16; k > 0; k /= 2) key += __shfl_xor_sync(0xffffffffu, key, k);
  if (lane == 0) {
    s.quant[r] = q;
    s.keys[r] = key;
  }
}

// Grid (heads * token blocks of kThreads, segments). Position of token t: the number of tokens
// before it in a stable sort by key.
static __global__ void Order(EncodeBatch b, Layout l, EncodeScratchSet set) {
  __shared__ uint32_t tile[kThreads];
  uint8_t* out = b.out + blockIdx.y * b.out_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint32_t token_blocks = Blocks(l.tokens, kThreads);
  const uint32_t h = blockIdx.x / token_blocks;
  const uint32_t t = blockIdx.x % token_blocks * blockDim.x + threadIdx.x;
  const bool live = t < l.tokens;
  const uint32_t key = live ? s.keys[uint64_t{t} * l.heads + h] : 0;
  uint32_t pos = t;
  if (l.reorder) {
    pos = 0;
    for (uint32_t base = 0; base < l.tokens; base += kThreads) {
      __syncthreads();
      const uint32_t u = base + threadIdx.x;
      if (u < l.tokens) tile[threadIdx.x] = s.keys[uint64_t{u} * l.heads + h];
      __syncthreads();
      const uint32_t count = min(uint32_t{kThreads}, l.tokens - base);
      for (uint32_t k = 0; k < count; ++k) {
        const uint32_t other = tile[k];
        pos += (other < key || (other == key && base + k < t)) ? 1 : 0;
      }
    }
  }
  if (!live) return;
  const uint64_t at = uint64_t{h} * l.tokens + pos;
  s.perm[at] = t;
  const RowQuant& q = s.quant[uint64_t{t} * l.heads + h];
  Store16(out + 4 * at, q.min_bits);
  Store16(out + 4 * at + 2, q.step_bits);
  if (l.reorder) Store16(out + l.perm_offset + 2 * at, static_cast<uint16_t>(t));
}

__device__ inline uint32_t CodeAt(const Layout& l, const EncodeScratch& s, uint32_t h,
                                  uint64_t position, uint32_t d) {
  const uint32_t t = s.perm[uint64_t{h} * l.tokens + position];
  return s.codes[(uint64_t{t} * l.heads + h) * l.dim + d];
}

// A block per pack: column minimums and width codes (a thread per pair of columns), mw, size.
static __global__ void PackMeta(EncodeBatch b, Layout l, EncodeScratchSet set) {
  __shared__ uint32_t largest_min;
  __shared__ unsigned long long column_bytes;
  uint8_t* out = b.out + blockIdx.y * b.out_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = PackTokens(l, p);
  uint8_t* header = out + l.headers_offset + pack * l.header_bytes;
  if (threadIdx.x == 0) {
    largest_min = 0;
    column_bytes = 0;
  }
  __syncthreads();
  uint32_t my_largest = 0;
  unsigned long long my_bytes = 0;
  for (uint32_t pair = threadIdx.x; 2 * pair < l.dim; pair += blockDim.x) {
    uint8_t byte = 0;
    for (uint32_t d = 2 * pair; d < min(l.dim, 2 * pair + 2); ++d) {
      uint32_t lo = l.qmax, hi = 0;
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t c = CodeAt(l, s, h, uint64_t{p} * l.group + i, d);
        lo = min(lo, c);
        hi = max(hi, c);
      }
      const int code = CodeForWidth(BitLength(hi - lo));
      byte |= static_cast<uint8_t>(code << (4 * (d % 2)));
      s.cmin[pack * l.dim + d] = static_cast<uint16_t>(lo);
      my_largest = max(my_largest, lo);
      my_bytes += BitBytes(n, WidthFromCode(code, l.bits));
    }
    header[1 + pair] = byte;
  }
  atomicMax(&largest_min, my_largest);
  atomicAdd(&column_bytes, my_bytes);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int mw = BitLength(largest_min);
    header[0] = static_cast<uint8_t>(mw);
    s.pack_size[pack] = BitBytes(l.dim, mw) + column_bytes;
  }
}

// Run by every thread of a kThreads block: offset[i] = base + sum of size[0..i); *total = the sum.
__device__ inline void ScanSizes(const uint64_t* size, uint64_t count, uint64_t base,
                                 uint64_t* offset, uint64_t* total, uint64_t* warp_sums) {
  uint64_t carry = base;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (uint64_t start = 0; start < count; start += kThreads) {
    const uint64_t i = start + threadIdx.x;
    const uint64_t v = i < count ? size[i] : 0;
    uint64_t x = v;  // inclusive scan within the warp
    for (int k = 1; k < 32; k *= 2) {
      const uint64_t y = __shfl_up_sync(0xffffffffu, x, k);
      if (lane >= k) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      uint64_t w = lane < kThreads / 32 ? warp_sums[lane] : 0;
      for (int k = 1; k < 32; k *= 2) {
        const uint64_t y = __shfl_up_sync(0xffffffffu, w, k);
        if (lane >= k) w += y;
      }
      if (lane < kThreads / 32) warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const uint64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
    if (i < count) offset[i] = carry + before;
    carry += warp_sums[kThreads / 32 - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = carry - base;
}

// A block of kThreads per segment.
static __global__ void EncodeScan(Layout l, EncodeScratchSet set) {
  __shared__ uint64_t warp_sums[kThreads / 32];
  const EncodeScratch s = set.At(blockIdx.y);
  ScanSizes(s.pack_size, l.num_packs, l.data_offset, s.pack_offset, s.total, warp_sums);
}

// A thread per segment (grid (1, segments)).
static __global__ void StoreSize(EncodeBatch b, Layout l, EncodeScratchSet set) {
  const EncodeScratch s = set.At(blockIdx.y);
  b.sizes[blockIdx.y] = *s.flag != 0 ? 0 : l.data_offset + *s.total;
}

// Column byte offsets of a pack (relative to its data), from its header, into col[0..D); the
// block's threads each take a contiguous run of columns. Returns the minimums' byte count.
__device__ inline uint64_t ColumnOffsets(const Layout& l, const uint8_t* header, uint32_t n,
                                         uint64_t* col, uint64_t* partial) {
  const uint32_t per = (l.dim + blockDim.x - 1) / blockDim.x;
  const uint32_t begin = min(l.dim, threadIdx.x * per), end = min(l.dim, begin + per);
  uint64_t sum = 0;
  for (uint32_t d = begin; d < end; ++d) sum += BitBytes(n, WidthAt(header, d, l.bits));
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t run = BitBytes(l.dim, header[0]);
    for (uint32_t k = 0; k < blockDim.x; ++k) {
      const uint64_t v = partial[k];
      partial[k] = run;
      run += v;
    }
  }
  __syncthreads();
  uint64_t run = partial[threadIdx.x];
  for (uint32_t d = begin; d < end; ++d) {
    col[d] = run;
    run += BitBytes(n, WidthAt(header, d, l.bits));
  }
  __syncthreads();
  return BitBytes(l.dim, header[0]);
}

// Dynamic shared memory of PackWrite and DecodePacks: D + kPackThreads uint64.
KVPOOL_HD uint64_t PackSharedBytes(const Layout& l) {
  return (uint64_t{l.dim} + kPackThreads) * sizeof(uint64_t);
}

// A block of kPackThreads per pack.
static __global__ void PackWrite(EncodeBatch b, Layout l, EncodeScratchSet set) {
  KVPOOL_DYNAMIC_SHARED(uint64_t, shared);
  uint64_t* col = shared;
  uint64_t* partial = shared + l.dim;
  uint8_t* out = b.out + blockIdx.y * b.out_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = PackTokens(l, p);
  const uint8_t* header = out + l.headers_offset + pack * l.header_bytes;
  const int mw = header[0];
  const uint64_t min_bytes = ColumnOffsets(l, header, n, col, partial);
  uint8_t* data = out + s.pack_offset[pack];
  const uint16_t* cmin = s.cmin + pack * l.dim;
  for (uint64_t k = threadIdx.x; k < min_bytes; k += blockDim.x) {
    uint32_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const uint64_t bit = 8 * k + j, d = bit / mw;
      if (d < l.dim) byte |= ((cmin[d] >> (bit % mw)) & 1u) << j;
    }
    data[k] = static_cast<uint8_t>(byte);
  }
  for (uint32_t d = threadIdx.x; d < l.dim; d += blockDim.x) {
    const int w = WidthAt(header, d, l.bits);
    uint8_t* dst = data + col[d];
    uint32_t acc = 0;
    int fill = 0;
    for (uint32_t i = 0; i < n && w > 0; ++i) {
      acc |= (CodeAt(l, s, h, uint64_t{p} * l.group + i, d) - cmin[d]) << fill;
      for (fill += w; fill >= 8; fill -= 8, acc >>= 8) *dst++ = static_cast<uint8_t>(acc);
    }
    if (fill > 0) *dst = static_cast<uint8_t>(acc);
  }
}

// ---- Decoding kernels. Grids: (blocks per segment, segments).

// A thread per row.
static __global__ void CheckRows(DecodeBatch b, Layout l, bool bf16, DecodeScratchSet set) {
  const uint8_t* payload = b.payload + blockIdx.y * b.payload_stride;
  const DecodeScratch s = set.At(blockIdx.y);
  const uint64_t at = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (at >= uint64_t{l.tokens} * l.heads) return;
  const uint16_t exp = bf16 ? DevBf16::kExponent : DevFp16::kExponent;
  const uint16_t mn = Load16(payload + 4 * at), step = Load16(payload + 4 * at + 2);
  bool bad = (mn & exp) == exp || (step & exp) == exp || (step & 0x8000) != 0;
  if (l.reorder) {
    const uint16_t t = Load16(payload + l.perm_offset + 2 * at);
    if (t < l.tokens) {
      atomicAdd(&s.seen[at / l.tokens * l.tokens + t], 1u);
    } else {
      bad = true;
    }
  }
  if (bad) atomicOr(s.flag, 1);
}

// A thread per row (re-ordering only).
static __global__ void CheckPerm(Layout l, DecodeScratchSet set) {
  const DecodeScratch s = set.At(blockIdx.y);
  const uint64_t at = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (at < uint64_t{l.tokens} * l.heads && s.seen[at] != 1) atomicOr(s.flag, 1);
}

// A thread per pack: its data size from its header; flags a width or mw above bits.
static __global__ void PackSizes(DecodeBatch b, Layout l, DecodeScratchSet set) {
  const uint8_t* payload = b.payload + blockIdx.y * b.payload_stride;
  const DecodeScratch s = set.At(blockIdx.y);
  const uint64_t pack = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (pack >= l.num_packs) return;
  const uint8_t* header = payload + l.headers_offset + pack * l.header_bytes;
  const uint32_t n = PackTokens(l, static_cast<uint32_t>(pack % l.packs_per_head));
  bool bad = header[0] > l.bits;
  uint64_t size = BitBytes(l.dim, header[0]);
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int w = WidthAt(header, d, l.bits);
    bad |= w > l.bits;
    size += BitBytes(n, w);
  }
  s.pack_size[pack] = size;
  if (bad) atomicOr(s.flag, 1);
}

// A block of kThreads per segment.
static __global__ void DecodeScan(Layout l, DecodeScratchSet set) {
  __shared__ uint64_t warp_sums[kThreads / 32];
  const DecodeScratch s = set.At(blockIdx.y);
  ScanSizes(s.pack_size, l.num_packs, l.data_offset, s.pack_offset, s.total, warp_sums);
}

// A block of kPackThreads per pack, a thread per element; zeros everywhere in the segment when
// its payload is inconsistent.
static __global__ void DecodePacks(DecodeBatch b, Layout l, bool bf16, DecodeScratchSet set) {
  KVPOOL_DYNAMIC_SHARED(uint64_t, shared);
  uint64_t* col = shared;
  uint64_t* partial = shared + l.dim;
  const uint8_t* payload = b.payload + blockIdx.y * b.payload_stride;
  uint16_t* out = b.out + blockIdx.y * b.out_stride;
  const DecodeScratch s = set.At(blockIdx.y);
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = PackTokens(l, p);
  const uint64_t first = uint64_t{h} * l.tokens + uint64_t{p} * l.group;
  if (*s.flag != 0 || l.data_offset + *s.total != b.sizes[blockIdx.y]) {
    for (uint64_t k = threadIdx.x; k < uint64_t{n} * l.dim; k += blockDim.x) {
      const uint64_t t = uint64_t{p} * l.group + k / l.dim;
      out[(t * l.heads + h) * l.dim + k % l.dim] = 0;
    }
    return;
  }
  const uint8_t* header = payload + l.headers_offset + pack * l.header_bytes;
  const int mw = header[0];
  ColumnOffsets(l, header, n, col, partial);
  const uint8_t* data = payload + s.pack_offset[pack];
  for (uint64_t k = threadIdx.x; k < uint64_t{n} * l.dim; k += blockDim.x) {
    const uint32_t i = static_cast<uint32_t>(k / l.dim), d = static_cast<uint32_t>(k % l.dim);
    const int w = WidthAt(header, d, l.bits);
    const uint32_t code =
        GetBits(data, uint64_t{d} * mw, mw) + GetBits(data + col[d], uint64_t{i} * w, w);
    const uint64_t row = first + i;
    const float step = ToFloat(Load16(payload + 4 * row + 2), bf16);
    const float mn = ToFloat(Load16(payload + 4 * row), bf16);
    const uint32_t t = l.reorder ? Load16(payload + l.perm_offset + 2 * row) : p * l.group + i;
    const float x = __fadd_rn(__fmul_rn(static_cast<float>(code), step), mn);
    out[(uint64_t{t} * l.heads + h) * l.dim + d] = FromFloat(x, bf16);
  }
}

// ---- Host-side halves of the launchers (shared with the emulated kernel tests).

// The encoding scratch of `count` segments, carved by `c` (on nullptr: counts the bytes).
inline EncodeScratchSet CarveEncodeScratch(Carver* c, const Layout& l, uint32_t count) {
  EncodeScratchSet set;
  set.l = l;
  set.stride = CarvedBytes(CarveEncode, l);
  set.flags = c->Take<int>(count);
  set.base = c->Take<uint8_t>(count * set.stride);
  return set;
}

inline uint64_t EncodeScratchBytes(const Layout& l, uint32_t count) {
  return CarvedBytes(CarveEncodeScratch, l, count);
}

// The decoding scratch of `count` segments, carved by `c` (on nullptr: counts the bytes).
inline DecodeScratchSet CarveDecodeScratch(Carver* c, const Layout& l, uint32_t count) {
  DecodeScratchSet set;
  set.l = l;
  set.stride = CarvedBytes(CarveDecode, l);
  const uint64_t before = c->used();
  set.flags = c->Take<int>(count);
  set.seen = c->Take<uint32_t>(l.reorder ? uint64_t{count} * l.tokens * l.heads : 0);
  set.zeroed_bytes = c->used() - before;
  set.base = c->Take<uint8_t>(count * set.stride);
  return set;
}

inline uint64_t DecodeScratchBytes(const Layout& l, uint32_t count) {
  return CarvedBytes(CarveDecodeScratch, l, count);
}

// The encoder's launches for a batch `b` of `n` segments (flags zeroed), in order, through
// launch(grid_x, n, threads, shared_bytes, kernel, args...): packkv.cu launches them on its
// stream, the emulated tests run them on the host.
template <typename Launcher>
void LaunchEncodeKernels(const Launcher& launch, const EncodeBatch& b, const Layout& l, bool bf16,
                         double budget_q, const EncodeScratchSet& set, uint32_t n) {
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  const uint32_t packs = static_cast<uint32_t>(l.num_packs);
  launch(Blocks(rows * kRowLanes, kThreads), n, kThreads, 0, RowStats, b, l, bf16, set);
  launch(1, n, kSegmentLanes, 0, Scale, l, budget_q, set);
  if (bf16) {
    launch(Blocks(rows * 32, kThreads), n, kThreads, 0, Quantize<DevBf16>, b, l, set);
  } else {
    launch(Blocks(rows * 32, kThreads), n, kThreads, 0, Quantize<DevFp16>, b, l, set);
  }
  launch(Blocks(l.tokens, kThreads) * l.heads, n, kThreads, 0, Order, b, l, set);
  launch(packs, n, kPackThreads, 0, PackMeta, b, l, set);
  launch(1, n, kThreads, 0, EncodeScan, l, set);
  launch(1, n, 1, 0, StoreSize, b, l, set);
  launch(packs, n, kPackThreads, PackSharedBytes(l), PackWrite, b, l, set);
}

// The decoder's launches for `n` segments (zeroed_bytes from set.flags zeroed), as
// LaunchEncodeKernels.
template <typename Launcher>
void LaunchDecodeKernels(const Launcher& launch, const DecodeBatch& b, const Layout& l, bool bf16,
                         const DecodeScratchSet& set, uint32_t n) {
  const uint32_t row_blocks = Blocks(uint64_t{l.tokens} * l.heads, kThreads);
  launch(row_blocks, n, kThreads, 0, CheckRows, b, l, bf16, set);
  if (l.reorder) launch(row_blocks, n, kThreads, 0, CheckPerm, l, set);
  launch(Blocks(l.num_packs, kThreads), n, kThreads, 0, PackSizes, b, l, set);
  launch(1, n, kThreads, 0, DecodeScan, l, set);
  launch(static_cast<uint32_t>(l.num_packs), n, kPackThreads, PackSharedBytes(l), DecodePacks, b, l,
         bf16, set);
}

}  // namespace kvpool::kernels::packkv::internal

#endif  // KVPOOL_KERNELS_PACKKV_CUDA_KERNELS_CUH_
