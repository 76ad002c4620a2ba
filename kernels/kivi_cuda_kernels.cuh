// kivi's CUDA kernels (launched by kivi.cu) and their launch sequences, for batches of segments
// of one shape: blockIdx.y picks the segment (its elements, payload and size at the Batch's
// strides), blockIdx.x strides within it. The payload format is kivi_ref.cc's. Kept in a header
// so that tests/kernels/kivi_cuda_kernels_test.cc runs them on the host under
// tests/util/cuda_emulation.h in every build; the GPU itself runs them in KiviTest.Cuda* and
// CodecBatch.* (label gpu). Not a public API. Thread-safe (stateless).
//
// The vector path (geo.vec: a chunk of 8 elements starting at a multiple of 8 never straddles
// groups, i.e. keys H*D % 8 == 0, values G % 8 == 0 and D % 8 == 0, and the pointers and strides
// are 16-byte aligned) reads every input element once, from registers between a group's
// statistics and its quantisation, with several independent 16-byte loads per thread:
//   KeyEncode   - a work item is a token group's 8 consecutive channels (an octet); the four
//                 lanes l, l+8, l+16, l+24 of a warp share item base + l % 8 and take every
//                 fourth of its rows (the first kCachedRows of them kept in registers, the rest
//                 of a longer group read again), combine their minimums and maximums by warp
//                 shuffles, and quantise their own rows. A warp reads 128 contiguous bytes of
//                 four rows per load.
//   ValueEncode - `lanes` lanes per group (the power of two >= its chunks, at most 32), each
//                 taking chunks lane, lane + lanes, ...; a warp runs kValueSteps runs of
//                 32 / lanes consecutive groups per trip, every step's first chunk loaded before
//                 any is used.
//   The launcher stores every segment's size beforehand (FillOnDevice); a group whose scale or
//   minimum is not finite (a NaN or infinite element, or bf16 data beyond fp16) sets it to 0.
//   KeyDecode / ValueDecode map threads as their encoders do (a key lane loads its octet's scales
//   once for all its rows).
// The general path (any shape or alignment), two encoding kernels and one decoding:
//   KeyStats / ValueStats - the scale and minimum of every group. Keys: one thread per group
//     (per channel of a token group), so that a warp reads 32 consecutive channels of a row.
//     Values: a group is handled by `width` lanes (the power of two >= G, at most 32) that
//     stride over its channels and combine with warp shuffles. Thread 0 of block 0 writes the
//     payload size and zeroes the padding after the minimums.
//   Quantize - one thread per 8 elements (a chunk whose codes are b whole bytes): reads the
//     elements and their groups' scales and minimums, writes the codes.
//   Decode - one thread per chunk.
// When a segment cannot be encoded, its groups' scale is stored as NaN and its size as 0, which
// no non-empty shape decodes from (DataLoss). The decode launcher checks the parameters and the
// payload size (DataLoss) but cannot report a non-finite scale or minimum without
// synchronising (the host paths return DataLoss): the kernels decode every element of such a
// group to NaN (fp16 0x7e00, bf16 0x7fc0). ParseSegment's checksum catches corrupt payloads
// before they get here.
//
// Float operations are the reference's, done with explicitly rounded intrinsics (__fsub_rn,
// __fdiv_rn, __fmul_rn, __fadd_rn, rintf, __float2half_rn, __float2bfloat16_rn) in the same
// order, so that decoded values are bit-identical to DecodeRef's and payloads to EncodeRef's.
// The vector path quantises with a per-group reciprocal instead of a division per element and
// divides only where the two could round differently (QuantizeByReciprocal).
#ifndef KVPOOL_KERNELS_KIVI_CUDA_KERNELS_CUH_
#define KVPOOL_KERNELS_KIVI_CUDA_KERNELS_CUH_

#include <cstdint>
#include <type_traits>

#include "kernels/kivi_cuda_device.cuh"

