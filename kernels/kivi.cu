// kivi on the GPU: the payload format of kivi_ref.cc, encoded and decoded by CUDA kernels.
//
// Encoding is two kernels on the caller's stream:
//   KeyStats / ValueStats - the scale and minimum of every group. Keys: one thread per group
//     (per channel of a token group), so that a warp reads 32 consecutive channels of a row.
//     Values: a group is handled by `width` lanes (the power of two >= G, at most 32) that
//     stride over its channels and combine with warp shuffles. Thread 0 of block 0 writes the
//     payload size to *d_size and zeroes the padding after the minimums.
//   Quantize - one thread per 8 elements (a chunk starting at an index divisible by 8, whose
//     codes are b whole bytes): reads the elements and their groups' scales and minimums,
//     writes the codes.
// Decoding is one kernel, one thread per 8-element chunk.
// A batch of segments of one shape runs in the same launches: blockIdx.y picks the segment
// (its elements, payload and size at the caller's strides), blockIdx.x strides within it.
// When a segment cannot be encoded (a NaN or infinite element, or a group whose scale or
// minimum is beyond fp16), ValueStats/KeyStats store a NaN scale for the group and Quantize sets
// *d_size to 0, which no non-empty shape decodes from (DataLoss). The decode launcher checks
// the parameters and the payload size (DataLoss) but cannot report a non-finite scale or
// minimum without synchronising (the host paths return DataLoss): the kernel decodes every
// element of such a group to NaN (fp16 0x7e00, bf16 0x7fc0). ParseSegment's checksum catches
// corrupt payloads before they get here.
//
// Float operations are the reference's, done with explicitly rounded intrinsics (__fsub_rn,
// __fdiv_rn, __fmul_rn, __fadd_rn, rintf, __float2half_rn, __float2bfloat16_rn) in the same
// order, so that decoded values are bit-identical to DecodeRef's and payloads to EncodeRef's.
// Chunks take a vector path (16-byte loads and stores, no per-element group arithmetic) when
// a chunk never straddles groups (keys: H*D % 8 == 0; values: G % 8 == 0 and D % 8 == 0) and
// the pointers are 16-byte aligned; a per-element path otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/kivi.h"

