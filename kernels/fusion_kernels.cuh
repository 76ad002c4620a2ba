// Fusion math, CUDA kernels (launched by fusion.cu): the sketch (one thread block per segment,
// one thread per projection) and the exact check (sums, then the read-back error, each split
// over a grid of thread blocks per pair and reduced in a fixed order, so results are
// deterministic). Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_FUSION_KERNELS_CUH_
#define KVPOOL_KERNELS_FUSION_KERNELS_CUH_

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/fusion.h"
#include "kernels/fusion_internal.h"

namespace kvpool::kernels::internal {

inline constexpr int kThreads = 256;     // Per thread block of the check kernels (a power of two).
inline constexpr uint32_t kSplits = 32;  // Thread blocks per pair in the check kernels.

template <bool kBf16>
__device__ __forceinline__ float Load(uint16_t h) {
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(h));
  } else {
    return __half2float(__ushort_as_half(h));
  }
}

// to_dtype(v) and back, round to nearest even: what a reader of a scaled representative gets.
template <bool kBf16>
__device__ __forceinline__ float RoundTrip(float v) {
  if constexpr (kBf16) {
    return __bfloat162float(__float2bfloat16_rn(v));
  } else {
    return __half2float(__float2half_rn(v));
  }
}

// Sketch: block i projects samples [i][0, counts[i]) (float) on the kSketchBits projections,
// stored transposed ([k][bit]) so that a warp's loads are contiguous. Each thread sums its
// projection in double in the reference's order; thread 0 packs the signs.
template <bool kBf16>
__global__ void SketchKernel(const uint16_t* samples, const uint32_t* counts,
                             const float* projections_t, uint64_t* bits) {
  __shared__ float sample[kSketchSamples];
  __shared__ uint8_t positive[kSketchBits];
  const uint32_t seg = blockIdx.x;
  const uint32_t count = counts[seg];
  for (uint32_t k = threadIdx.x; k < count; k += blockDim.x) {
    sample[k] = Load<kBf16>(samples[uint64_t{seg} * kSketchSamples + k]);
  }
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kSketchBits; b += blockDim.x) {
    double y = 0;
    for (uint32_t k = 0; k < count; ++k) {
      y += double(projections_t[uint64_t{k} * kSketchBits + b]) * double(sample[k]);
    }
    positive[b] = y > 0 ? 1 : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t word[2] = {0, 0};
    for (uint32_t b = 0; b < kSketchBits; ++b) {
      if (positive[b]) word[b / 64] |= uint64_t{1} << (b % 64);
    }
    bits[2 * uint64_t{seg}] = word[0];
    bits[2 * uint64_t{seg} + 1] = word[1];
  }
}

// Where one pair's elements are: x at xs + x_off, r at rs + r_off, n of each.
struct PairRef {
  uint64_t x_off;
  uint64_t r_off;
  uint64_t n;
};

// Sums kThreads doubles of `v` (shared memory) into v[0], in a fixed tree order.
__device__ __forceinline__ void BlockSum(double* v) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) v[threadIdx.x] += v[threadIdx.x + stride];
  }
  __syncthreads();
}

// The elements [begin, end) of this block's share of a pair of n elements.
__device__ __forceinline__ void SplitRange(uint64_t n, uint64_t* begin, uint64_t* end) {
  const uint64_t chunk = (n + kSplits - 1) / kSplits;
  const uint64_t b = uint64_t{blockIdx.x} * chunk;
  *begin = b < n ? b : n;
  *end = n - *begin < chunk ? n : *begin + chunk;
}

// Pass 1: partial <x, r>, <r, r>, <x, x> of pair blockIdx.y, share blockIdx.x, written to
// partials[(pair * kSplits + share) * 3 + {0, 1, 2}].
template <bool kBf16>
__global__ void SumsKernel(const uint16_t* xs, const uint16_t* rs, const PairRef* pairs,
                           double* partials) {
  __shared__ double acc[3][kThreads];
  const PairRef p = pairs[blockIdx.y];
  uint64_t begin, end;
  SplitRange(p.n, &begin, &end);
  double xr = 0, rr = 0, xx = 0;
  for (uint64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double a = Load<kBf16>(xs[p.x_off + i]), b = Load<kBf16>(rs[p.r_off + i]);
    xr += a * b;
    rr += b * b;
    xx += a * a;
  }
  acc[0][threadIdx.x] = xr;
  acc[1][threadIdx.x] = rr;
  acc[2][threadIdx.x] = xx;
  BlockSum(acc[0]);
  BlockSum(acc[1]);
  BlockSum(acc[2]);
  if (threadIdx.x == 0) {
    double* out = partials + (uint64_t{blockIdx.y} * kSplits + blockIdx.x) * 3;
    out[0] = acc[0][0];
    out[1] = acc[1][0];
    out[2] = acc[2][0];
  }
}

