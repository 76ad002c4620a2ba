// kivi's CUDA kernels' shared parts (kivi_cuda_kernels.cuh has the kernels and documents
// them): the segment's geometry, batch strides, launch sizes and the device helpers both the
// general and the vector path use. Not a public API.
#ifndef KVPOOL_KERNELS_KIVI_CUDA_DEVICE_CUH_
#define KVPOOL_KERNELS_KIVI_CUDA_DEVICE_CUH_

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/encoded_segment.h"
#include "kernels/kivi_layout.h"

namespace kvpool::kernels::kivi::internal {

inline constexpr int kThreads = 256;
inline constexpr uint64_t kMaxBlocks = 1 << 16;
inline constexpr unsigned kFullMask = 0xffffffffu;

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
  uint32_t lanes = 0;  // values: lanes per group in ValueEncode / ValueDecode
  uint64_t size = 0;
  bool key = false;
  bool bf16 = false;
  bool vec = false;  // the vector path; the launchers clear it for unaligned pointers
};

inline absl::StatusOr<Geometry> MakeGeometry(const SegmentShape& shape, const CodecParams& p) {
  if (!ValidParams(p)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kivi needs bits 2, 4 or 8 and a positive group, got bits ", p.bits, " group ", p.group));
  }
  if (shape.Bytes() > kMaxBlockBytes) {
    return absl::InvalidArgumentError("kivi: segment larger than the block size limit");
  }
  const Layout layout = ComputeLayout(shape, p);
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
  geo.groups = static_cast<uint32_t>(layout.groups);
  geo.codes_offset = static_cast<uint32_t>(layout.codes_offset);
  geo.size = layout.size;
  geo.width = 1;
  while (geo.width < 32 && geo.width < p.group) geo.width *= 2;
  geo.lanes = 1;
  while (geo.lanes < 32 && 8 * geo.lanes < p.group) geo.lanes *= 2;
  geo.vec = geo.key ? geo.channels % 8 == 0 : p.group % 8 == 0 && shape.head_dim % 8 == 0;
  return geo;
}

// Whether the vector path may run on these buffers: 16-byte aligned segments.
inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool VectorPathFits(const void* in, uint64_t in_stride_bytes, const void* out,
                           uint64_t out_stride_bytes, uint32_t count) {
  return Aligned16(in) && Aligned16(out) &&
         (count == 1 || (in_stride_bytes % 16 == 0 && out_stride_bytes % 16 == 0));
}

// Blocks of kThreads for `threads` threads (grid-stride loops take the rest).
inline uint32_t Blocks(uint64_t threads) {
  return static_cast<uint32_t>(
      std::max<uint64_t>(1, std::min<uint64_t>((threads + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Segment blockIdx.y of a batch: its elements, payload and size.
struct Batch {
  uint64_t in_stride = 0;   // elements (decoding: payload bytes)
  uint64_t out_stride = 0;  // bytes (decoding: elements)
};

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

// QuantizeOne with the division by s replaced by a multiplication by inv = 1 / s (one IEEE
// division per group instead of one per element), and the division itself wherever the two
// could round differently. r = (x - m) * inv lies within |r| * 3 * 2^-24 of the reference's
// rounded quotient (the reciprocal, the product and the quotient each round by at most half an
// ulp), so below 4096 (where that is under 7.4e-4) they round to different integers only when
// r lies within 1e-3 of a half-integer, and from 4096 up both clamp alike (levels <= 255).
// REQUIRES: inv == __fdiv_rn(1.0f, s).
__device__ __forceinline__ uint32_t QuantizeByReciprocal(float x, float s, float inv, float m,
                                                         uint32_t levels) {
  if (s == 0.0f) return 0;
  const float d = __fsub_rn(x, m), p = __fmul_rn(d, inv);
  float r = rintf(p);
  if (fabsf(p) < 4096.0f && fabsf(fabsf(__fsub_rn(p, r)) - 0.5f) <= 1e-3f) {
    r = rintf(__fdiv_rn(d, s));
  }
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
__device__ inline void StoreScale(const Geometry& geo, uint32_t g, float lo, float hi, bool bad,
                                  uint8_t* out) {
  const ScaleBits b = GroupScale(geo, lo, hi, bad);
  Store16(out + 2 * g, b.scale);
  Store16(out + 2 * (geo.groups + g), b.min);
}

// Thread 0 of block 0 zeroes the padding after the minimums.
__device__ inline void ZeroPadding(const Geometry& geo, uint8_t* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  for (uint32_t i = 4 * geo.groups; i < geo.codes_offset; ++i) out[i] = 0;
}

// Points a kernel's input and output (and an encoder's size slot) at its segment of the
// batch, blockIdx.y. Templates, so that the kernels' __restrict__ parameters keep it.
template <typename In, typename Out>
__device__ __forceinline__ void SelectSegment(const Batch& batch, In& in, Out& out) {
  in += blockIdx.y * batch.in_stride;
  out += blockIdx.y * batch.out_stride;
}
template <typename In, typename Out>
__device__ __forceinline__ void SelectSegment(const Batch& batch, In& in, Out& out,
                                              uint64_t*& d_size) {
  SelectSegment(batch, in, out);
  d_size += blockIdx.y;
}

__device__ inline void StoreSizeAndPadding(const Geometry& geo, uint8_t* out, uint64_t* d_size) {
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

// Scales and minimums of the `count` elements from e0 (a chunk; the general path).
__device__ inline void ChunkScales(const Geometry& geo, const uint8_t* payload, uint32_t e0,
                                   uint32_t count, float* s, float* m) {
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

// The scales and minimums of key groups g0 .. g0 + 7 (16-byte aligned; the vector path).
__device__ inline void OctetScales(const Geometry& geo, const uint8_t* payload, uint32_t g0,
                                   float* s, float* m) {
  const uint4 sv = *reinterpret_cast<const uint4*>(payload + 2 * g0);
  const uint4 mv = *reinterpret_cast<const uint4*>(payload + 2 * (geo.groups + g0));
  const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w}, mw[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    s[i] = HalfToFloat(sw[i / 2] >> (16 * (i % 2)));
    m[i] = HalfToFloat(mw[i / 2] >> (16 * (i % 2)));
  }
}

// The codes of chunk k (count elements) as one little-endian word (the general path).
__device__ inline uint64_t LoadCodes(const Geometry& geo, const uint8_t* codes, uint32_t k,
                                     uint32_t count) {
  const uint8_t* p = codes + k * geo.bits;
  uint64_t code = 0;
  const uint32_t bytes = (count * geo.bits + 7) / 8;
  for (uint32_t i = 0; i < bytes; ++i) code |= uint64_t{p[i]} << (8 * i);
  return code;
}

__device__ inline void StoreCodes(const Geometry& geo, uint8_t* codes, uint32_t k, uint32_t count,
                                  uint64_t code) {
  uint8_t* p = codes + k * geo.bits;
  const uint32_t bytes = (count * geo.bits + 7) / 8;
  for (uint32_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(code >> (8 * i));
}

}  // namespace kvpool::kernels::kivi::internal

#endif  // KVPOOL_KERNELS_KIVI_CUDA_DEVICE_CUH_
