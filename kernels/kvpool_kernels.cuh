// Device helpers of the kvpool codec's CUDA path (kvpool.cu): element conversions, float
// arithmetic that matches the CPU paths bit for bit, the payload's nibble/zigzag/bit-plane
// pieces and a block-wide exclusive scan. The format itself is documented at the top of
// kvpool_ref.cc. Not a public API; include from .cu files only. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KVPOOL_KERNELS_CUH_
#define KVPOOL_KERNELS_KVPOOL_KERNELS_CUH_

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {

inline constexpr int kThreads = 256;  // Threads per block of every kvpool kernel.

// ---- Bit-exact float arithmetic --------------------------------------------------------
// Round-to-nearest-even, no contraction (the build passes --fmad=false as well). A NaN result
// follows x86 SSE's rule, which the CPU paths get from the hardware: the first NaN operand,
// quieted, else the default NaN 0xffc00000. (Only crafted payloads produce NaN: means of
// NaN/Inf or steps that overflow. With NaN in both operands the CPU compiler's operand order
// decides; this rule takes the first as written in the reference.)
__device__ inline float NanLike(float a, float b) {
  if (isnan(a)) return __uint_as_float(__float_as_uint(a) | 0x400000u);
  if (isnan(b)) return __uint_as_float(__float_as_uint(b) | 0x400000u);
  return __uint_as_float(0xffc00000u);
}
__device__ inline float Add(float a, float b) {
  const float r = __fadd_rn(a, b);
  return isnan(r) ? NanLike(a, b) : r;
}
__device__ inline float Sub(float a, float b) {
  const float r = __fsub_rn(a, b);
  return isnan(r) ? NanLike(a, b) : r;
}
__device__ inline float Mul(float a, float b) {
  const float r = __fmul_rn(a, b);
  return isnan(r) ? NanLike(a, b) : r;
}

// ---- Element conversions, bit-identical to common/half.{h,cc} (NaN payloads included) ----
__device__ inline float Fp16ToFloatDev(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return __uint_as_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return __uint_as_float(sign);
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return __uint_as_float(sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13));
}

__device__ inline uint16_t FloatToFp16Dev(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;
  if (abs >= 0x477ff000u) return sign | 0x7c00u;
  if (abs < 0x38800000u) {
    if (abs < 0x33000000u) return sign;
    const uint32_t exp = abs >> 23, mant = (abs & 0x7fffffu) | 0x800000u, shift = 126 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | uint16_t(half);
  }
  uint32_t r = abs - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | uint16_t(r >> 13);
}

__device__ inline uint16_t FloatToBf16Dev(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ inline float ToFloatDev(bool bf16, uint16_t h) {
  return bf16 ? __uint_as_float(uint32_t{h} << 16) : Fp16ToFloatDev(h);
}
__device__ inline uint16_t FromFloatDev(bool bf16, float f) {
  return bf16 ? FloatToBf16Dev(f) : FloatToFp16Dev(f);
}

// to_dtype(f) and back as float, round to nearest even, with the hardware's conversions: the
// same value as ToFloatDev(FromFloatDev(f)) for every finite f and the infinities (NaN
// payloads may differ). For the encoder's error measure, which sees only finite values.
__device__ inline float RoundTripDev(bool bf16, float f) {
  return bf16 ? __bfloat162float(__float2bfloat16_rn(f)) : __half2float(__float2half_rn(f));
}

// ---- Payload pieces ----------------------------------------------------------------------
__device__ inline uint16_t Load16Dev(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
__device__ inline float LoadF32Dev(const uint8_t* p) {
  return __uint_as_float(uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) |
                         (uint32_t(p[3]) << 24));
}
__device__ inline uint32_t NibbleDev(const uint8_t* widths, uint64_t k) {
  return (widths[k / 2] >> (4 * (k & 1))) & 15;
}
__device__ inline int32_t UnZigZagDev(uint32_t u) { return int32_t(u >> 1) ^ -int32_t(u & 1); }
__device__ inline uint32_t ZigZagDev(int32_t q) { return (uint32_t(q) << 1) ^ uint32_t(q >> 31); }

// The 16 zigzag codes of one pack of width w at `data` (w u16 bit planes).
__device__ inline void UnpackPlanes(const uint8_t* data, uint32_t w, uint32_t (&u)[kPack]) {
#pragma unroll
  for (uint32_t i = 0; i < kPack; ++i) u[i] = 0;
  for (uint32_t b = 0; b < w; ++b) {
    const uint32_t plane = Load16Dev(data + 2 * b);
#pragma unroll
    for (uint32_t i = 0; i < kPack; ++i) u[i] |= ((plane >> i) & 1u) << b;
  }
}

// Exclusive prefix sum of v over the block (blockDim.x == kThreads, every thread calls it);
// *total gets the block's sum. Uses `warp_sums` (kThreads / 32 entries of shared memory).
template <typename V>
__device__ inline V BlockExclusiveScan(V v, V* warp_sums, V* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  V incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  V before = 0, sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += warp_sums[w];
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by the next call.
  *total = sum;
  return before + incl - v;
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_KERNELS_CUH_
