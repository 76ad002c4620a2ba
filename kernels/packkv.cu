// packkv on the GPU: the payload format of packkv_ref.cc, encoded and decoded by CUDA kernels on
// the caller's stream, with a scratch buffer from cudaMallocAsync freed with cudaFreeAsync.
//
// Encoding, seven kernels:
//   RowStats   - 8 threads per row, thread k summing lane k of the row's squares (the
//                reference's lanes), min and max; flags a non-finite element.
//   Scale      - one block: thread j sums segment lane j sequentially, thread 0 runs the
//                reference's tree (internal::TreeReduce) and internal::ScaleFromSums.
//   Quantize   - a warp per row: the row quantiser (internal::QuantizeRowWith, also the
//                reference's), the codes and their sum (the re-ordering key).
//   Order      - a thread per (head, token): its position (a stable rank by key when
//                re-ordering, else the token itself); writes the row parameters and permutation.
//   PackMeta   - a block per pack: column minimums and widths, the header, the pack's size.
//   Scan       - one block: pack offsets (exclusive sum of the sizes) and the payload size,
//                written to *d_size (0 when an element was not finite: no non-empty shape
//                decodes from an empty payload, so such a segment fails with DataLoss later).
//   PackWrite  - a block per pack: column offsets (a scan of the widths), the bit-packed
//                minimums (a thread per byte) and columns (a thread per column).
// Decoding, five kernels: CheckRows (minimums, steps, permutation counts), PackSizes (from the
// headers, checking the widths), Scan, CheckPerm, then DecodePacks (a block per pack, a thread
// per element). The launcher cannot see device-side checks without synchronising, so the host
// returns DataLoss only for what it can see (the size against the fixed sections); when the
// device finds a payload inconsistent (a bad minimum or step, permutation, width, or a size
// that does not match the packs) it writes zeros to the whole output instead of decoding. Codes
// above 2^bits - 1 are decoded as they are (DecodeRef rejects them).
//
// Float operations are the reference's, with explicitly rounded intrinsics where the order
// matters (__fmul_rn, __fadd_rn, __fsub_rn, __dmul_rn, __dadd_rn, __float2half_rn,
// __float2bfloat16_rn; the build also passes --fmad=false), so that payloads are the
// reference's byte for byte and decoded values bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/carver.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/packkv.h"
#include "kernels/packkv_kernels.cuh"

namespace kvpool::kernels::packkv {
namespace {

using internal::Layout;
using internal::RowQuant;

constexpr int kThreads = 256;
constexpr int kPackThreads = 128;
constexpr int kScanThreads = 1024;

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
  return internal::WidthFromCode((header[1 + d / 2] >> (4 * (d % 2))) & 15, bits);
}

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
  int* flag;
  uint64_t* total;
};

EncodeScratch CarveEncode(Carver* c, const Layout& l) {
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
  s.flag = c->Take<int>(1);
  s.total = c->Take<uint64_t>(1);
  return s;
}

uint32_t Blocks(uint64_t items, uint64_t per_block) {
  return static_cast<uint32_t>((items + per_block - 1) / per_block);
}

// ---- Encoding kernels.

__global__ void RowStats(const uint16_t* in, Layout l, bool bf16, EncodeScratch s) {
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  const uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) / internal::kRowLanes;
  const int lane = threadIdx.x % internal::kRowLanes;
  const bool live = r < rows;
  float mn = INFINITY, mx = -INFINITY;
  double acc = 0;
  bool bad = false;
  for (uint32_t d = lane; live && d < l.dim; d += internal::kRowLanes) {
    const float v = ToFloat(in[r * l.dim + d], bf16);
    bad |= !isfinite(v);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
    const double x = v;
    acc = __dadd_rn(acc, __dmul_rn(x, x));
  }
  double lanes[internal::kRowLanes];
  const unsigned all = 0xffffffffu;  // every lane of the warp runs the shuffles
  for (int k = 0; k < internal::kRowLanes; ++k) {
    lanes[k] = __shfl_sync(all, acc, k, internal::kRowLanes);
  }
  for (int k = internal::kRowLanes / 2; k > 0; k /= 2) {
    mn = fminf(mn, __shfl_xor_sync(all, mn, k, internal::kRowLanes));
    mx = fmaxf(mx, __shfl_xor_sync(all, mx, k, internal::kRowLanes));
  }
  if (bad) atomicOr(s.flag, 1);
  if (live && lane == 0) {
    s.mn[r] = __fadd_rn(mn, 0.0f);
    s.mx[r] = __fadd_rn(mx, 0.0f);
    s.sum_sq[r] = internal::CombineRowLanes(lanes);
  }
}

