// The kvpool codec's CUDA encoding kernels (launched by kvpool.cu; the decoder's, and the Dims
// both share, are in kvpool_cuda_kernels.cuh), for batches of segments of one shape:
// blockIdx.y is the segment. Kept in a header so that tests/kernels/kvpool_cuda_kernels_test.cc
// runs them on the host under tests/util/cuda_emulation.h in every build. Not a public API.
// Thread-safe (stateless).
//
// Encoding (all stream-ordered, each payload's size written to sizes[y] by the device), a
// simpler valid payload than the host's (mode 1 with rank 0 everywhere: per-channel means plus
// the quantised residual in packs; raw when coding does not pay), with the fast profile's step
// search (kvpool_fast.cc) in a fixed number of launches (LaunchEncodeKernels):
//   MeansKernel      per channel: mean over a sample of the groups (MeanStride), rounded to the
//                    dtype, and the sample's sum of squares;
//   FirstStepKernel  the step at which uniform rounding error would meet the budget;
//   EvaluateKernel   on the estimate pass's sample of groups (EstimateStride), at that step:
//                    the decoder's own values, their squared error (one thread per 16-token
//                    pack, read and converted once per launch, sums in a fixed order);
//   RefineKernel     the refined step (aiming at kFastAim of the budget) and a fallback grid;
//   EvaluateKernel   every pack at the refined step: error, widths, energy, finiteness;
//   ChooseKernel     decides when its error meets the budget of the measured energy (raw when
//                    not smaller than raw, or the input not finite), else sets a second step
//                    from the error measured;
//   EvaluateKernel, ChooseKernel  the second step, then the fallback grid (2x down to 0.17x),
//                    for segments not decided yet (the others return at once); raw when none
//                    fits;
//   WriteKernel      the header, means, widths and bit planes (or the raw elements).
// The budget therefore holds by measurement, as in the reference, with its margin; most
// segments are quantised twice and an eighth (the sample, the refined step, the write).
#ifndef KVPOOL_KERNELS_KVPOOL_CUDA_ENCODER_CUH_
#define KVPOOL_KERNELS_KVPOOL_CUDA_ENCODER_CUH_

#include <cmath>
#include <cstdint>

#include "kernels/carver.h"
#include "kernels/host_device.h"
#include "kernels/kvpool_cuda_kernels.cuh"
#include "kernels/kvpool_format.h"
#include "kernels/kvpool_kernels.cuh"