namespace kvpool::kernels::kivi {
namespace {

constexpr int kThreads = 256;
constexpr uint64_t kMaxBlocks = 1 << 16;

// The segment and its payload layout (see kivi_ref.cc); every count fits in 32 bits because a
// segment is at most kMaxBlockBytes (2^29 elements).
struct Geometry {
  uint32_t tokens = 0;
  uint32_t channels = 0;  // kv_heads * head_dim
  uint32_t head_dim = 0;
  uint32_t group = 0;
  uint32_t groups_per_row = 0;  // values: ceil(head_dim / group)
  uint32_t bits = 0;
  uint32_t elements = 0;
  uint32_t groups = 0;
  uint32_t codes_offset = 0;
  uint32_t width = 0;  // values: lanes per group in ValueStats
  uint64_t size = 0;
  bool key = false;
  bool bf16 = false;
  bool vec = false;  // chunks never straddle groups and pointers are 16-byte aligned
};

absl::StatusOr<Geometry> MakeGeometry(const SegmentShape& shape, const CodecParams& p) {
  if (!((p.bits == 2 || p.bits == 4 || p.bits == 8) && p.group > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kivi needs bits 2, 4 or 8 and a positive group, got bits ", p.bits, " group ", p.group));
  }
  if (shape.Bytes() > kMaxBlockBytes) {
    return absl::InvalidArgumentError("kivi: segment larger than the block size limit");
  }
  Geometry geo;
  geo.tokens = shape.tokens;
  geo.channels = shape.kv_heads * shape.head_dim;
  geo.head_dim = shape.head_dim;
  geo.group = p.group;
  geo.groups_per_row = (shape.head_dim + p.group - 1) / p.group;
  geo.bits = p.bits;
  geo.elements = static_cast<uint32_t>(shape.Elements());
  geo.key = shape.kind == SegmentKind::kKey;
  geo.bf16 = shape.dtype == DType::kBf16;
  const uint64_t groups = geo.key ? uint64_t{(shape.tokens + p.group - 1) / p.group} * geo.channels
                                  : uint64_t{shape.tokens} * shape.kv_heads * geo.groups_per_row;
  geo.groups = static_cast<uint32_t>(groups);
  const uint64_t codes_offset = (4 * groups + 15) / 16 * 16;
  geo.codes_offset = static_cast<uint32_t>(codes_offset);
  geo.size = codes_offset + (shape.Elements() * p.bits + 7) / 8;
  geo.width = 1;
  while (geo.width < 32 && geo.width < p.group) geo.width *= 2;
  geo.vec = geo.key ? geo.channels % 8 == 0 : p.group % 8 == 0 && shape.head_dim % 8 == 0;
  return geo;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

uint32_t Blocks(uint64_t threads) {
  return static_cast<uint32_t>(
      std::max<uint64_t>(1, std::min<uint64_t>((threads + kThreads - 1) / kThreads, kMaxBlocks)));
}

// ---- Device helpers.

__device__ __forceinline__ float ToFloat(uint32_t v, bool bf16) {
  return bf16 ? __uint_as_float(v << 16) : __half2float(__ushort_as_half(static_cast<uint16_t>(v)));
}
__device__ __forceinline__ uint32_t FromFloat(float f, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(f)) : __half_as_ushort(__float2half_rn(f));
}
__device__ __forceinline__ float HalfToFloat(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<uint16_t>(h)));
}
// The payload may sit at any byte address: fp16 words are read and written bytewise.
__device__ __forceinline__ uint32_t Load16(const uint8_t* p) { return p[0] | (p[1] << 8); }
__device__ __forceinline__ void Store16(uint8_t* p, uint32_t v) {
  // Keeps v in a 32-bit register. Without this, ptxas 13.0 (sm_90) byte-stored an fp16 fresh
  // from cvt.rn.f16.f32 with its low byte zero (seen on an H200: every group minimum came out
  // as 0xXX00; KiviTest.CudaMatchesReference caught it).
  asm("" : "+r"(v));
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// The reference's Quantize.
__device__ __forceinline__ uint32_t QuantizeOne(float x, float s, float m, uint32_t levels) {
  if (s == 0.0f) return 0;
  const float r = rintf(__fdiv_rn(__fsub_rn(x, m), s));
  if (!(r > 0.0f)) return 0;
  return r > static_cast<float>(levels) ? levels : static_cast<uint32_t>(r);
}

// A group's scale and minimum (fp16 bits) from its element range [lo, hi]; a NaN scale when the
// group had a non-finite element (the encoder then sets *d_size = 0).
struct ScaleBits {
  uint32_t scale, min;
};
__device__ __forceinline__ ScaleBits GroupScale(const Geometry& geo, float lo, float hi, bool bad) {
  lo = __fadd_rn(lo, 0.0f);
  hi = __fadd_rn(hi, 0.0f);
  const float levels = static_cast<float>((1u << geo.bits) - 1);
  return {bad ? 0x7e00u : __half_as_ushort(__float2half_rn(__fdiv_rn(__fsub_rn(hi, lo), levels))),
          __half_as_ushort(__float2half_rn(lo))};
}

// Stores group g's scale and minimum.
__device__ void StoreScale(const Geometry& geo, uint32_t g, float lo, float hi, bool bad,
                           uint8_t* out) {
  const ScaleBits b = GroupScale(geo, lo, hi, bad);
  Store16(out + 2 * g, b.scale);
  Store16(out + 2 * (geo.groups + g), b.min);
}

// Thread 0 of block 0 zeroes the padding after the minimums.
__device__ void ZeroPadding(const Geometry& geo, uint8_t* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  for (uint32_t i = 4 * geo.groups; i < geo.codes_offset; ++i) out[i] = 0;
}

__device__ void StoreSizeAndPadding(const Geometry& geo, uint8_t* out, uint64_t* d_size) {
  ZeroPadding(geo, out);
  if (blockIdx.x == 0 && threadIdx.x == 0) *d_size = geo.size;
}

// The eight elements of a 16-byte word as floats.
__device__ __forceinline__ void Unpack8(const uint4 v, bool bf16, float* x) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = ToFloat((w[i / 2] >> (16 * (i % 2))) & 0xffffu, bf16);
}

// Walks the elements e, e+1, ... giving each one's group index (the per-element path).
// Keys: row_ = token, col_ = channel, block_ = token group, in_ = token within it.
// Values: row_ = (token, head), col_ = channel of the head, block_ = group of the row,
// in_ = channel within the group.
class GroupWalker {
 public:
  __device__ GroupWalker(const Geometry& geo, uint32_t e)
      : key_(geo.key),
        row_len_(geo.key ? geo.channels : geo.head_dim),
        group_(geo.group),
        block_stride_(geo.key ? geo.channels : geo.groups_per_row) {
    row_ = e / row_len_;
    col_ = e - row_ * row_len_;
    const uint32_t along = key_ ? row_ : col_;
    block_ = along / group_;
    in_ = along - block_ * group_;
  }
  __device__ uint32_t Group() const {
    return key_ ? block_ * block_stride_ + col_ : row_ * block_stride_ + block_;
  }
  __device__ void Next() {
    if (++col_ == row_len_) {
      col_ = 0;
      ++row_;
      if (!key_) {
        block_ = in_ = 0;
        return;
      }
    } else if (key_) {
      return;
    }
    if (++in_ == group_) {
      in_ = 0;
      ++block_;
    }
  }

