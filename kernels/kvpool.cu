// The kvpool codec's CUDA launchers: batches of segments of one shape, one set of launches per
// batch (kvpool_cuda_kernels.cuh and kvpool_cuda_encoder.cuh hold the kernels and say what each
// does). A batch larger than the scratch budget (BatchChunk) runs as several such sets, in
// stream order.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/status_macros.h"
#include "kernels/carver.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_cuda_encoder.cuh"
#include "kernels/kvpool_cuda_kernels.cuh"
#include "kernels/kvpool_rows_cuda_encoder.cuh"

namespace kvpool::kernels::kvpool {
namespace internal {
namespace {

// Segments without elements: a raw header and nothing else, as the reference writes.
__global__ void EmptyPayloads(EncodeBatch b, uint64_t raw_bytes) {
  uint8_t* out = b.out + blockIdx.x * b.out_stride;
  if (threadIdx.x < kHeaderBytes) out[threadIdx.x] = 0;
  if (threadIdx.x == 0) b.sizes[blockIdx.x] = raw_bytes;
}

// DeviceRowsPass's memory on a CUDA stream: stream-ordered allocations (StreamScratch) freed
// with it; copies to and from the host synchronise the stream (after checking the launches
// before them).
class StreamMemory {
 public:
  explicit StreamMemory(cudaStream_t stream) : stream_(stream) {}
  absl::StatusOr<uint8_t*> Allocate(uint64_t bytes) {
    allocations_.push_back(std::make_unique<StreamScratch>(stream_));
    KVPOOL_RETURN_IF_ERROR(allocations_.back()->Allocate(bytes));
    return allocations_.back()->get();
  }
  absl::Status ToDevice(void* d, const void* h, uint64_t n) {
    return Copy(d, h, n, cudaMemcpyHostToDevice);
  }
  absl::Status ToHost(void* h, const void* d, uint64_t n) {
    return Copy(h, d, n, cudaMemcpyDeviceToHost);
  }
  absl::Status ToHostRows(void* h, const void* d, uint64_t pitch, uint64_t width, uint64_t rows) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaGetLastError());
    KVPOOL_RETURN_IF_CUDA_ERROR(
        cudaMemcpy2DAsync(h, pitch, d, pitch, width, rows, cudaMemcpyDeviceToHost, stream_));
    return FromCuda(cudaStreamSynchronize(stream_), "kvpool encode");
  }
  absl::Status OnDevice(void* d, const void* s, uint64_t n) {
    return FromCuda(cudaMemcpyAsync(d, s, n, cudaMemcpyDeviceToDevice, stream_), "kvpool encode");
  }

 private:
  absl::Status Copy(void* dst, const void* src, uint64_t n, cudaMemcpyKind kind) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaGetLastError());
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dst, src, n, kind, stream_));
    return FromCuda(cudaStreamSynchronize(stream_), "kvpool encode");
  }

  cudaStream_t stream_;
  std::vector<std::unique_ptr<StreamScratch>> allocations_;
};

// One default-profile segment through the mode 4 encoder, its pass on the GPU (planned with
// the CPU path's kernels, so the bytes are the CPU's).
absl::Status EncodeRowsCuda(const SegmentShape& shape, const CodecParams& params,
                            const uint16_t* d_in, uint8_t* d_out, uint64_t capacity,
                            uint64_t* d_size, cudaStream_t stream) {
  StreamMemory mem(stream);
  KVPOOL_ASSIGN_OR_RETURN(const uint64_t size,
                          EncodeRowsOnDevice(shape, params, d_in, LayerKeys{}, FastCpuKernels(),
                                             CpuRowKernels(shape.head_dim), StreamLauncher{stream},
                                             &mem, d_out, capacity));
  return mem.ToDevice(d_size, &size, sizeof(size));
}

}  // namespace
}  // namespace internal

absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream) {
  using namespace internal;  // NOLINT: the format's own helpers.
  if (!(params.budget > 0 && params.budget < 1)) {
    return absl::InvalidArgumentError("kvpool: budget must be in (0, 1)");
  }
  const uint64_t raw_bytes = RawPayloadBytes(shape);
  if (out_stride < raw_bytes) return absl::InvalidArgumentError("kvpool: output too small");
  if (count == 0) return absl::OkStatus();
  if (IsKvpoolRowsMode(params) && shape.head_dim <= kMaxDeviceRowsDim) {
    // The default profile: mode 4, a segment at a time (each synchronises: see
    // kvpool_rows_cuda_encoder.cuh).
    for (uint32_t i = 0; i < count; ++i) {
      KVPOOL_RETURN_IF_ERROR(EncodeRowsCuda(shape, params, d_in + i * in_stride,
                                            d_out + i * out_stride, out_stride, d_sizes + i,
                                            stream));
    }
    return absl::OkStatus();
  }
  const Dims dm = MakeDims(shape);
  if (dm.N == 0) {
    EmptyPayloads<<<count, 32, 0, stream>>>(
        EncodeBatch{d_in, in_stride, d_out, out_stride, d_sizes}, raw_bytes);
    return FromCuda(cudaGetLastError(), "kvpool encode");
  }
  const uint32_t chunk = BatchChunk(EncodeScratchBytes(dm, 1), count);
  StreamScratch scratch(stream);
  KVPOOL_RETURN_IF_ERROR(scratch.Allocate(EncodeScratchBytes(dm, chunk)));
  const double target = TargetError(shape, params);
  for (uint32_t first = 0; first < count; first += chunk) {
    const uint32_t n = std::min(chunk, count - first);
    const EncodeBatch b{d_in + first * in_stride, in_stride, d_out + first * out_stride, out_stride,
                        d_sizes + first};
    Carver carver(scratch.get());
    const EncodeScratchSet set = CarveEncodeScratch(&carver, dm, n);
    KVPOOL_RETURN_IF_CUDA_ERROR(
        cudaMemsetAsync(set.first.state, 0, n * sizeof(EncodeState), stream));
    LaunchEncodeKernels(StreamLauncher{stream}, b, dm, target, raw_bytes, set, n);
  }
  return FromCuda(cudaGetLastError(), "kvpool encode");
}

absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams&, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream) {
  using namespace internal;  // NOLINT: the format's own helpers.
  KVPOOL_RETURN_IF_ERROR(
      CheckVariablePayloadSizes("kvpool", sizes, count, kHeaderBytes, payload_stride));
  const Dims dm = MakeDims(shape);
  if (dm.N == 0 || count == 0) return absl::OkStatus();  // Nothing to write (payloads unread).
  const uint32_t chunk = BatchChunk(DecodeScratchBytes(dm, 1), count);
  DecodeBatchScratch scratch(stream);
  KVPOOL_RETURN_IF_ERROR(scratch.Allocate(sizes, count, DecodeScratchBytes(dm, chunk)));
  for (uint32_t first = 0; first < count; first += chunk) {
    const uint32_t n = std::min(chunk, count - first);
    const DecodeBatch b{d_payload + first * payload_stride, payload_stride,
                        scratch.d_sizes() + first, d_out + first * out_stride, out_stride};
    Carver segments(scratch.scratch());
    const DecodeScratchSet set = CarveDecodeScratch(&segments, dm, n);
    LaunchDecodeKernels(StreamLauncher{stream}, b, dm, set, n);
  }
  return FromCuda(cudaGetLastError(), "kvpool decode");
}

}  // namespace kvpool::kernels::kvpool
