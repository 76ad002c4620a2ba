// CUDA device discovery. The project builds without CUDA; then, and on machines without a
// GPU, DeviceCount() is 0 and every caller takes its CPU path. Thread-safe.
#ifndef KVPOOL_KERNELS_DEVICE_H_
#define KVPOOL_KERNELS_DEVICE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace kvpool::kernels {

// True when this build contains the CUDA kernels.
bool CudaCompiled();

// Number of usable CUDA devices; 0 without CUDA support, driver or device. Never fails.
int DeviceCount();

// One line for logs: "CUDA: 1 device(s), device 0: NVIDIA H200 (sm_90, 139 GiB)",
// "CUDA: built in, no device (<reason>)" or "CUDA: not built".
std::string DescribeDevices();

// Device memory for host code that does not include CUDA's headers (tools and tests): one
// allocation, freed with the object; copies are synchronous. Unavailable without CUDA or a
// device. Move-only.
class DeviceBuffer {
 public:
  static absl::StatusOr<DeviceBuffer> Allocate(uint64_t bytes);
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) {
    other.ptr_ = nullptr;
  }
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  DeviceBuffer(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* get() const { return ptr_; }
  // InvalidArgument when `bytes` exceeds the allocation.
  absl::Status CopyFromHost(const void* host, uint64_t bytes);
  absl::Status CopyToHost(void* host, uint64_t bytes) const;

 private:
  DeviceBuffer(void* ptr, uint64_t bytes) : ptr_(ptr), bytes_(bytes) {}
  void* ptr_ = nullptr;
  uint64_t bytes_ = 0;
};

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_DEVICE_H_