 private:
  bool key_;
  uint32_t row_len_, group_, block_stride_;
  uint32_t row_ = 0, col_ = 0, block_ = 0, in_ = 0;
};

// Scales and minimums of the `count` elements from e0 (a chunk).
__device__ void ChunkScales(const Geometry& geo, const uint8_t* payload, uint32_t e0,
                            uint32_t count, float* s, float* m) {
  if (geo.vec && geo.key) {
    const uint32_t t = e0 / geo.channels, c = e0 - t * geo.channels;
    const uint32_t g0 = t / geo.group * geo.channels + c;
    const uint4 sv = *reinterpret_cast<const uint4*>(payload + 2 * g0);
    const uint4 mv = *reinterpret_cast<const uint4*>(payload + 2 * (geo.groups + g0));
    const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w}, mw[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s[i] = HalfToFloat(sw[i / 2] >> (16 * (i % 2)));
      m[i] = HalfToFloat(mw[i / 2] >> (16 * (i % 2)));
    }
  } else if (geo.vec) {
    const uint32_t r = e0 / geo.head_dim, d = e0 - r * geo.head_dim;
    const uint32_t g = r * geo.groups_per_row + d / geo.group;
    const float s0 = HalfToFloat(*reinterpret_cast<const uint16_t*>(payload + 2 * g));
    const float m0 =
        HalfToFloat(*reinterpret_cast<const uint16_t*>(payload + 2 * (geo.groups + g)));
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = s0, m[i] = m0;
  } else {
    GroupWalker walk(geo, e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < count) {
        const uint32_t g = walk.Group();
        s[i] = HalfToFloat(Load16(payload + 2 * g));
        m[i] = HalfToFloat(Load16(payload + 2 * (geo.groups + g)));
        walk.Next();
      }
    }
  }
}

// The codes of chunk k (count elements) as one little-endian word.
__device__ uint64_t LoadCodes(const Geometry& geo, const uint8_t* codes, uint32_t k,
                              uint32_t count) {
  const uint8_t* p = codes + k * geo.bits;
  if (geo.vec) {
    if (geo.bits == 8) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      return v.x | (uint64_t{v.y} << 32);
    }
    return geo.bits == 4 ? *reinterpret_cast<const uint32_t*>(p)
                         : *reinterpret_cast<const uint16_t*>(p);
  }
  uint64_t code = 0;
  const uint32_t bytes = (count * geo.bits + 7) / 8;
  for (uint32_t i = 0; i < bytes; ++i) code |= uint64_t{p[i]} << (8 * i);
  return code;
}

