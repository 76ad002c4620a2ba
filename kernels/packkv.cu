// packkv's CUDA launchers: batches of segments of one shape, one set of launches per batch
// (packkv_cuda_kernels.cuh holds the kernels and says what each does), stream-ordered, with the
// scratch from the stream-ordered allocator. A batch larger than the scratch budget
// (BatchChunk) runs as several such sets, in stream order.
#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/carver.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/packkv.h"
#include "kernels/packkv_cuda_kernels.cuh"

namespace kvpool::kernels::packkv {

absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream) {
  using namespace internal;  // NOLINT: the format's own helpers.
  KVPOOL_RETURN_IF_ERROR(CheckEncodeArgs(shape, params, out_stride));
  if (count == 0) return absl::OkStatus();
  if (shape.Elements() == 0) return FillOnDevice(d_sizes, count, 0, stream);
  const Layout l = LayoutFor(shape, params);
  const bool bf16 = shape.dtype == DType::kBf16;
  const double budget_q = QuantBudget(params.budget, shape.dtype);
  const uint32_t chunk = BatchChunk(EncodeScratchBytes(l, 1), count);
  StreamScratch scratch(stream);
  KVPOOL_RETURN_IF_ERROR(scratch.Allocate(EncodeScratchBytes(l, chunk)));
  for (uint32_t first = 0; first < count; first += chunk) {
    const uint32_t n = std::min(chunk, count - first);
    const EncodeBatch b{d_in + first * in_stride, in_stride, d_out + first * out_stride, out_stride,
                        d_sizes + first};
    Carver carver(scratch.get());
    const EncodeScratchSet set = CarveEncodeScratch(&carver, l, n);
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(set.flags, 0, n * sizeof(int), stream));
    LaunchEncodeKernels(StreamLauncher{stream}, b, l, bf16, budget_q, set, n);
  }
  return FromCuda(cudaGetLastError(), "packkv encode");
}

absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream) {
  using namespace internal;  // NOLINT: the format's own helpers.
  KVPOOL_RETURN_IF_ERROR(CheckParams(shape, params));
  if (shape.Elements() == 0) {
    for (uint32_t i = 0; i < count; ++i) {
      if (sizes[i] != 0) {
        return absl::DataLossError(
            absl::StrCat("packkv: empty segment with a ", sizes[i], "-byte payload"));
      }
    }
    return absl::OkStatus();
  }
  const Layout l = LayoutFor(shape, params);
  KVPOOL_RETURN_IF_ERROR(
      CheckVariablePayloadSizes("packkv", sizes, count, l.data_offset, payload_stride));
  if (count == 0) return absl::OkStatus();
  const bool bf16 = shape.dtype == DType::kBf16;
  const uint32_t chunk = BatchChunk(DecodeScratchBytes(l, 1), count);
  DecodeBatchScratch scratch(stream);
  KVPOOL_RETURN_IF_ERROR(scratch.Allocate(sizes, count, DecodeScratchBytes(l, chunk)));
  for (uint32_t first = 0; first < count; first += chunk) {
    const uint32_t n = std::min(chunk, count - first);
    const DecodeBatch b{d_payload + first * payload_stride, payload_stride,
                        scratch.d_sizes() + first, d_out + first * out_stride, out_stride};
    Carver segments(scratch.scratch());
    const DecodeScratchSet set = CarveDecodeScratch(&segments, l, n);
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(set.flags, 0, set.zeroed_bytes, stream));
    LaunchDecodeKernels(StreamLauncher{stream}, b, l, bf16, set, n);
  }
  return FromCuda(cudaGetLastError(), "packkv decode");
}

}  // namespace kvpool::kernels::packkv
