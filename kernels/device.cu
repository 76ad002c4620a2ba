// Device discovery through the CUDA runtime.
#include <cuda_runtime.h>

#include <string>

#include "kernels/device.h"

namespace kvpool::kernels {

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

}  // namespace kvpool::kernels