__device__ void StoreCodes(const Geometry& geo, uint8_t* codes, uint32_t k, uint32_t count,
                           uint64_t code) {
  uint8_t* p = codes + k * geo.bits;
  if (geo.vec) {
    if (geo.bits == 8) {
      *reinterpret_cast<uint2*>(p) =
          make_uint2(static_cast<uint32_t>(code), static_cast<uint32_t>(code >> 32));
    } else if (geo.bits == 4) {
      *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(code);
    } else {
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(code);
    }
    return;
  }
  const uint32_t bytes = (count * geo.bits + 7) / 8;
  for (uint32_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(code >> (8 * i));
}

// ---- Kernels.

// Segment blockIdx.y of a batch: its elements, payload and size.
struct Batch {
  uint64_t in_stride = 0;   // elements (decoding: payload bytes)
  uint64_t out_stride = 0;  // bytes (decoding: elements)
};

__global__ void KeyStats(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                         uint64_t* d_size) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  d_size += blockIdx.y;
  StoreSizeAndPadding(geo, out, d_size);
  for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < geo.groups;
       g += gridDim.x * blockDim.x) {
    const uint32_t tb = g / geo.channels, c = g - tb * geo.channels, t0 = tb * geo.group;
    const uint32_t rows = min(geo.group, geo.tokens - t0);
    const uint16_t* p = in + t0 * geo.channels + c;
    float lo = ToFloat(p[0], geo.bf16), hi = lo;
    bool bad = false;
    // Unrolled so that a thread has 8 independent loads in flight, not one per trip.
#pragma unroll 8
    for (uint32_t r = 0; r < rows; ++r) {
      const float x = ToFloat(p[r * geo.channels], geo.bf16);
      bad |= !isfinite(x);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    StoreScale(geo, g, lo, hi, bad, out);
  }
}

__global__ void ValueStats(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                           uint64_t* d_size) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  d_size += blockIdx.y;
  StoreSizeAndPadding(geo, out, d_size);
  const uint64_t threads = uint64_t{geo.groups} * geo.width;
  // Block-uniform trip count: every lane of a warp reaches the shuffles together.
  for (uint64_t base = uint64_t{blockIdx.x} * blockDim.x; base < threads;
       base += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t tid = base + threadIdx.x;
    const bool active = tid < threads;
    const uint32_t g = active ? static_cast<uint32_t>(tid / geo.width) : 0;
    const uint32_t lane = static_cast<uint32_t>(tid % geo.width);
    float lo = INFINITY, hi = -INFINITY;
    int bad = 0;
    if (active) {
      const uint32_t row = g / geo.groups_per_row, d0 = (g - row * geo.groups_per_row) * geo.group;
      const uint32_t n = min(geo.group, geo.head_dim - d0);
      const uint16_t* p = in + row * geo.head_dim + d0;
      for (uint32_t i = lane; i < n; i += geo.width) {
        const float x = ToFloat(p[i], geo.bf16);
        bad |= !isfinite(x);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
      }
    }
    for (int offset = geo.width / 2; offset > 0; offset /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset, geo.width));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset, geo.width));
      bad |= __shfl_xor_sync(0xffffffffu, bad, offset, geo.width);
    }
    if (active && lane == 0) StoreScale(geo, g, lo, hi, bad != 0, out);
  }
}

__global__ void Quantize(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                         uint64_t* d_size) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  d_size += blockIdx.y;
  const uint32_t chunks = (geo.elements + 7) / 8, levels = (1u << geo.bits) - 1;
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks;
       k += gridDim.x * blockDim.x) {
    const uint32_t e0 = 8 * k, count = min(8u, geo.elements - e0);
    float s[8], m[8], x[8];
    ChunkScales(geo, out, e0, count, s, m);
    if (geo.vec) {
      Unpack8(*reinterpret_cast<const uint4*>(in + e0), geo.bf16, x);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = i < count ? ToFloat(in[e0 + i], geo.bf16) : 0.0f;
    }
    uint64_t code = 0;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < count) {
        bad |= !isfinite(s[i]) || !isfinite(m[i]);
        code |= uint64_t{QuantizeOne(x[i], s[i], m[i], levels)} << (i * geo.bits);
      }
    }
    StoreCodes(geo, out + geo.codes_offset, k, count, code);
    if (bad) atomicExch(reinterpret_cast<unsigned long long*>(d_size), 0ull);
  }
}