namespace kvpool::kernels::kvpool::internal {

// Thread blocks per segment of the encoder's full passes (EvaluateKernel, WriteKernel) and of
// its estimate pass (every estimate_stride-th group).
KVPOOL_HD uint32_t EncodeBlocks(const Dims& dm) {
  return uint32_t((uint64_t{dm.G} * dm.HD + kThreads - 1) / kThreads);
}
KVPOOL_HD uint32_t EstimateBlocks(const Dims& dm) {
  const uint32_t groups = (dm.G + dm.estimate_stride - 1) / dm.estimate_stride;
  return uint32_t((uint64_t{groups} * dm.HD + kThreads - 1) / kThreads);
}

// ---- Encoding ---------------------------------------------------------------------------

// The steps the encoder measures, per segment: [kFirstStep] the estimate pass's, then kRefined
// steps (the first from the estimate pass's error, the second from the first's, measured only
// when the first does not fit), then a fallback grid of kGrid steps (measured only when
// neither fits).
inline constexpr uint32_t kFirstStep = 0;
inline constexpr uint32_t kRefined = 2;
inline constexpr uint32_t kGrid = 12;
inline constexpr uint32_t kSteps = 1 + kRefined + kGrid;
inline constexpr uint32_t kRawChoice = kSteps;  // EncodeState::chosen of a raw payload.

struct EncodeState {
  float steps[kSteps];
  uint32_t bad;      // Non-finite input seen.
  uint32_t decided;  // `chosen` is final: later evaluation kernels return at once.
  uint32_t chosen;   // Index into steps, or kRawChoice.
};

// One segment's encoding scratch.
struct EncodeScratch {
  EncodeState* state;
  float* mean;          // [HD] the stored means as float
  uint16_t* mean_code;  // [HD]
  double* energy;       // [HD] sum of x^2 over the means' sample
  double* err;          // [kSteps][blocks] squared error per block
  uint64_t* bytes;  // [kSteps][blocks] pack data bytes + (packs with a code beyond kMaxCode << 32)
  double* block_energy;  // [blocks] sum of x^2 of each block's packs, latest evaluation
  uint64_t* block_off;   // [blocks] data offset of each block's packs, chosen step
  uint32_t blocks;       // Blocks of a full pass (EncodeBlocks).
};

// A batch's encoding scratch: each array of EncodeScratch repeated for segments 0, 1, ..
// (carved by CarveEncodeScratch; the states together, so that one memset clears them).
struct EncodeScratchSet {
  EncodeScratch first;
  uint64_t HD;
  KVPOOL_HD EncodeScratch At(uint32_t y) const {
    const uint64_t per_step = uint64_t{kSteps} * first.blocks;
    EncodeScratch s = first;
    s.state = first.state + y;
    s.mean = first.mean + y * HD;
    s.mean_code = first.mean_code + y * HD;
    s.energy = first.energy + y * HD;
    s.err = first.err + y * per_step;
    s.bytes = first.bytes + y * per_step;
    s.block_energy = first.block_energy + uint64_t{y} * first.blocks;
    s.block_off = first.block_off + uint64_t{y} * first.blocks;
    return s;
  }
};

// Where segment y of an encoding batch lies: its elements at in + y * in_stride, its payload
// at out + y * out_stride (room for RawPayloadBytes), its size to sizes[y].
struct EncodeBatch {
  const uint16_t* in;
  uint64_t in_stride;
  uint8_t* out;
  uint64_t out_stride;
  uint64_t* sizes;
};

// Sum of v over the block in a fixed order: warp shuffles, then warp 0 over the warps' sums
// (every thread calls it; the result in thread 0). `shared`: kThreads / 32 entries.
template <typename V>
__device__ inline V WarpSum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}
template <typename V>
__device__ inline V BlockSum(V v, V* shared) {
  v = WarpSum(v);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  V sum = 0;
  if (threadIdx.x < 32) sum = WarpSum(threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : V(0));
  __syncthreads();  // shared may be reused by the next call.
  return sum;
}

// Per channel: the mean over the groups dm.mean_stride samples (rounded to the dtype) and the
// sample's sum of squares.
static __global__ void __launch_bounds__(kThreads)
    MeansKernel(EncodeBatch b, Dims dm, EncodeScratchSet set) {
  const uint16_t* in = b.in + blockIdx.y * b.in_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  const uint64_t c = uint64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (c >= dm.HD) return;
  double sum = 0, squares = 0;
  for (uint32_t g = 0; g < dm.G; g += dm.mean_stride) {
    for (uint32_t t = g * kPack; t < min(dm.T, (g + 1) * kPack); ++t) {
      const float x = ToFloatDev(dm.bf16, in[t * dm.HD + c]);
      sum += x;
      squares += double(x) * double(x);
    }
  }
  const uint16_t code = FromFloatDev(dm.bf16, float(sum / dm.mean_tokens));
  s.mean_code[c] = code;
  s.mean[c] = ToFloatDev(dm.bf16, code);
  s.energy[c] = squares;
}

// Steps [from, kSteps): `step` up to the grid, then the fallback grid around it (2x down to
// 0.17x).
__device__ inline void SetSteps(EncodeState* st, uint32_t from, double step) {
  for (uint32_t j = from; j < 1 + kRefined; ++j) st->steps[j] = float(step);
  double factor = 2.0;
  for (uint32_t k = 0; k < kGrid; ++k, factor *= 0.8) {
    st->steps[1 + kRefined + k] = float(step * factor);
  }
}

// The first step: uniform rounding error (s^2 / 12 per element) spending the budget of the
// sampled energy. Without an estimate pass (dm.estimate_stride 0) it is also the refined one.
static __global__ void __launch_bounds__(kThreads)
    FirstStepKernel(Dims dm, double target, EncodeScratchSet set) {
  const EncodeScratch s = set.At(blockIdx.y);
  __shared__ double shared[kThreads / 32];
  double e = 0;
  for (uint64_t c = threadIdx.x; c < dm.HD; c += kThreads) e += s.energy[c];
  const double energy = BlockSum(e, shared);
  if (threadIdx.x != 0) return;
  double step = std::sqrt(12.0 * energy / (double(dm.mean_tokens) * double(dm.HD))) * target;
  if (!(step >= 1e-30) || !isfinite(step)) step = 1.0;  // All zeros: any step is exact.
  s.state->steps[kFirstStep] = float(step);
  if (dm.estimate_stride == 0) SetSteps(s.state, 1, step);
}

