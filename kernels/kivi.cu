// kivi on the GPU: the batch launchers of the kernels in kivi_cuda_kernels.cuh (which documents
// them), on the caller's stream.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/kivi.h"
#include "kernels/kivi_cuda_kernels.cuh"

namespace kvpool::kernels::kivi {

using internal::Batch;
using internal::Geometry;

// The most segments one launch takes (gridDim.y); larger batches are launched in pieces.
constexpr uint32_t kMaxBatch = 65535;

absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream) {
  absl::StatusOr<Geometry> geo = internal::MakeGeometry(shape, params);
  if (!geo.ok()) return geo.status();
  if (out_stride < geo->size) {
    return absl::InvalidArgumentError(
        absl::StrCat("kivi: output has ", out_stride, " bytes, the payload needs ", geo->size));
  }
  if (count == 0) return absl::OkStatus();
  if (geo->elements == 0) {
    return FillOnDevice(d_sizes, count, 0, stream);
  }
  geo->vec = geo->vec && internal::VectorPathFits(d_in, 2 * in_stride, d_out, out_stride, count);
  const Batch batch{in_stride, out_stride};
  for (uint32_t first = 0; first < count; first += kMaxBatch) {
    const uint32_t n = std::min(kMaxBatch, count - first);
    uint64_t* sizes = d_sizes + first;
    if (geo->vec) KVPOOL_RETURN_IF_ERROR(FillOnDevice(sizes, n, geo->size, stream));
    internal::LaunchEncodeKernels(StreamLauncher{stream}, *geo, batch, n, d_in + first * in_stride,
                                  d_out + first * out_stride, sizes);
  }
  return FromCuda(cudaGetLastError(), "kivi encode");
}

absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream) {
  absl::StatusOr<Geometry> geo = internal::MakeGeometry(shape, params);
  if (!geo.ok()) return geo.status();
  KVPOOL_RETURN_IF_ERROR(CheckPayloadSizes("kivi", sizes, count, geo->size));
  if (geo->elements == 0 || count == 0) return absl::OkStatus();
  geo->vec =
      geo->vec && internal::VectorPathFits(d_payload, payload_stride, d_out, 2 * out_stride, count);
  const Batch batch{payload_stride, out_stride};
  for (uint32_t first = 0; first < count; first += kMaxBatch) {
    const uint32_t n = std::min(kMaxBatch, count - first);
    internal::LaunchDecodeKernels(StreamLauncher{stream}, *geo, batch, n,
                                  d_payload + first * payload_stride, d_out + first * out_stride);
  }
  return FromCuda(cudaGetLastError(), "kivi decode");
}

}  // namespace kvpool::kernels::kivi