// A chunk's 8 codes in one word; kBits is geo.bits, fixed at compile time for the one-pass
// encoders below.
template <uint32_t kBits>
using Codes = std::conditional_t<kBits == 8, uint64_t, uint32_t>;

template <uint32_t kBits>
__device__ __forceinline__ Codes<kBits> QuantizeChunk(const float* x, const float* s,
                                                      const float* m) {
  Codes<kBits> code = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    code |= Codes<kBits>{QuantizeOne(x[i], s[i], m[i], (1u << kBits) - 1)} << (i * kBits);
  }
  return code;
}

template <uint32_t kBits>
__device__ __forceinline__ void StoreChunk(uint8_t* codes, uint32_t k, Codes<kBits> code) {
  uint8_t* p = codes + k * kBits;
  if constexpr (kBits == 8) {
    *reinterpret_cast<uint2*>(p) =
        make_uint2(static_cast<uint32_t>(code), static_cast<uint32_t>(code >> 32));
  } else if constexpr (kBits == 4) {
    *reinterpret_cast<uint32_t*>(p) = code;
  } else {
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(code);
  }
}

// The vector path's encoders, one kernel each (the size is stored beforehand by FillOnDevice):
// a thread finds its groups' scales and minimums, stores them, and quantizes the same elements,
// read again (from cache), into whole 8-element chunks.
// Keys: a thread takes 8 consecutive channels of a token group (one 16-byte load per row).
template <uint32_t kBits>
__global__ void KeyEncode(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                          uint64_t* d_size) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  d_size += blockIdx.y;
  ZeroPadding(geo, out);
  const uint32_t octets = geo.channels / 8;
  const uint32_t work = geo.groups / 8;
  for (uint32_t w = blockIdx.x * blockDim.x + threadIdx.x; w < work; w += gridDim.x * blockDim.x) {
    const uint32_t tb = w / octets, c = (w - tb * octets) * 8, t0 = tb * geo.group;
    const uint32_t rows = min(geo.group, geo.tokens - t0);
    const uint16_t* p = in + t0 * geo.channels + c;
    float x[8], lo[8], hi[8];
    Unpack8(*reinterpret_cast<const uint4*>(p), geo.bf16, lo);
    uint32_t bad = 0;  // bit i: channel c + i had a non-finite element
#pragma unroll
    for (int i = 0; i < 8; ++i) hi[i] = lo[i];
#pragma unroll 4
    for (uint32_t r = 0; r < rows; ++r) {
      Unpack8(*reinterpret_cast<const uint4*>(p + r * geo.channels), geo.bf16, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bad |= uint32_t{!isfinite(x[i])} << i;
        lo[i] = fminf(lo[i], x[i]);
        hi[i] = fmaxf(hi[i], x[i]);
      }
    }
    uint32_t sw[4], mw[4];
    float s[8], m[8];
    bool unusable = false;
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      const ScaleBits a = GroupScale(geo, lo[i], hi[i], (bad >> i) & 1);
      const ScaleBits b = GroupScale(geo, lo[i + 1], hi[i + 1], (bad >> (i + 1)) & 1);
      sw[i / 2] = a.scale | (b.scale << 16);
      mw[i / 2] = a.min | (b.min << 16);
      s[i] = HalfToFloat(a.scale), s[i + 1] = HalfToFloat(b.scale);
      m[i] = HalfToFloat(a.min), m[i + 1] = HalfToFloat(b.min);
    }
    const uint32_t g0 = tb * geo.channels + c;
    *reinterpret_cast<uint4*>(out + 2 * g0) = make_uint4(sw[0], sw[1], sw[2], sw[3]);
    *reinterpret_cast<uint4*>(out + 2 * (geo.groups + g0)) = make_uint4(mw[0], mw[1], mw[2], mw[3]);