// Pack (group g, column c): its n elements as float and its column's mean. Loaded once per
// thread, then quantised at every step measured. False when an element is not finite.
struct Pack {
  float x[kPack];
  uint32_t n;
  float mean;
};

__device__ inline bool LoadPack(const uint16_t* in, const Dims& dm, const EncodeScratch& s,
                                uint32_t g, uint64_t c, Pack* p) {
  p->n = min(kPack, dm.T - g * kPack);
  p->mean = s.mean[c];
  bool finite = true;
#pragma unroll
  for (uint32_t i = 0; i < kPack; ++i) {
    p->x[i] = i < p->n ? ToFloatDev(dm.bf16, in[(uint64_t{g} * kPack + i) * dm.HD + c]) : 0.f;
    finite &= isfinite(p->x[i]);
  }
  return finite;
}

// A pack quantised with `step` (codes nearbyint((x - mean) * inv), inv = 1 / step: one
// division per step, not per element; the decoder's values are measured either way): zigzag
// codes and their OR. False when a code exceeds kMaxCode. err += squared error of the decoded
// elements.
__device__ inline bool QuantizePack(const Pack& p, bool bf16, float step, float inv,
                                    uint32_t (&zz)[kPack], uint32_t* all, double* err) {
  *all = 0;
#pragma unroll
  for (uint32_t i = 0; i < kPack; ++i) {
    zz[i] = 0;
    if (i >= p.n) continue;
    const float v = rintf(__fmul_rn(__fsub_rn(p.x[i], p.mean), inv));
    if (!(fabsf(v) <= kMaxCode)) return false;
    const int32_t q = int32_t(v);
    zz[i] = ZigZagDev(q);
    *all |= zz[i];
    const float y = RoundTripDev(bf16, Add(p.mean, Mul(float(q), step)));
    const double diff = double(y) - double(p.x[i]);
    *err += diff * diff;
  }
  return true;
}

__device__ inline uint32_t Width(uint32_t all) { return all == 0 ? 0 : 32 - __clz(all); }

// Steps [first, first + count) measured on the packs of every stride-th group (a thread per
// pack): per block, the squared error, the data bytes and the packs whose codes do not fit,
// and the packs' energy. Returns at once when the segment's step is decided.
static __global__ void __launch_bounds__(kThreads)
    EvaluateKernel(EncodeBatch b, Dims dm, EncodeScratchSet set, uint32_t first, uint32_t count,
                   uint32_t stride) {
  const uint16_t* in = b.in + blockIdx.y * b.in_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  if (s.state->decided != 0) return;
  __shared__ double shared_d[kThreads / 32];
  __shared__ uint64_t shared_u[kThreads / 32];
  const uint64_t k = uint64_t{blockIdx.x} * kThreads + threadIdx.x;
  const uint32_t groups = (dm.G + stride - 1) / stride;
  const bool active = k < uint64_t{groups} * dm.HD;
  Pack pack;
  double energy = 0;
  if (active) {
    const uint32_t g = uint32_t(k / dm.HD) * stride;
    if (!LoadPack(in, dm, s, g, k % dm.HD, &pack)) atomicOr(&s.state->bad, 1u);
    for (uint32_t i = 0; i < pack.n; ++i) energy += double(pack.x[i]) * double(pack.x[i]);
  }
  const double block_energy = BlockSum(energy, shared_d);
  if (threadIdx.x == 0) s.block_energy[blockIdx.x] = block_energy;
  for (uint32_t j = first; j < first + count; ++j) {
    double err = 0;
    uint32_t zz[kPack], all = 0;
    uint64_t bytes = 0;
    const float step = s.state->steps[j];
    if (active) {
      bytes = QuantizePack(pack, dm.bf16, step, __fdiv_rn(1.f, step), zz, &all, &err)
                  ? 2 * Width(all)
                  : uint64_t{1} << 32;
    }
    const double block_err = BlockSum(err, shared_d);
    const uint64_t block_bytes = BlockSum(bytes, shared_u);
    if (threadIdx.x == 0) {
      s.err[uint64_t{j} * s.blocks + blockIdx.x] = block_err;
      s.bytes[uint64_t{j} * s.blocks + blockIdx.x] = block_bytes;
    }
  }
}

