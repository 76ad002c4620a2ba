// raw on the GPU: device-to-device copies, and the payload size written by a one-thread kernel.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_status.h"
#include "kernels/raw.h"

namespace kvpool::kernels::raw {
namespace {
__global__ void StoreSize(uint64_t* d_size, uint64_t size) { *d_size = size; }
}  // namespace

absl::Status EncodeCuda(const SegmentShape& shape, const CodecParams&, const uint16_t* d_in,
                        uint8_t* d_out, uint64_t capacity, uint64_t* d_size, cudaStream_t stream) {
  if (capacity < shape.Bytes()) return absl::InvalidArgumentError("raw: output too small");
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(d_out, d_in, shape.Bytes(), cudaMemcpyDeviceToDevice, stream));
  StoreSize<<<1, 1, 0, stream>>>(d_size, shape.Bytes());
  return FromCuda(cudaGetLastError(), "raw encode");
}

absl::Status DecodeCuda(const SegmentShape& shape, const CodecParams&, const uint8_t* d_payload,
                        uint64_t size, uint16_t* d_out, cudaStream_t stream) {
  if (size != shape.Bytes()) {
    return absl::DataLossError(
        absl::StrCat("raw payload is ", size, " bytes, the shape needs ", shape.Bytes()));
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(d_out, d_payload, size, cudaMemcpyDeviceToDevice, stream));
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::raw