#pragma unroll
    for (int i = 0; i < 8; ++i) unusable |= !isfinite(s[i]) || !isfinite(m[i]);
    if (unusable) atomicExch(reinterpret_cast<unsigned long long*>(d_size), 0ull);
#pragma unroll 4
    for (uint32_t r = 0; r < rows; ++r) {
      Unpack8(*reinterpret_cast<const uint4*>(p + r * geo.channels), geo.bf16, x);
      StoreChunk<kBits>(out + geo.codes_offset, ((t0 + r) * geo.channels + c) / 8,
                        QuantizeChunk<kBits>(x, s, m));
    }
  }
}

// Values: a thread takes one group (G consecutive channels of a row, G a multiple of 8).
template <uint32_t kBits>
__global__ void ValueEncode(Geometry geo, Batch batch, const uint16_t* __restrict__ in,
                            uint8_t* out, uint64_t* d_size) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  d_size += blockIdx.y;
  ZeroPadding(geo, out);
  for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < geo.groups;
       g += gridDim.x * blockDim.x) {
    const uint32_t row = g / geo.groups_per_row, d0 = (g - row * geo.groups_per_row) * geo.group;
    const uint32_t n = min(geo.group, geo.head_dim - d0);
    const uint32_t e0 = row * geo.head_dim + d0;
    float x[8];
    Unpack8(*reinterpret_cast<const uint4*>(in + e0), geo.bf16, x);
    float lo = x[0], hi = x[0];
    bool bad = false;
    for (uint32_t j = 0; j < n; j += 8) {
      Unpack8(*reinterpret_cast<const uint4*>(in + e0 + j), geo.bf16, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bad |= !isfinite(x[i]);
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
      }
    }
    const ScaleBits b = GroupScale(geo, lo, hi, bad);
    *reinterpret_cast<uint16_t*>(out + 2 * g) = static_cast<uint16_t>(b.scale);
    *reinterpret_cast<uint16_t*>(out + 2 * (geo.groups + g)) = static_cast<uint16_t>(b.min);
    const float s = HalfToFloat(b.scale), m = HalfToFloat(b.min);
    if (!isfinite(s) || !isfinite(m))
      atomicExch(reinterpret_cast<unsigned long long*>(d_size), 0ull);
    float sv[8], mv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) sv[i] = s, mv[i] = m;
    for (uint32_t j = 0; j < n; j += 8) {
      Unpack8(*reinterpret_cast<const uint4*>(in + e0 + j), geo.bf16, x);
      StoreChunk<kBits>(out + geo.codes_offset, (e0 + j) / 8, QuantizeChunk<kBits>(x, sv, mv));
    }
  }
}

template <uint32_t kBits>
void LaunchOnePass(const Geometry& geo, const Batch& batch, uint32_t n, const uint16_t* in,
                   uint8_t* out, uint64_t* sizes, cudaStream_t stream) {
  if (geo.key) {
    KeyEncode<kBits>
        <<<dim3(Blocks(geo.groups / 8), n), kThreads, 0, stream>>>(geo, batch, in, out, sizes);
  } else {
    ValueEncode<kBits>
        <<<dim3(Blocks(geo.groups), n), kThreads, 0, stream>>>(geo, batch, in, out, sizes);
  }
}