namespace kvpool::kernels::kivi::internal {

// ---- The general path's encoders.

__global__ void KeyStats(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                         uint64_t* d_size) {
  SelectSegment(batch, in, out, d_size);
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
  SelectSegment(batch, in, out, d_size);
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
  SelectSegment(batch, in, out, d_size);
  const uint32_t chunks = (geo.elements + 7) / 8, levels = (1u << geo.bits) - 1;
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks;
       k += gridDim.x * blockDim.x) {
    const uint32_t e0 = 8 * k, count = min(8u, geo.elements - e0);
    float s[8], m[8], x[8];
    ChunkScales(geo, out, e0, count, s, m);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = i < count ? ToFloat(in[e0 + i], geo.bf16) : 0.0f;
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

// A chunk's 8 codes in one word; kBits is geo.bits, fixed at compile time in the vector path's
// kernels below.
template <uint32_t kBits>
using Codes = std::conditional_t<kBits == 8, uint64_t, uint32_t>;

template <uint32_t kBits>
__device__ __forceinline__ Codes<kBits> QuantizeChunk(const float* x, const float* s,
                                                      const float* inv, const float* m) {
  Codes<kBits> code = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    code |= Codes<kBits>{QuantizeByReciprocal(x[i], s[i], inv[i], m[i], (1u << kBits) - 1)}
            << (i * kBits);
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

// The 8 elements of a chunk at `p` (16-byte aligned) and their decoded words, as 16 bytes.
__device__ __forceinline__ uint4 Load8(const uint16_t* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// Folds the 8 floats of a chunk into per-channel (keys) minimums and maximums.
__device__ __forceinline__ void ChannelRange(const float* x, float* lo, float* hi, uint32_t* bad) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    *bad |= uint32_t{!isfinite(x[i])} << i;
    lo[i] = fminf(lo[i], x[i]);
    hi[i] = fmaxf(hi[i], x[i]);
  }
}

// Folds them into one range (values).
__device__ __forceinline__ void ChunkRange(const float* x, float* lo, float* hi, bool* bad) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    *bad |= !isfinite(x[i]);
    *lo = fminf(*lo, x[i]);
    *hi = fmaxf(*hi, x[i]);
  }
}

// The chunk's 8 decoded words from its codes and its elements' scales and minimums (NaN where a
// scale or minimum is not finite).
__device__ __forceinline__ void DecodeChunk(uint64_t code, uint32_t bits, const float* s,
                                            const float* m, bool bf16, uint32_t* y) {
  const uint32_t mask = (1u << bits) - 1;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float q = static_cast<float>(static_cast<uint32_t>(code >> (i * bits)) & mask);
    const bool bad = !isfinite(s[i]) || !isfinite(m[i]);
    y[i] = bad ? (bf16 ? 0x7fc0u : 0x7e00u) : FromFloat(__fadd_rn(__fmul_rn(q, s[i]), m[i]), bf16);
  }
}

__device__ __forceinline__ uint4 PackWords(const uint32_t* y) {
  return make_uint4(y[0] | (y[1] << 16), y[2] | (y[3] << 16), y[4] | (y[5] << 16),
                    y[6] | (y[7] << 16));
}

template <uint32_t kBits>
__device__ __forceinline__ Codes<kBits> LoadChunk(const uint8_t* codes, uint32_t k) {
  const uint8_t* p = codes + k * kBits;
  if constexpr (kBits == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    return v.x | (uint64_t{v.y} << 32);
  } else if constexpr (kBits == 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return *reinterpret_cast<const uint16_t*>(p);
  }
}

// ---- The vector path.

inline constexpr uint32_t kKeyLanes = 4;    // Lanes sharing a key work item.
inline constexpr uint32_t kCachedRows = 8;  // Rows a key lane keeps in registers (4 x 8 = G 32).
inline constexpr uint32_t kValueSteps = 4;  // Runs of groups a value lane takes per trip.

// A key work item: token group tb's channels [c, c + 8).
struct KeyItem {
  uint32_t first;  // element index of (t0, c), t0 = tb * G
  uint32_t rows;   // the group's tokens; 0 when the lane has no item
  uint32_t g0;     // group index of channel c
};

__device__ __forceinline__ KeyItem KeyItemOf(const Geometry& geo, uint32_t w) {
  KeyItem it{0, 0, 0};
  if (w >= geo.groups / 8) return it;
  const uint32_t octets = geo.channels / 8, tb = w / octets, c = (w - tb * octets) * 8;
  const uint32_t t0 = tb * geo.group;
  it.first = t0 * geo.channels + c;
  it.rows = min(geo.group, geo.tokens - t0);
  it.g0 = tb * geo.channels + c;
  return it;
}

