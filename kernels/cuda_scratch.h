// Device allocations, events and a stream owned by one call, released on scope exit (.cu files
// only): the staging the CUDA launchers' host wrappers share. Confined to one thread.
#ifndef KVPOOL_KERNELS_CUDA_SCRATCH_H_
#define KVPOOL_KERNELS_CUDA_SCRATCH_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/status_macros.h"
#include "kernels/carver.h"
#include "kernels/cuda_status.h"

namespace kvpool::kernels {

// d[i] = value for i < count, stream-ordered (fixed-size formats' payload sizes); device.cu.
absl::Status FillOnDevice(uint64_t* d, uint32_t count, uint64_t value, cudaStream_t stream);

// Copies `count` payload sizes from host memory (pageable or not) to d_sizes, stream-ordered,
// as kernel parameters: a copy from pageable memory may synchronise the stream; device.cu.
absl::Status CopySizesToDevice(const uint64_t* sizes, uint32_t count, uint64_t* d_sizes,
                               cudaStream_t stream);

// Segments per set of a batch launcher's launches, `per_segment` bytes of scratch each: as many
// as fit 256 MiB of scratch, at least one, at most gridDim.y's limit (65535).
inline uint32_t BatchChunk(uint64_t per_segment, uint32_t count) {
  constexpr uint64_t kScratchBudget = uint64_t{256} << 20;
  const uint64_t fit = std::max<uint64_t>(1, kScratchBudget / std::max<uint64_t>(per_segment, 1));
  return uint32_t(std::min<uint64_t>({fit, 65535, count}));
}

// Launches kernel<<<(grid_x, n), threads, shared_bytes, stream>>>(args...): the launcher the
// kernel headers' launch sequences take (the emulated tests pass their own).
struct StreamLauncher {
  cudaStream_t stream;
  template <typename... P, typename... A>
  void operator()(uint32_t grid_x, uint32_t n, uint32_t threads, uint64_t shared_bytes,
                  void (*kernel)(P...), const A&... args) const {
    kernel<<<dim3(grid_x, n), threads, shared_bytes, stream>>>(args...);
  }
};

// One device allocation from the stream-ordered allocator, freed (stream-ordered) on scope
// exit: scratch for a launcher's kernels that never makes the caller's stream wait.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    if (base_ != nullptr) cudaFreeAsync(base_, stream_);
  }
  absl::Status Allocate(uint64_t bytes) {
    return FromCuda(cudaMallocAsync(&base_, std::max<uint64_t>(bytes, 1), stream_), "scratch");
  }
  uint8_t* get() const { return static_cast<uint8_t*>(base_); }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
};

// A batch decoder's device memory in one stream-ordered allocation: the payload sizes, copied
// from the host (CopySizesToDevice), then `scratch_bytes` for its kernels.
class DecodeBatchScratch {
 public:
  explicit DecodeBatchScratch(cudaStream_t stream) : buffer_(stream), stream_(stream) {}
  absl::Status Allocate(const uint64_t* sizes, uint32_t count, uint64_t scratch_bytes) {
    Carver carver(nullptr);
    carver.Take<uint64_t>(count);
    sizes_bytes_ = carver.used();
    KVPOOL_RETURN_IF_ERROR(buffer_.Allocate(sizes_bytes_ + scratch_bytes));
    return CopySizesToDevice(sizes, count, d_sizes(), stream_);
  }
  uint64_t* d_sizes() const { return reinterpret_cast<uint64_t*>(buffer_.get()); }
  uint8_t* scratch() const { return buffer_.get() + sizes_bytes_; }

 private:
  StreamScratch buffer_;
  cudaStream_t stream_;
  uint64_t sizes_bytes_ = 0;
};

class CudaScratch {
 public:
  CudaScratch() = default;
  CudaScratch(const CudaScratch&) = delete;
  CudaScratch& operator=(const CudaScratch&) = delete;
  // Destroys the owned stream (after its queued work) and events, then frees the memory
  // (cudaFree waits for the device).
  ~CudaScratch() {
    if (own_ != nullptr) cudaStreamDestroy(own_);
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    for (void* p : blocks_) cudaFree(p);
  }

  // `count` elements of T (at least one byte is allocated); ResourceExhausted when the device
  // is full.
  template <typename T>
  absl::StatusOr<T*> Alloc(uint64_t count) {
    void* p = nullptr;
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&p, std::max<uint64_t>(count * sizeof(T), 1)));
    blocks_.push_back(p);
    return static_cast<T*>(p);
  }

  // `given` when not null, else a stream of this scratch's own (created on the first call).
  absl::StatusOr<cudaStream_t> Stream(cudaStream_t given = nullptr) {
    if (given != nullptr) return given;
    if (own_ == nullptr) KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamCreate(&own_));
    return own_;
  }

  absl::StatusOr<cudaEvent_t> Event() {
    cudaEvent_t e = nullptr;
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventCreate(&e));
    events_.push_back(e);
    return e;
  }

 private:
  std::vector<void*> blocks_;
  std::vector<cudaEvent_t> events_;
  cudaStream_t own_ = nullptr;
};

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CUDA_SCRATCH_H_