// Pass 2: partial sum of (to_dtype(scale * r[i]) - x[i])^2 of pair blockIdx.y with scales[pair]
// (pairs whose fit is final have n = 0 here).
template <bool kBf16>
__global__ void ErrorKernel(const uint16_t* xs, const uint16_t* rs, const PairRef* pairs,
                            const float* scales, double* partials) {
  __shared__ double acc[kThreads];
  const PairRef p = pairs[blockIdx.y];
  const float scale = scales[blockIdx.y];
  uint64_t begin, end;
  SplitRange(p.n, &begin, &end);
  double err = 0;
  for (uint64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float y = RoundTrip<kBf16>(scale * Load<kBf16>(rs[p.r_off + i]));
    const double d = double(y) - double(Load<kBf16>(xs[p.x_off + i]));
    err += d * d;
  }
  acc[threadIdx.x] = err;
  BlockSum(acc);
  if (threadIdx.x == 0) partials[uint64_t{blockIdx.y} * kSplits + blockIdx.x] = acc[0];
}

// --- Host-side halves of the launchers (shared with the emulated kernel tests).

// The projections transposed to [k][bit], as SketchKernel reads them.
inline std::vector<float> TransposedProjections() {
  const std::vector<float>& g = SketchProjections();
  std::vector<float> t(g.size());
  for (uint32_t b = 0; b < kSketchBits; ++b) {
    for (uint32_t k = 0; k < kSketchSamples; ++k) {
      t[uint64_t{k} * kSketchBits + b] = g[uint64_t{b} * kSketchSamples + k];
    }
  }
  return t;
}

// SketchKernel's input: each segment's sample positions ([segment][kSketchSamples], zero
// padded) and sample counts. InvalidArgument for a segment of 2^53 elements or more.
inline absl::Status GatherSamples(absl::Span<const absl::Span<const uint16_t>> segments,
                                  std::vector<uint16_t>* samples, std::vector<uint32_t>* counts) {
  samples->assign(segments.size() * uint64_t{kSketchSamples}, 0);
  counts->assign(segments.size(), 0);
  for (size_t s = 0; s < segments.size(); ++s) {
    const uint64_t n = segments[s].size();
    if (n >= (uint64_t{1} << 53)) return absl::InvalidArgumentError("segment too large to sketch");
    const uint64_t count = SampleCount(n);
    (*counts)[s] = static_cast<uint32_t>(count);
    for (uint64_t k = 0; k < count; ++k) {
      (*samples)[s * kSketchSamples + k] = segments[s][SamplePosition(k, n, count)];
    }
  }
  return absl::OkStatus();
}

// Pair i's cosine and scale from SumsKernel's partials (reduced in share order); *xx gets
// <x, x>. False when the fit is final (no error pass: ErrorKernel gets n = 0 for it).
inline bool FitFromPartials(const double* partials, size_t pair, Fit* fit, double* xx) {
  double sums[3] = {0, 0, 0};
  for (uint32_t s = 0; s < kSplits; ++s) {
    for (int j = 0; j < 3; ++j) sums[j] += partials[(pair * kSplits + s) * 3 + j];
  }
  *xx = sums[2];
  return FitFromSums(sums[0], sums[1], sums[2], fit);
}

// Pair i's rel_error from ErrorKernel's partials.
inline double RelErrorFromPartials(const double* partials, size_t pair, double xx) {
  double err = 0;
  for (uint32_t s = 0; s < kSplits; ++s) err += partials[pair * kSplits + s];
  return RelError(err, xx);
}

}  // namespace kvpool::kernels::internal

#endif  // KVPOOL_KERNELS_FUSION_KERNELS_CUH_