// The first key work item of the calling warp's trip, and the items one trip advances.
__device__ __forceinline__ uint32_t FirstKeyItem() {
  return (blockIdx.x * blockDim.x + threadIdx.x) / 32 * 8;
}
__device__ __forceinline__ uint32_t KeyItemStride() { return gridDim.x * blockDim.x / 32 * 8; }

template <uint32_t kBits>
__global__ void KeyEncode(Geometry geo, Batch batch, const uint16_t* __restrict__ in, uint8_t* out,
                          uint64_t* d_size) {
  SelectSegment(batch, in, out, d_size);
  ZeroPadding(geo, out);
  uint8_t* codes = out + geo.codes_offset;
  const uint32_t lane = threadIdx.x % 32, q = lane / 8, octets = geo.channels / 8;
  // Warp-uniform trips: every lane reaches the shuffles together.
  for (uint32_t base = FirstKeyItem(); base < geo.groups / 8; base += KeyItemStride()) {
    const KeyItem it = KeyItemOf(geo, base + lane % 8);
    const uint16_t* p = in + it.first;
    uint4 cached[kCachedRows];
#pragma unroll
    for (uint32_t i = 0; i < kCachedRows; ++i) {
      const uint32_t r = q + kKeyLanes * i;
      if (r < it.rows) cached[i] = Load8(p + r * geo.channels);
    }
    float x[8], lo[8], hi[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) lo[i] = INFINITY, hi[i] = -INFINITY;
    uint32_t bad = 0;  // bit i: channel c + i had a non-finite element
#pragma unroll
    for (uint32_t i = 0; i < kCachedRows; ++i) {
      if (q + kKeyLanes * i < it.rows) {
        Unpack8(cached[i], geo.bf16, x);
        ChannelRange(x, lo, hi, &bad);
      }
    }
    for (uint32_t r = q + kKeyLanes * kCachedRows; r < it.rows; r += kKeyLanes) {
      Unpack8(Load8(p + r * geo.channels), geo.bf16, x);
      ChannelRange(x, lo, hi, &bad);
    }
    // The item's lanes (8 and 16 apart) combine their rows.
#pragma unroll
    for (int offset = 8; offset < 32; offset *= 2) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        lo[i] = fminf(lo[i], __shfl_xor_sync(kFullMask, lo[i], offset));
        hi[i] = fmaxf(hi[i], __shfl_xor_sync(kFullMask, hi[i], offset));
      }
      bad |= __shfl_xor_sync(kFullMask, bad, offset);
    }
    if (it.rows == 0) continue;
    uint32_t sw[4], mw[4];
    float s[8], inv[8], m[8];
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
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      unusable |= !isfinite(s[i]) || !isfinite(m[i]);
      inv[i] = __fdiv_rn(1.0f, s[i]);
    }
    if (q == 0) {
      *reinterpret_cast<uint4*>(out + 2 * it.g0) = make_uint4(sw[0], sw[1], sw[2], sw[3]);
      *reinterpret_cast<uint4*>(out + 2 * (geo.groups + it.g0)) =
          make_uint4(mw[0], mw[1], mw[2], mw[3]);
      if (unusable) atomicExch(reinterpret_cast<unsigned long long*>(d_size), 0ull);
    }
    const uint32_t chunk = it.first / 8;
#pragma unroll
    for (uint32_t i = 0; i < kCachedRows; ++i) {
      const uint32_t r = q + kKeyLanes * i;
      if (r < it.rows) {
        Unpack8(cached[i], geo.bf16, x);
        StoreChunk<kBits>(codes, chunk + r * octets, QuantizeChunk<kBits>(x, s, inv, m));
      }
    }
    for (uint32_t r = q + kKeyLanes * kCachedRows; r < it.rows; r += kKeyLanes) {
      Unpack8(Load8(p + r * geo.channels), geo.bf16, x);
      StoreChunk<kBits>(codes, chunk + r * octets, QuantizeChunk<kBits>(x, s, inv, m));
    }
  }
}

