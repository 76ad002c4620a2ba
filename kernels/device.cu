// Device discovery and device buffers through the CUDA runtime.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"

namespace kvpool::kernels {
namespace {

__global__ void FillKernel(uint64_t* d, uint32_t count, uint64_t value) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    d[i] = value;
  }
}

// Payload sizes as kernel parameters, kSizesPerLaunch at a time.
constexpr uint32_t kSizesPerLaunch = 256;
struct Sizes {
  uint64_t v[kSizesPerLaunch];
};
__global__ void StoreSizes(uint64_t* d_sizes, Sizes sizes, uint32_t n) {
  if (threadIdx.x < n) d_sizes[threadIdx.x] = sizes.v[threadIdx.x];
}

}  // namespace

absl::Status FillOnDevice(uint64_t* d, uint32_t count, uint64_t value, cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  FillKernel<<<(count + 255) / 256, 256, 0, stream>>>(d, count, value);
  return FromCuda(cudaGetLastError(), "fill");
}

absl::Status CopySizesToDevice(const uint64_t* sizes, uint32_t count, uint64_t* d_sizes,
                               cudaStream_t stream) {
  for (uint32_t first = 0; first < count; first += kSizesPerLaunch) {
    const uint32_t n = std::min(kSizesPerLaunch, count - first);
    Sizes chunk;
    std::copy(sizes + first, sizes + first + n, chunk.v);
    StoreSizes<<<1, kSizesPerLaunch, 0, stream>>>(d_sizes + first, chunk, n);
  }
  return FromCuda(cudaGetLastError(), "payload sizes");
}

bool CudaCompiled() { return true; }

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // Clear the sticky "no device" error.
    return 0;
  }
  return count;
}

std::string DescribeDevices() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return std::string("CUDA: built in, no device (") +
           (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")";
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  return "CUDA: " + std::to_string(count) + " device(s), device 0: " + prop.name + " (sm_" +
         std::to_string(prop.major * 10 + prop.minor) + ", " +
         std::to_string(prop.totalGlobalMem >> 30) + " GiB)";
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(uint64_t bytes) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  void* p = nullptr;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  return DeviceBuffer(p, bytes);
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

absl::Status DeviceBuffer::CopyFromHost(const void* host, uint64_t bytes) {
  if (bytes > bytes_) return absl::InvalidArgumentError("copy larger than the device buffer");
  return FromCuda(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "copy to device");
}

absl::Status DeviceBuffer::CopyToHost(void* host, uint64_t bytes) const {
  if (bytes > bytes_) return absl::InvalidArgumentError("copy larger than the device buffer");
  return FromCuda(cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost), "copy from device");
}

}  // namespace kvpool::kernels