// After the estimate pass: the first step scaled by the square root of (kFastAim of the allowed
// error) / (the error measured), both on the sampled packs (within 4x either way), as the CPU's
// fast profile does.
static __global__ void __launch_bounds__(kThreads)
    RefineKernel(Dims dm, double target, EncodeScratchSet set) {
  const EncodeScratch s = set.At(blockIdx.y);
  __shared__ double shared_d[kThreads / 32];
  __shared__ uint64_t shared_u[kThreads / 32];
  const uint32_t blocks = EstimateBlocks(dm);
  double e = 0, en = 0;
  uint64_t bytes = 0;
  for (uint32_t i = threadIdx.x; i < blocks; i += kThreads) {
    e += s.err[uint64_t{kFirstStep} * s.blocks + i];
    en += s.block_energy[i];
    bytes += s.bytes[uint64_t{kFirstStep} * s.blocks + i];
  }
  e = BlockSum(e, shared_d);
  en = BlockSum(en, shared_d);
  bytes = BlockSum(bytes, shared_u);
  if (threadIdx.x != 0) return;
  double step = s.state->steps[kFirstStep];
  if ((bytes >> 32) == 0 && e > 0 && en > 0) {
    const double factor = std::sqrt(kFastAim * target * target * en / e);
    step *= factor < 0.25 ? 0.25 : factor > 4.0 ? 4.0 : factor;
  }
  SetSteps(s.state, 1, step);
}

// Steps [first, first + count) in order: the first whose measured error meets the budget of
// the measured energy decides (raw when its payload is not smaller than raw, as finer steps
// only cost more); a non-finite input decides raw; `last`: raw when none fits. A decided
// segment gets its size and per-block data offsets; returns at once when already decided.
// Undecided, with next < kSteps: steps from `next` on (SetSteps) from the last step measured,
// scaled by the square root of (kFastAim of the allowed error) / (its error), within
// [0.25, 0.995] (the CPU's next pass); when its codes did not fit, from the energy of every
// element (the sampled energy may have missed an outlier).
static __global__ void __launch_bounds__(kThreads)
    ChooseKernel(EncodeBatch b, Dims dm, uint64_t fixed_bytes, uint64_t raw_bytes, double target,
                 EncodeScratchSet set, uint32_t first, uint32_t count, bool last, uint32_t next) {
  const EncodeScratch s = set.At(blockIdx.y);
  EncodeState* st = s.state;
  if (st->decided != 0) return;
  __shared__ double shared_d[kThreads / 32];
  __shared__ uint64_t shared_u[kThreads / 32];
  __shared__ uint32_t chosen, found, decided;
  double en = 0;
  for (uint32_t i = threadIdx.x; i < s.blocks; i += kThreads) en += s.block_energy[i];
  en = BlockSum(en, shared_d);
  if (threadIdx.x == 0) {
    chosen = kRawChoice;
    found = 0;
  }
  for (uint32_t j = first; j < first + count; ++j) {
    double e = 0;
    uint64_t bytes = 0;
    for (uint32_t i = threadIdx.x; i < s.blocks; i += kThreads) {
      e += s.err[uint64_t{j} * s.blocks + i];
      bytes += s.bytes[uint64_t{j} * s.blocks + i];
    }
    e = BlockSum(e, shared_d);
    bytes = BlockSum(bytes, shared_u);
    const float step = st->steps[j];
    const double allowed = target * target * en;
    if (threadIdx.x == 0 && found == 0 && st->bad == 0 && (bytes >> 32) == 0 && isfinite(step) &&
        step > 0 && e <= allowed) {
      found = 1;
      if (fixed_bytes + bytes < raw_bytes) chosen = j;
    }
    if (threadIdx.x == 0 && j + 1 == first + count && next < kSteps && found == 0) {
      double following = std::sqrt(12.0 * en / double(dm.N)) * target;
      if ((bytes >> 32) == 0 && e > 0) {
        const double factor = std::sqrt(kFastAim * allowed / e);
        following = step * (factor < 0.25 ? 0.25 : factor > 0.995 ? 0.995 : factor);
      }
      if (following >= 1e-30 && isfinite(following)) SetSteps(st, next, following);
    }
  }
  if (threadIdx.x == 0) decided = found != 0 || st->bad != 0 || last;
  __syncthreads();
  if (decided == 0) return;
  if (threadIdx.x == 0) {
    st->chosen = chosen;
    st->decided = 1;
  }
  if (chosen == kRawChoice) {
    if (threadIdx.x == 0) b.sizes[blockIdx.y] = raw_bytes;
    return;
  }
  __shared__ uint64_t warp_sums[kThreads / 32];
  uint64_t carry = 0;
  for (uint32_t base = 0; base < s.blocks; base += kThreads) {
    const uint32_t i = base + threadIdx.x;
    const uint64_t v = i < s.blocks ? s.bytes[uint64_t{chosen} * s.blocks + i] : 0;
    uint64_t total;
    const uint64_t off = carry + BlockExclusiveScan<uint64_t>(v, warp_sums, &total);
    carry += total;
    if (i < s.blocks) s.block_off[i] = off;
  }
  if (threadIdx.x == 0) b.sizes[blockIdx.y] = fixed_bytes + carry;
}