__global__ void Scale(Layout l, double budget_q, EncodeScratch s) {
  __shared__ double sq[internal::kSegmentLanes], r2[internal::kSegmentLanes];
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  double a = 0, b = 0;
  for (uint64_t r = threadIdx.x; r < rows; r += internal::kSegmentLanes) {
    const double range = __fsub_rn(s.mx[r], s.mn[r]);
    a = __dadd_rn(a, s.sum_sq[r]);
    b = __dadd_rn(b, __dmul_rn(range, range));
  }
  sq[threadIdx.x] = a;
  r2[threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.x == 0) {
    *s.scale = internal::ScaleFromSums(internal::TreeReduce(sq), internal::TreeReduce(r2), l.dim,
                                       budget_q, l.qmax);
  }
}

template <typename Conv>
__global__ void Quantize(const uint16_t* in, Layout l, EncodeScratch s) {
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  const uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps leave together
  const RowQuant q = internal::QuantizeRowWith<Conv>(s.mn[r], s.mx[r], *s.scale, l.qmax);
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

// Grid (token blocks, heads). Position of token t: the number of tokens before it in a stable
// sort by key.
__global__ void Order(Layout l, EncodeScratch s, uint8_t* out) {
  __shared__ uint32_t tile[kThreads];
  const uint32_t h = blockIdx.y;
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
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
__global__ void PackMeta(Layout l, EncodeScratch s, uint8_t* out) {
  __shared__ uint32_t largest_min;
  __shared__ unsigned long long column_bytes;
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = internal::PackTokens(l, p);
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
      const int code = internal::CodeForWidth(internal::BitLength(hi - lo));
      byte |= static_cast<uint8_t>(code << (4 * (d % 2)));
      s.cmin[pack * l.dim + d] = static_cast<uint16_t>(lo);
      my_largest = max(my_largest, lo);
      my_bytes += internal::BitBytes(n, internal::WidthFromCode(code, l.bits));
    }
    header[1 + pair] = byte;
  }
  atomicMax(&largest_min, my_largest);
  atomicAdd(&column_bytes, my_bytes);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int mw = internal::BitLength(largest_min);
    header[0] = static_cast<uint8_t>(mw);
    s.pack_size[pack] = internal::BitBytes(l.dim, mw) + column_bytes;
  }
}