template <uint32_t kBits>
__global__ void KeyDecode(Geometry geo, Batch batch, const uint8_t* __restrict__ payload,
                          uint16_t* __restrict__ out) {
  SelectSegment(batch, payload, out);
  const uint8_t* codes = payload + geo.codes_offset;
  const uint32_t lane = threadIdx.x % 32, q = lane / 8, octets = geo.channels / 8;
  for (uint32_t base = FirstKeyItem(); base < geo.groups / 8; base += KeyItemStride()) {
    const KeyItem it = KeyItemOf(geo, base + lane % 8);
    if (it.rows == 0) continue;
    const uint32_t chunk = it.first / 8;
    float s[8], m[8];
    OctetScales(geo, payload, it.g0, s, m);
    Codes<kBits> cached[kCachedRows];
#pragma unroll
    for (uint32_t i = 0; i < kCachedRows; ++i) {
      const uint32_t r = q + kKeyLanes * i;
      if (r < it.rows) cached[i] = LoadChunk<kBits>(codes, chunk + r * octets);
    }
    uint32_t y[8];
#pragma unroll
    for (uint32_t i = 0; i < kCachedRows; ++i) {
      const uint32_t r = q + kKeyLanes * i;
      if (r < it.rows) {
        DecodeChunk(cached[i], kBits, s, m, geo.bf16, y);
        *reinterpret_cast<uint4*>(out + it.first + r * geo.channels) = PackWords(y);
      }
    }
    for (uint32_t r = q + kKeyLanes * kCachedRows; r < it.rows; r += kKeyLanes) {
      DecodeChunk(LoadChunk<kBits>(codes, chunk + r * octets), kBits, s, m, geo.bf16, y);
      *reinterpret_cast<uint4*>(out + it.first + r * geo.channels) = PackWords(y);
    }
  }
}

// A value group: its first element and element count (0 when the lane has no group).
struct ValueGroup {
  uint32_t e0, n;
};

__device__ __forceinline__ ValueGroup ValueGroupOf(const Geometry& geo, uint32_t g) {
  if (g >= geo.groups) return {0, 0};
  const uint32_t row = g / geo.groups_per_row, d0 = (g - row * geo.groups_per_row) * geo.group;
  return {row * geo.head_dim + d0, min(geo.group, geo.head_dim - d0)};
}

// The groups of the calling warp's trip start at FirstValueGroup(); step i's group of a lane is
// that + i * 32 / lanes + lane / lanes.
__device__ __forceinline__ uint32_t FirstValueGroup(const Geometry& geo) {
  return (blockIdx.x * blockDim.x + threadIdx.x) / 32 * (32 / geo.lanes * kValueSteps);
}
__device__ __forceinline__ uint32_t ValueGroupStride(const Geometry& geo) {
  return gridDim.x * blockDim.x / 32 * (32 / geo.lanes * kValueSteps);
}

