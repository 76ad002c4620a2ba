// Runs CUDA kernel source on the host, for tests of kernels on machines without a GPU: the
// built-ins a kernel header uses (threadIdx, blockIdx, blockDim, gridDim, __syncthreads,
// __shared__ and dynamic shared memory, the fp16/bf16 conversions, full-warp shuffles, atomics,
// the rounding float intrinsics) mapped onto host threads. Launch() runs a grid with one host
// thread per CUDA thread of a block; the threads walk the blocks in order together, so __shared__
// variables (function statics here) belong to one block at a time. A shuffle is a barrier of
// the 32 threads of its warp, so every lane must call it (as CUDA's full-mask shuffles
// require). Include it before the kernel header, in one test file only, built with
// -ffp-contract=off (the CUDA build's --fmad=false). Emulates semantics, not timing or the
// memory model beyond __syncthreads and the shuffles.
#ifndef KVPOOL_TESTS_UTIL_CUDA_EMULATION_H_
#define KVPOOL_TESTS_UTIL_CUDA_EMULATION_H_

#if defined(__CUDACC__)
#error "cuda_emulation.h is for host compilers"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/half.h"

namespace kvpool::testing::cuda_emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// A reusable barrier for the threads of one emulated block (spins with yield: far cheaper than
// a condition variable when hundreds of threads share two cores).
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void Wait() {
    const uint64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) std::this_thread::yield();
  }

 private:
  const unsigned count_;
  std::atomic<unsigned> arrived_{0};
  std::atomic<uint64_t> generation_{0};
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;
inline Barrier* barrier = nullptr;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;  // One per warp of the block.
inline std::vector<uint64_t> warp_slots;                     // One per thread of the block.

// The value `v` of lane `src` of the calling thread's warp (every lane of the warp calls).
template <typename V>
V Shuffle(V v, unsigned src) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffles move up to 64 bits");
  const unsigned t = thread_idx.x, warp = t / 32;
  std::memcpy(&warp_slots[t], &v, sizeof(V));
  warp_barriers[warp]->Wait();
  V out;
  std::memcpy(&out, &warp_slots[warp * 32 + src], sizeof(V));
  warp_barriers[warp]->Wait();  // Every lane has read before the slots are reused.
  return out;
}

inline std::vector<uint64_t> dynamic_shared;  // A launch's dynamic shared memory.

// Runs `kernel` (a lambda calling the __global__ function) over grid (gx, gy) x `threads`, with
// `shared_bytes` of dynamic shared memory (KVPOOL_DYNAMIC_SHARED).
inline void Launch(unsigned gx, unsigned gy, unsigned threads, uint64_t shared_bytes,
                   const std::function<void()>& kernel) {
  dynamic_shared.assign((shared_bytes + 7) / 8, 0);
  grid_dim = {gx, gy, 1};
  block_dim = {threads, 1, 1};
  Barrier b(threads);
  barrier = &b;
  warp_barriers.clear();
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
    warp_barriers.push_back(std::make_unique<Barrier>(std::min(32u, threads - 32 * w)));
  }
  warp_slots.assign(threads, 0);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = {t, 0, 0};
      for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
          block_idx = {x, y, 0};
          kernel();
          b.Wait();  // The block is done before its shared memory is reused.
        }
      }
    });
  }
  for (std::thread& t : pool) t.join();
  barrier = nullptr;
}
inline void Launch(unsigned gx, unsigned gy, unsigned threads,
                   const std::function<void()>& kernel) {
  Launch(gx, gy, threads, 0, kernel);
}

// 256-byte aligned host memory standing in for a device allocation.
class HostBuffer {
 public:
  explicit HostBuffer(uint64_t bytes) : words_((bytes + 511) / 8, 0) {}
  uint8_t* data() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(words_.data());
    return reinterpret_cast<uint8_t*>((p + 255) & ~uintptr_t{255});
  }

 private:
  std::vector<uint64_t> words_;
};

// Payloads staged as a batch decoder reads them: payload i at data() + i * stride(), the stride
// the longest payload's size, with their sizes.
class StagedPayloads {
 public:
  explicit StagedPayloads(const std::vector<std::string>& payloads)
      : stride_(Longest(payloads)), buffer_(stride_ * payloads.size()) {
    for (size_t i = 0; i < payloads.size(); ++i) {
      std::memcpy(buffer_.data() + i * stride_, payloads[i].data(), payloads[i].size());
      sizes_.push_back(payloads[i].size());
    }
  }
  const uint8_t* data() { return buffer_.data(); }
  uint64_t stride() const { return stride_; }
  const uint64_t* sizes() const { return sizes_.data(); }