// The header, ranks and means of a coded payload (block 0).
__device__ inline void WriteHead(const Dims& dm, const EncodeScratch& s, float step, uint8_t* out) {
  const uint32_t bits = __float_as_uint(step);
  if (threadIdx.x < kHeaderBytes) {
    const uint32_t t = threadIdx.x;
    out[t] = t == 0 ? kModeCoded : t < 4 ? 0 : uint8_t(bits >> (8 * (t - 4)));
  }
  for (uint32_t h = threadIdx.x; h < dm.H; h += kThreads) out[kHeaderBytes + h] = 0;
}

static __global__ void __launch_bounds__(kThreads)
    WriteKernel(EncodeBatch b, Dims dm, EncodeScratchSet set) {
  const uint16_t* in = b.in + blockIdx.y * b.in_stride;
  uint8_t* out = b.out + blockIdx.y * b.out_stride;
  const EncodeScratch s = set.At(blockIdx.y);
  __shared__ uint32_t widths[kThreads + 1];
  __shared__ uint32_t warp_sums[kThreads / 32];
  const uint32_t chosen = s.state->chosen;
  const uint64_t P = uint64_t{dm.G} * dm.HD, k = uint64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (chosen == kRawChoice) {  // Raw: the header is zeros, then the elements.
    if (blockIdx.x == 0 && threadIdx.x < kHeaderBytes) out[threadIdx.x] = 0;
    for (uint64_t i = k; i < dm.N; i += uint64_t{gridDim.x} * kThreads) {
      out[kHeaderBytes + 2 * i] = uint8_t(in[i]);
      out[kHeaderBytes + 2 * i + 1] = uint8_t(in[i] >> 8);
    }
    return;
  }
  const float step = s.state->steps[chosen];
  if (blockIdx.x == 0) WriteHead(dm, s, step, out);
  const uint64_t widths_at = kHeaderBytes + dm.H + 2 * dm.HD;  // No basis, no coefficients.
  if (k < dm.HD) {
    out[kHeaderBytes + dm.H + 2 * k] = uint8_t(s.mean_code[k]);
    out[kHeaderBytes + dm.H + 2 * k + 1] = uint8_t(s.mean_code[k] >> 8);
  }
  uint32_t zz[kPack], all = 0;
  double unused = 0;
  if (k < P) {  // Fits: ChooseKernel checked.
    Pack pack;
    LoadPack(in, dm, s, uint32_t(k / dm.HD), k % dm.HD, &pack);
    QuantizePack(pack, dm.bf16, step, __fdiv_rn(1.f, step), zz, &all, &unused);
  }
  const uint32_t w = k < P ? Width(all) : 0;
  widths[threadIdx.x] = w;
  uint32_t total;
  const uint64_t off =
      s.block_off[blockIdx.x] + BlockExclusiveScan<uint32_t>(2 * w, warp_sums, &total);
  if (k >= P) return;
  if ((k & 1) == 0) {
    const uint32_t high = k + 1 < P ? widths[threadIdx.x + 1] : 0;
    out[widths_at + k / 2] = uint8_t(w | (high << 4));
  }
  uint8_t* data = out + widths_at + (P + 1) / 2 + off;
  for (uint32_t b = 0; b < w; ++b) {
    uint32_t plane = 0;
#pragma unroll
    for (uint32_t i = 0; i < kPack; ++i) plane |= ((zz[i] >> b) & 1u) << i;
    data[2 * b] = uint8_t(plane);
    data[2 * b + 1] = uint8_t(plane >> 8);
  }
}