template <uint32_t kBits>
__global__ void ValueEncode(Geometry geo, Batch batch, const uint16_t* __restrict__ in,
                            uint8_t* out, uint64_t* d_size) {
  SelectSegment(batch, in, out, d_size);
  ZeroPadding(geo, out);
  uint8_t* codes = out + geo.codes_offset;
  const uint32_t lane = threadIdx.x % 32, j = 8 * (lane % geo.lanes), step = 32 / geo.lanes;
  const uint32_t next = 8 * geo.lanes;  // a lane's next chunk of a long group
  for (uint32_t base = FirstValueGroup(geo); base < geo.groups; base += ValueGroupStride(geo)) {
    ValueGroup vg[kValueSteps];
    uint4 cached[kValueSteps];
#pragma unroll
    for (uint32_t i = 0; i < kValueSteps; ++i) {
      vg[i] = ValueGroupOf(geo, base + i * step + lane / geo.lanes);
      if (j < vg[i].n) cached[i] = Load8(in + vg[i].e0 + j);
    }
    float x[8], lo[kValueSteps], hi[kValueSteps];
    bool bad[kValueSteps];
#pragma unroll
    for (uint32_t i = 0; i < kValueSteps; ++i) {
      lo[i] = INFINITY, hi[i] = -INFINITY, bad[i] = false;
      if (j < vg[i].n) {
        Unpack8(cached[i], geo.bf16, x);
        ChunkRange(x, &lo[i], &hi[i], &bad[i]);
      }
      for (uint32_t k = j + next; k < vg[i].n; k += next) {
        Unpack8(Load8(in + vg[i].e0 + k), geo.bf16, x);
        ChunkRange(x, &lo[i], &hi[i], &bad[i]);
      }
    }
    for (uint32_t offset = geo.lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (uint32_t i = 0; i < kValueSteps; ++i) {
        lo[i] = fminf(lo[i], __shfl_xor_sync(kFullMask, lo[i], offset));
        hi[i] = fmaxf(hi[i], __shfl_xor_sync(kFullMask, hi[i], offset));
        bad[i] = __shfl_xor_sync(kFullMask, int{bad[i]}, offset) | bad[i];
      }
    }
#pragma unroll
    for (uint32_t i = 0; i < kValueSteps; ++i) {
      if (vg[i].n == 0) continue;
      const ScaleBits b = GroupScale(geo, lo[i], hi[i], bad[i]);
      const float s = HalfToFloat(b.scale), m = HalfToFloat(b.min);
      if (j == 0) {
        const uint32_t g = base + i * step + lane / geo.lanes;
        *reinterpret_cast<uint16_t*>(out + 2 * g) = static_cast<uint16_t>(b.scale);
        *reinterpret_cast<uint16_t*>(out + 2 * (geo.groups + g)) = static_cast<uint16_t>(b.min);
        if (!isfinite(s) || !isfinite(m)) {
          atomicExch(reinterpret_cast<unsigned long long*>(d_size), 0ull);
        }
      }
      const float inv = __fdiv_rn(1.0f, s);
      float sv[8], iv[8], mv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) sv[e] = s, iv[e] = inv, mv[e] = m;
      if (j < vg[i].n) {
        Unpack8(cached[i], geo.bf16, x);
        StoreChunk<kBits>(codes, (vg[i].e0 + j) / 8, QuantizeChunk<kBits>(x, sv, iv, mv));
      }
      for (uint32_t k = j + next; k < vg[i].n; k += next) {
        Unpack8(Load8(in + vg[i].e0 + k), geo.bf16, x);
        StoreChunk<kBits>(codes, (vg[i].e0 + k) / 8, QuantizeChunk<kBits>(x, sv, iv, mv));
      }
    }
  }
}

template <uint32_t kBits>
__global__ void ValueDecode(Geometry geo, Batch batch, const uint8_t* __restrict__ payload,
                            uint16_t* __restrict__ out) {
  SelectSegment(batch, payload, out);
  const uint8_t* codes = payload + geo.codes_offset;
  const uint32_t lane = threadIdx.x % 32, j = 8 * (lane % geo.lanes), step = 32 / geo.lanes;
  const uint32_t next = 8 * geo.lanes;
  for (uint32_t base = FirstValueGroup(geo); base < geo.groups; base += ValueGroupStride(geo)) {
    ValueGroup vg[kValueSteps];
    Codes<kBits> cached[kValueSteps];
    uint32_t sm[kValueSteps][2];
#pragma unroll
    for (uint32_t i = 0; i < kValueSteps; ++i) {
      const uint32_t g = base + i * step + lane / geo.lanes;
      vg[i] = ValueGroupOf(geo, g);
      if (j < vg[i].n) {
        cached[i] = LoadChunk<kBits>(codes, (vg[i].e0 + j) / 8);
        sm[i][0] = *reinterpret_cast<const uint16_t*>(payload + 2 * g);
        sm[i][1] = *reinterpret_cast<const uint16_t*>(payload + 2 * (geo.groups + g));
      }
    }
    uint32_t y[8];
#pragma unroll
    for (uint32_t i = 0; i < kValueSteps; ++i) {
      if (j >= vg[i].n) continue;
      float s[8], m[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) s[e] = HalfToFloat(sm[i][0]), m[e] = HalfToFloat(sm[i][1]);
      DecodeChunk(cached[i], kBits, s, m, geo.bf16, y);
      *reinterpret_cast<uint4*>(out + vg[i].e0 + j) = PackWords(y);
      for (uint32_t k = j + next; k < vg[i].n; k += next) {
        DecodeChunk(LoadChunk<kBits>(codes, (vg[i].e0 + k) / 8), kBits, s, m, geo.bf16, y);
        *reinterpret_cast<uint4*>(out + vg[i].e0 + k) = PackWords(y);
      }
    }
  }
}

