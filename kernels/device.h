// CUDA device discovery. The project builds without CUDA; then, and on machines without a
// GPU, DeviceCount() is 0 and every caller takes its CPU path. Thread-safe.
#ifndef KVPOOL_KERNELS_DEVICE_H_
#define KVPOOL_KERNELS_DEVICE_H_

#include <string>

namespace kvpool::kernels {

// True when this build contains the CUDA kernels.
bool CudaCompiled();

// Number of usable CUDA devices; 0 without CUDA support, driver or device. Never fails.
int DeviceCount();

// One line for logs: "CUDA: 1 device(s), device 0: NVIDIA H200 (sm_90, 139 GiB)",
// "CUDA: built in, no device (<reason>)" or "CUDA: not built".
std::string DescribeDevices();

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_DEVICE_H_
