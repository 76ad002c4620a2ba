// raw on the GPU: device-to-device copies, and the payload size written by a one-thread kernel.
#include <cuda_runtime.h>

#include "common/status_macros.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/raw.h"

namespace kvpool::kernels::raw {
namespace {
// `count` rows of `bytes` from src (pitch src_pitch) to dst (pitch dst_pitch): one plain copy
// when the rows are back to back.
absl::Status Copy(void* dst, uint64_t dst_pitch, const void* src, uint64_t src_pitch,
                  uint64_t bytes, uint32_t count, cudaStream_t stream) {
  if (count == 1 || (dst_pitch == bytes && src_pitch == bytes)) {
    return FromCuda(cudaMemcpyAsync(dst, src, bytes * count, cudaMemcpyDeviceToDevice, stream),
                    "raw copy");
  }
  return FromCuda(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, bytes, count,
                                    cudaMemcpyDeviceToDevice, stream),
                  "raw copy");
}

}  // namespace

absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams&, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream) {
  const uint64_t bytes = shape.Bytes();
  if (out_stride < bytes) return absl::InvalidArgumentError("raw: output too small");
  if (count == 0) return absl::OkStatus();
  if (bytes > 0)
    KVPOOL_RETURN_IF_ERROR(Copy(d_out, out_stride, d_in, 2 * in_stride, bytes, count, stream));
  return FillOnDevice(d_sizes, count, bytes, stream);
}

absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams&, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream) {
  const uint64_t size = shape.Bytes();
  KVPOOL_RETURN_IF_ERROR(CheckPayloadSizes("raw", sizes, count, size));
  if (count == 0 || size == 0) return absl::OkStatus();
  return Copy(d_out, 2 * out_stride, d_payload, payload_stride, size, count, stream);
}

}  // namespace kvpool::kernels::raw
