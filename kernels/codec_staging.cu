// Staging host buffers through device memory for the CUDA codec paths (tools and tests).
#include <cuda_runtime.h>

#include "kernels/codec_staging.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"

namespace kvpool::kernels {
namespace {

// Device allocations freed on scope exit.
struct DeviceBuffers {
  void* in = nullptr;
  void* out = nullptr;
  void* size = nullptr;
  cudaStream_t stream = nullptr;
  ~DeviceBuffers() {
    if (stream) cudaStreamDestroy(stream);
    cudaFree(in);
    cudaFree(out);
    cudaFree(size);
  }
};

absl::Status Ready(const void* launcher) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  if (launcher == nullptr) return absl::UnimplementedError("codec has no CUDA kernel");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> EncodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                        const CodecParams& params, const uint16_t* in,
                                        uint8_t* out, uint64_t capacity) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.encode_cuda)); !s.ok()) return s;
  DeviceBuffers b;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamCreate(&b.stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&b.in, shape.Bytes() + 1));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&b.out, capacity + 1));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&b.size, sizeof(uint64_t)));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(b.in, in, shape.Bytes(), cudaMemcpyHostToDevice, b.stream));
  absl::Status s = ops.encode_cuda(shape, params, static_cast<const uint16_t*>(b.in),
                                   static_cast<uint8_t*>(b.out), capacity,
                                   static_cast<uint64_t*>(b.size), b.stream);
  if (!s.ok()) return s;
  uint64_t size = 0;
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(&size, b.size, sizeof(size), cudaMemcpyDeviceToHost, b.stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(b.stream));
  if (size > capacity) return absl::InternalError("CUDA encoder overflowed its capacity");
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpy(out, b.out, size, cudaMemcpyDeviceToHost));
  return size;
}

absl::Status DecodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                            const CodecParams& params, const uint8_t* payload, uint64_t size,
                            uint16_t* out) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.decode_cuda)); !s.ok()) return s;
  DeviceBuffers b;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamCreate(&b.stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&b.in, size + 1));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&b.out, shape.Bytes() + 1));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(b.in, payload, size, cudaMemcpyHostToDevice, b.stream));
  absl::Status s = ops.decode_cuda(shape, params, static_cast<const uint8_t*>(b.in), size,
                                   static_cast<uint16_t*>(b.out), b.stream);
  if (!s.ok()) return s;
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(out, b.out, shape.Bytes(), cudaMemcpyDeviceToHost, b.stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(b.stream));
  return absl::OkStatus();
}

}  // namespace kvpool::kernels