 private:
  static uint64_t Longest(const std::vector<std::string>& payloads) {
    uint64_t n = 0;
    for (const std::string& p : payloads) n = std::max<uint64_t>(n, p.size());
    return n;
  }
  uint64_t stride_;
  HostBuffer buffer_;
  std::vector<uint64_t> sizes_;
};

// Runs kernel(args...) over grid (grid_x, n) as Launch does: the launcher of the kernel
// headers' launch sequences (kernels/cuda_scratch.h's StreamLauncher on a GPU).
struct EmulatedLauncher {
  template <typename Kernel, typename... A>
  void operator()(unsigned grid_x, unsigned n, unsigned threads, uint64_t shared_bytes,
                  Kernel kernel, const A&... args) const {
    Launch(grid_x, n, threads, shared_bytes, [&] { kernel(args...); });
  }
};

struct Half {
  uint16_t bits;
};
struct Bf16 {
  uint16_t bits;
};

}  // namespace kvpool::testing::cuda_emulation

#define threadIdx ::kvpool::testing::cuda_emulation::thread_idx
#define blockIdx ::kvpool::testing::cuda_emulation::block_idx
#define blockDim ::kvpool::testing::cuda_emulation::block_dim
#define gridDim ::kvpool::testing::cuda_emulation::grid_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define KVPOOL_DYNAMIC_SHARED(T, name) \
  T* const name = reinterpret_cast<T*>(::kvpool::testing::cuda_emulation::dynamic_shared.data())

// CUDA's vector types (host alignment: a kernel's 16-byte accesses need only be legal here).
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using std::isfinite;
using std::isnan;
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

inline void __syncthreads() { ::kvpool::testing::cuda_emulation::barrier->Wait(); }
template <typename V>
inline V __shfl_sync(unsigned, V v, int src, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  return ::kvpool::testing::cuda_emulation::Shuffle(v, lane / width * width + src % width);
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned src = lane ^ unsigned(mask);
  return ::kvpool::testing::cuda_emulation::Shuffle(v, src / width == lane / width ? src : lane);
}
template <typename V>
inline V __shfl_up_sync(unsigned, V v, int delta) {
  const unsigned lane = threadIdx.x % 32;
  return ::kvpool::testing::cuda_emulation::Shuffle(v,
                                                    lane >= unsigned(delta) ? lane - delta : lane);
}
template <typename V>
inline V __shfl_down_sync(unsigned, V v, int delta) {
  const unsigned lane = threadIdx.x % 32;
  return ::kvpool::testing::cuda_emulation::Shuffle(v, lane + delta < 32 ? lane + delta : lane);
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v &&
         !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline float __uint_as_float(unsigned u) { return ::kvpool::BitsToFloat(u); }
inline unsigned __float_as_uint(float f) { return ::kvpool::FloatBits(f); }
// Round to nearest even, as the host's float arithmetic (no contraction: see the top).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline unsigned __float2uint_rn(float f) {  // Saturating, NaN to 0, as the GPU's conversion.
  if (!(f > 0)) return 0;
  return f >= 4294967296.0f ? 0xffffffffu : unsigned(std::nearbyint(f));
}
inline ::kvpool::testing::cuda_emulation::Half __ushort_as_half(uint16_t h) { return {h}; }
inline ::kvpool::testing::cuda_emulation::Bf16 __ushort_as_bfloat16(uint16_t h) { return {h}; }
inline uint16_t __half_as_ushort(::kvpool::testing::cuda_emulation::Half h) { return h.bits; }
inline uint16_t __bfloat16_as_ushort(::kvpool::testing::cuda_emulation::Bf16 h) { return h.bits; }
inline float __half2float(::kvpool::testing::cuda_emulation::Half h) {
  return ::kvpool::Fp16ToFloat(h.bits);
}
inline float __bfloat162float(::kvpool::testing::cuda_emulation::Bf16 h) {
  return ::kvpool::Bf16ToFloat(h.bits);
}
inline ::kvpool::testing::cuda_emulation::Half __float2half_rn(float f) {
  return {::kvpool::FloatToFp16(f)};
}
inline ::kvpool::testing::cuda_emulation::Bf16 __float2bfloat16_rn(float f) {
  return {::kvpool::FloatToBf16(f)};
}

#endif  // KVPOOL_TESTS_UTIL_CUDA_EMULATION_H_
