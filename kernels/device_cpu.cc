// Device discovery for builds without CUDA.
#include "kernels/device.h"

namespace kvpool::kernels {

bool CudaCompiled() { return false; }
int DeviceCount() { return 0; }
std::string DescribeDevices() { return "CUDA: not built"; }

}  // namespace kvpool::kernels
