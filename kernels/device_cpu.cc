// Device discovery for builds without CUDA.
#include "kernels/device.h"

namespace kvpool::kernels {

bool CudaCompiled() { return false; }
int DeviceCount() { return 0; }
std::string DescribeDevices() { return "CUDA: not built"; }

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(uint64_t) {
  return absl::UnavailableError("this build has no CUDA");
}
DeviceBuffer::~DeviceBuffer() = default;
absl::Status DeviceBuffer::CopyFromHost(const void*, uint64_t) {
  return absl::UnavailableError("this build has no CUDA");
}
absl::Status DeviceBuffer::CopyToHost(void*, uint64_t) const {
  return absl::UnavailableError("this build has no CUDA");
}

}  // namespace kvpool::kernels