// One block of kScanThreads: offset[i] = base + sum of size[0..i); *total = the sum.
__global__ void Scan(const uint64_t* size, uint64_t count, uint64_t base, uint64_t* offset,
                     uint64_t* total) {
  __shared__ uint64_t warp_sums[kScanThreads / 32];
  uint64_t carry = base;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (uint64_t start = 0; start < count; start += kScanThreads) {
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
      uint64_t w = warp_sums[lane];
      for (int k = 1; k < 32; k *= 2) {
        const uint64_t y = __shfl_up_sync(0xffffffffu, w, k);
        if (lane >= k) w += y;
      }
      warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const uint64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
    if (i < count) offset[i] = carry + before;
    carry += warp_sums[kScanThreads / 32 - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = carry - base;
}

__global__ void StoreSize(Layout l, EncodeScratch s, uint64_t* d_size) {
  *d_size = *s.flag != 0 ? 0 : l.data_offset + *s.total;
}

// Column byte offsets of a pack (relative to its data), from its header, into col[0..D); the
// block's threads each take a contiguous run of columns. Returns the minimums' byte count.
__device__ uint64_t ColumnOffsets(const Layout& l, const uint8_t* header, uint32_t n, uint64_t* col,
                                  uint64_t* partial) {
  const uint32_t per = (l.dim + blockDim.x - 1) / blockDim.x;
  const uint32_t begin = min(l.dim, threadIdx.x * per), end = min(l.dim, begin + per);
  uint64_t sum = 0;
  for (uint32_t d = begin; d < end; ++d) sum += internal::BitBytes(n, WidthAt(header, d, l.bits));
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t run = internal::BitBytes(l.dim, header[0]);
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
    run += internal::BitBytes(n, WidthAt(header, d, l.bits));
  }
  __syncthreads();
  return internal::BitBytes(l.dim, header[0]);
}

// A block per pack; dynamic shared memory: D + kPackThreads uint64.
__global__ void PackWrite(Layout l, EncodeScratch s, uint8_t* out) {
  extern __shared__ uint64_t shared[];
  uint64_t* col = shared;
  uint64_t* partial = shared + l.dim;
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = internal::PackTokens(l, p);
  const uint8_t* header = out + l.headers_offset + pack * l.header_bytes;
  const int mw = header[0];
  const uint64_t min_bytes = ColumnOffsets(l, header, n, col, partial);
  uint8_t* data = out + s.pack_offset[pack];
  const uint16_t* cmin = s.cmin + pack * l.dim;
  for (uint64_t b = threadIdx.x; b < min_bytes; b += blockDim.x) {
    uint32_t byte = 0;
    for (int k = 0; k < 8; ++k) {
      const uint64_t bit = 8 * b + k, d = bit / mw;
      if (d < l.dim) byte |= ((cmin[d] >> (bit % mw)) & 1u) << k;
    }
    data[b] = static_cast<uint8_t>(byte);
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

// ---- Decoding kernels.

struct DecodeScratch {
  uint32_t* seen;  // [h * T + token]: how many positions hold the token
  uint64_t* pack_size;
  uint64_t* pack_offset;
  int* flag;
  uint64_t* total;
};

DecodeScratch CarveDecode(Carver* c, const Layout& l) {
  DecodeScratch s;
  s.seen = c->Take<uint32_t>(l.reorder ? uint64_t{l.tokens} * l.heads : 1);
  s.pack_size = c->Take<uint64_t>(l.num_packs);
  s.pack_offset = c->Take<uint64_t>(l.num_packs);
  s.flag = c->Take<int>(1);
  s.total = c->Take<uint64_t>(1);
  return s;
}

__global__ void CheckRows(const uint8_t* payload, Layout l, bool bf16, DecodeScratch s) {
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

__global__ void CheckPerm(Layout l, DecodeScratch s) {
  const uint64_t at = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (at < uint64_t{l.tokens} * l.heads && s.seen[at] != 1) atomicOr(s.flag, 1);
}

// A thread per pack: its data size from its header; flags a width or mw above bits.
__global__ void PackSizes(const uint8_t* payload, Layout l, DecodeScratch s) {
  const uint64_t pack = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (pack >= l.num_packs) return;
  const uint8_t* header = payload + l.headers_offset + pack * l.header_bytes;
  const uint32_t n = internal::PackTokens(l, static_cast<uint32_t>(pack % l.packs_per_head));
  bool bad = header[0] > l.bits;
  uint64_t size = internal::BitBytes(l.dim, header[0]);
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int w = WidthAt(header, d, l.bits);
    bad |= w > l.bits;
    size += internal::BitBytes(n, w);
  }
  s.pack_size[pack] = size;
  if (bad) atomicOr(s.flag, 1);
}

// A block per pack, a thread per element; zeros everywhere when the payload is inconsistent.
// Dynamic shared memory: D + kPackThreads uint64.
__global__ void DecodePacks(const uint8_t* payload, uint64_t size, Layout l, bool bf16,
                            DecodeScratch s, uint16_t* out) {
  extern __shared__ uint64_t shared[];
  uint64_t* col = shared;
  uint64_t* partial = shared + l.dim;
  const uint64_t pack = blockIdx.x;
  const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
  const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
  const uint32_t n = internal::PackTokens(l, p);
  const uint64_t first = uint64_t{h} * l.tokens + uint64_t{p} * l.group;
  if (*s.flag != 0 || l.data_offset + *s.total != size) {
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

size_t PackSharedBytes(const Layout& l) { return (l.dim + kPackThreads) * sizeof(uint64_t); }

absl::Status Launched(const char* what) { return FromCuda(cudaGetLastError(), what); }

absl::Status RunEncode(const Layout& l, const SegmentShape& shape, double budget_q,
                       const uint16_t* d_in, uint8_t* d_out, uint64_t* d_size,
                       const EncodeScratch& s, cudaStream_t stream) {
  const bool bf16 = shape.dtype == DType::kBf16;
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(s.flag, 0, sizeof(int), stream));
  RowStats<<<Blocks(rows * internal::kRowLanes, kThreads), kThreads, 0, stream>>>(d_in, l, bf16, s);
  Scale<<<1, internal::kSegmentLanes, 0, stream>>>(l, budget_q, s);
  if (bf16) {
    Quantize<DevBf16><<<Blocks(rows * 32, kThreads), kThreads, 0, stream>>>(d_in, l, s);
  } else {
    Quantize<DevFp16><<<Blocks(rows * 32, kThreads), kThreads, 0, stream>>>(d_in, l, s);
  }
  Order<<<dim3(Blocks(l.tokens, kThreads), l.heads), kThreads, 0, stream>>>(l, s, d_out);
  PackMeta<<<static_cast<uint32_t>(l.num_packs), kPackThreads, 0, stream>>>(l, s, d_out);
  Scan<<<1, kScanThreads, 0, stream>>>(s.pack_size, l.num_packs, l.data_offset, s.pack_offset,
                                       s.total);
  PackWrite<<<static_cast<uint32_t>(l.num_packs), kPackThreads, PackSharedBytes(l), stream>>>(
      l, s, d_out);
  StoreSize<<<1, 1, 0, stream>>>(l, s, d_size);
  return Launched("packkv encode");
}

absl::Status RunDecode(const Layout& l, const SegmentShape& shape, const uint8_t* d_payload,
                       uint64_t size, uint16_t* d_out, const DecodeScratch& s,
                       cudaStream_t stream) {
  const bool bf16 = shape.dtype == DType::kBf16;
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(s.flag, 0, sizeof(int), stream));
  if (l.reorder) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(s.seen, 0, rows * sizeof(uint32_t), stream));
  }
  CheckRows<<<Blocks(rows, kThreads), kThreads, 0, stream>>>(d_payload, l, bf16, s);
  if (l.reorder) CheckPerm<<<Blocks(rows, kThreads), kThreads, 0, stream>>>(l, s);
  PackSizes<<<Blocks(l.num_packs, kThreads), kThreads, 0, stream>>>(d_payload, l, s);
  Scan<<<1, kScanThreads, 0, stream>>>(s.pack_size, l.num_packs, l.data_offset, s.pack_offset,
                                       s.total);
  DecodePacks<<<static_cast<uint32_t>(l.num_packs), kPackThreads, PackSharedBytes(l), stream>>>(
      d_payload, size, l, bf16, s, d_out);
  return Launched("packkv decode");
}

// Frees the scratch buffer on the stream when the launch sequence is done (or failed).

}  // namespace