__global__ void Decode(Geometry geo, Batch batch, const uint8_t* __restrict__ payload,
                       uint16_t* __restrict__ out) {
  payload += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
  const uint32_t chunks = (geo.elements + 7) / 8, mask = (1u << geo.bits) - 1;
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks;
       k += gridDim.x * blockDim.x) {
    const uint32_t e0 = 8 * k, count = min(8u, geo.elements - e0);
    float s[8], m[8];
    ChunkScales(geo, payload, e0, count, s, m);
    const uint64_t code = LoadCodes(geo, payload + geo.codes_offset, k, count);
    uint32_t y[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float q = static_cast<float>(static_cast<uint32_t>(code >> (i * geo.bits)) & mask);
      const bool bad = !isfinite(s[i]) || !isfinite(m[i]);
      y[i] = bad ? (geo.bf16 ? 0x7fc0u : 0x7e00u)
                 : FromFloat(__fadd_rn(__fmul_rn(q, s[i]), m[i]), geo.bf16);
    }
    if (geo.vec) {
      *reinterpret_cast<uint4*>(out + e0) = make_uint4(y[0] | (y[1] << 16), y[2] | (y[3] << 16),
                                                       y[4] | (y[5] << 16), y[6] | (y[7] << 16));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < count) out[e0 + i] = static_cast<uint16_t>(y[i]);
      }
    }
  }
}

}  // namespace

// The most segments one launch takes (gridDim.y); larger batches are launched in pieces.
constexpr uint32_t kMaxBatch = 65535;

absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream) {
  absl::StatusOr<Geometry> geo = MakeGeometry(shape, params);
  if (!geo.ok()) return geo.status();
  if (out_stride < geo->size) {
    return absl::InvalidArgumentError(
        absl::StrCat("kivi: output has ", out_stride, " bytes, the payload needs ", geo->size));
  }
  if (count == 0) return absl::OkStatus();
  if (geo->elements == 0) {
    return FillOnDevice(d_sizes, count, 0, stream);
  }
  geo->vec = geo->vec && Aligned16(d_in) && Aligned16(d_out) &&
             (count == 1 || ((2 * in_stride) % 16 == 0 && out_stride % 16 == 0));
  const Batch batch{in_stride, out_stride};
  for (uint32_t first = 0; first < count; first += kMaxBatch) {
    const uint32_t n = std::min(kMaxBatch, count - first);
    const uint16_t* in = d_in + first * in_stride;
    uint8_t* out = d_out + first * out_stride;
    uint64_t* sizes = d_sizes + first;
    if (geo->vec) {
      KVPOOL_RETURN_IF_ERROR(FillOnDevice(sizes, n, geo->size, stream));
      if (geo->bits == 8) {
        LaunchOnePass<8>(*geo, batch, n, in, out, sizes, stream);
      } else if (geo->bits == 4) {
        LaunchOnePass<4>(*geo, batch, n, in, out, sizes, stream);
      } else {
        LaunchOnePass<2>(*geo, batch, n, in, out, sizes, stream);
      }
      continue;
    }
    if (geo->key) {
      KeyStats<<<dim3(Blocks(geo->groups), n), kThreads, 0, stream>>>(*geo, batch, in, out, sizes);
    } else {
      ValueStats<<<dim3(Blocks(uint64_t{geo->groups} * geo->width), n), kThreads, 0, stream>>>(
          *geo, batch, in, out, sizes);
    }
    Quantize<<<dim3(Blocks((geo->elements + 7) / 8), n), kThreads, 0, stream>>>(*geo, batch, in,
                                                                                out, sizes);
  }
  return FromCuda(cudaGetLastError(), "kivi encode");
}

absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream) {
  absl::StatusOr<Geometry> geo = MakeGeometry(shape, params);
  if (!geo.ok()) return geo.status();
  KVPOOL_RETURN_IF_ERROR(CheckPayloadSizes("kivi", sizes, count, geo->size));
  if (geo->elements == 0 || count == 0) return absl::OkStatus();
  geo->vec = geo->vec && Aligned16(d_payload) && Aligned16(d_out) &&
             (count == 1 || (payload_stride % 16 == 0 && (2 * out_stride) % 16 == 0));
  const Batch batch{payload_stride, out_stride};
  for (uint32_t first = 0; first < count; first += kMaxBatch) {
    const uint32_t n = std::min(kMaxBatch, count - first);
    Decode<<<dim3(Blocks((geo->elements + 7) / 8), n), kThreads, 0, stream>>>(
        *geo, batch, d_payload + first * payload_stride, d_out + first * out_stride);
  }
  return FromCuda(cudaGetLastError(), "kivi decode");
}

}  // namespace kvpool::kernels::kivi