// ---- The general path's decoder.

__global__ void Decode(Geometry geo, Batch batch, const uint8_t* __restrict__ payload,
                       uint16_t* __restrict__ out) {
  SelectSegment(batch, payload, out);
  const uint32_t chunks = (geo.elements + 7) / 8;
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks;
       k += gridDim.x * blockDim.x) {
    const uint32_t e0 = 8 * k, count = min(8u, geo.elements - e0);
    float s[8], m[8];
    ChunkScales(geo, payload, e0, count, s, m);
    uint32_t y[8];
    DecodeChunk(LoadCodes(geo, payload + geo.codes_offset, k, count), geo.bits, s, m, geo.bf16, y);
    for (uint32_t i = 0; i < count; ++i) out[e0 + i] = static_cast<uint16_t>(y[i]);
  }
}

// ---- Launch sequences, for `n` segments, through a launcher (kernels/cuda_scratch.h's
// StreamLauncher; the tests' EmulatedLauncher): launch(grid_x, n, threads, shared_bytes, kernel,
// args...).

using EncodeKernel = void (*)(Geometry, Batch, const uint16_t*, uint8_t*, uint64_t*);
using DecodeKernel = void (*)(Geometry, Batch, const uint8_t*, uint16_t*);

template <uint32_t kBits>
EncodeKernel VectorEncoder(bool key) {
  return key ? KeyEncode<kBits> : ValueEncode<kBits>;
}
template <uint32_t kBits>
DecodeKernel VectorDecoder(bool key) {
  return key ? KeyDecode<kBits> : ValueDecode<kBits>;
}

// Blocks for the vector path: keys 8 items per warp, values 32 / lanes * kValueSteps groups.
inline uint32_t VectorBlocks(const Geometry& geo) {
  const uint64_t per_warp = geo.key ? 8 : 32 / geo.lanes * kValueSteps;
  const uint64_t units = geo.key ? geo.groups / 8 : geo.groups;
  return Blocks((units + per_warp - 1) / per_warp * 32);
}

// REQUIRES (vector path): every size holds geo.size already.
template <typename Launcher>
void LaunchEncodeKernels(const Launcher& launch, const Geometry& geo, const Batch& batch,
                         uint32_t n, const uint16_t* in, uint8_t* out, uint64_t* sizes) {
  if (geo.vec) {
    const EncodeKernel kernel = geo.bits == 8   ? VectorEncoder<8>(geo.key)
                                : geo.bits == 4 ? VectorEncoder<4>(geo.key)
                                                : VectorEncoder<2>(geo.key);
    launch(VectorBlocks(geo), n, kThreads, 0, kernel, geo, batch, in, out, sizes);
    return;
  }
  if (geo.key) {
    launch(Blocks(geo.groups), n, kThreads, 0, KeyStats, geo, batch, in, out, sizes);
  } else {
    launch(Blocks(uint64_t{geo.groups} * geo.width), n, kThreads, 0, ValueStats, geo, batch, in,
           out, sizes);
  }
  launch(Blocks((geo.elements + 7) / 8), n, kThreads, 0, Quantize, geo, batch, in, out, sizes);
}

template <typename Launcher>
void LaunchDecodeKernels(const Launcher& launch, const Geometry& geo, const Batch& batch,
                         uint32_t n, const uint8_t* payload, uint16_t* out) {
  if (geo.vec) {
    const DecodeKernel kernel = geo.bits == 8   ? VectorDecoder<8>(geo.key)
                                : geo.bits == 4 ? VectorDecoder<4>(geo.key)
                                                : VectorDecoder<2>(geo.key);
    launch(VectorBlocks(geo), n, kThreads, 0, kernel, geo, batch, payload, out);
    return;
  }
  launch(Blocks((geo.elements + 7) / 8), n, kThreads, 0, Decode, geo, batch, payload, out);
}

}  // namespace kvpool::kernels::kivi::internal

#endif  // KVPOOL_KERNELS_KIVI_CUDA_KERNELS_CUH_