absl::Status EncodeCuda(const SegmentShape& shape, const CodecParams& params, const uint16_t* d_in,
                        uint8_t* d_out, uint64_t capacity, uint64_t* d_size, cudaStream_t stream) {
  KVPOOL_RETURN_IF_ERROR(internal::CheckEncodeArgs(shape, params, capacity));
  if (shape.Elements() == 0) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(d_size, 0, sizeof(uint64_t), stream));
    return absl::OkStatus();
  }
  const Layout l = internal::LayoutFor(shape, params);
  Carver sizing(nullptr);
  CarveEncode(&sizing, l);
  StreamScratch buffer(stream);
  KVPOOL_RETURN_IF_ERROR(buffer.Allocate(sizing.used()));
  Carver carver(buffer.get());
  const EncodeScratch s = CarveEncode(&carver, l);
  return RunEncode(l, shape, internal::QuantBudget(params.budget, shape.dtype), d_in, d_out, d_size,
                   s, stream);
}

absl::Status DecodeCuda(const SegmentShape& shape, const CodecParams& params,
                        const uint8_t* d_payload, uint64_t size, uint16_t* d_out,
                        cudaStream_t stream) {
  KVPOOL_RETURN_IF_ERROR(internal::CheckParams(shape, params));
  if (shape.Elements() == 0) {
    if (size == 0) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat("packkv: empty segment with a ", size, "-byte payload"));
  }
  const Layout l = internal::LayoutFor(shape, params);
  if (size < l.data_offset) {
    return absl::DataLossError(absl::StrCat(
        "packkv payload of ", size, " bytes is shorter than its fixed part, ", l.data_offset));
  }
  Carver sizing(nullptr);
  CarveDecode(&sizing, l);
  StreamScratch buffer(stream);
  KVPOOL_RETURN_IF_ERROR(buffer.Allocate(sizing.used()));
  Carver carver(buffer.get());
  return RunDecode(l, shape, d_payload, size, d_out, CarveDecode(&carver, l), stream);
}

}  // namespace kvpool::kernels::packkv