// ---- Host-side halves of the launcher (shared with the emulated kernel tests) ------------

// The encoding scratch of `count` segments, carved by `c` (on nullptr: counts the bytes). The
// states, which must start zeroed, are `count` EncodeStates.
inline EncodeScratchSet CarveEncodeScratch(Carver* c, const Dims& dm, uint32_t count) {
  EncodeScratchSet set;
  set.HD = dm.HD;
  set.first.blocks = EncodeBlocks(dm);
  const uint64_t n = count, per_step = uint64_t{kSteps} * set.first.blocks;
  set.first.state = c->Take<EncodeState>(n);
  set.first.mean = c->Take<float>(n * dm.HD);
  set.first.mean_code = c->Take<uint16_t>(n * dm.HD);
  set.first.energy = c->Take<double>(n * dm.HD);
  set.first.err = c->Take<double>(n * per_step);
  set.first.bytes = c->Take<uint64_t>(n * per_step);
  set.first.block_energy = c->Take<double>(n * set.first.blocks);
  set.first.block_off = c->Take<uint64_t>(n * set.first.blocks);
  return set;
}

inline uint64_t EncodeScratchBytes(const Dims& dm, uint32_t count) {
  return CarvedBytes(CarveEncodeScratch, dm, count);
}

// Bytes of the header, ranks, means and widths of a coded payload the encoder writes.
inline uint64_t EncodeFixedBytes(const Dims& dm) {
  return kHeaderBytes + dm.H + 2 * dm.HD + (uint64_t{dm.G} * dm.HD + 1) / 2;
}

// The encoder's launches for `n` segments (states zeroed), in order, through
// launch(grid_x, n, threads, shared_bytes, kernel, args...): kvpool.cu launches them on its
// stream, the emulated tests run them on the host.
template <typename Launcher>
void LaunchEncodeKernels(const Launcher& launch, const EncodeBatch& b, const Dims& dm,
                         double target, uint64_t raw_bytes, const EncodeScratchSet& set,
                         uint32_t n) {
  const uint32_t channel_blocks = uint32_t((dm.HD + kThreads - 1) / kThreads);
  const uint32_t blocks = EncodeBlocks(dm);
  const uint64_t fixed = EncodeFixedBytes(dm);
  launch(channel_blocks, n, kThreads, 0, MeansKernel, b, dm, set);
  launch(1, n, kThreads, 0, FirstStepKernel, dm, target, set);
  if (dm.estimate_stride != 0) {
    launch(EstimateBlocks(dm), n, kThreads, 0, EvaluateKernel, b, dm, set, kFirstStep, 1u,
           dm.estimate_stride);
    launch(1, n, kThreads, 0, RefineKernel, dm, target, set);
  }
  for (uint32_t j = 1; j <= kRefined; ++j) {
    launch(blocks, n, kThreads, 0, EvaluateKernel, b, dm, set, j, 1u, 1u);
    launch(1, n, kThreads, 0, ChooseKernel, b, dm, fixed, raw_bytes, target, set, j, 1u, false,
           j < kRefined ? j + 1 : kSteps);
  }
  launch(blocks, n, kThreads, 0, EvaluateKernel, b, dm, set, 1 + kRefined, kGrid, 1u);
  launch(1, n, kThreads, 0, ChooseKernel, b, dm, fixed, raw_bytes, target, set, 1 + kRefined, kGrid,
         true, kSteps);
  launch(blocks, n, kThreads, 0, WriteKernel, b, dm, set);
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_CUDA_ENCODER_CUH_
