// CUDA codec throughput against a device-to-device copy, timed with events on one stream.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "common/status_macros.h"
#include "kernels/codec_bench.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"

namespace kvpool::kernels {

absl::StatusOr<DeviceThroughput> MeasureDeviceThroughput(const CodecParams& params,
                                                         const SegmentShape& shape,
                                                         absl::Span<const uint16_t> elements,
                                                         int segments, int iterations) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  const CodecOps& ops = GetCodecOps(params.codec);
  if (ops.encode_cuda == nullptr || ops.decode_cuda == nullptr) {
    return absl::UnimplementedError("codec has no CUDA kernel");
  }
  const uint64_t seg_bytes = shape.Bytes();
  // Payload slots 256-byte aligned, as the daemon's staging lays them out.
  const uint64_t capacity = (ops.max_payload_bytes(shape, params) + 255) / 256 * 256;
  CudaScratch b;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t stream, b.Stream());
  KVPOOL_ASSIGN_OR_RETURN(cudaEvent_t start, b.Event());
  KVPOOL_ASSIGN_OR_RETURN(cudaEvent_t stop, b.Event());
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_in, b.Alloc<uint16_t>(shape.Elements() * segments));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_copy, b.Alloc<uint16_t>(shape.Elements() * segments));
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* d_payload, b.Alloc<uint8_t>(capacity * segments));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_out, b.Alloc<uint16_t>(shape.Elements() * segments));
  KVPOOL_ASSIGN_OR_RETURN(uint64_t* d_sizes, b.Alloc<uint64_t>(segments));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpy(d_in, elements.data(), seg_bytes * segments, cudaMemcpyHostToDevice));
  auto time = [&](auto&& step) -> absl::StatusOr<double> {
    KVPOOL_RETURN_IF_ERROR(step());  // Warm-up.
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventRecord(start, stream));
    for (int i = 0; i < iterations; ++i) KVPOOL_RETURN_IF_ERROR(step());
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventRecord(stop, stream));
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(stop));
    float ms = 0;
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventElapsedTime(&ms, start, stop));
    return double(seg_bytes) * segments * iterations / (ms * 1e-3) / 1e9;
  };
  DeviceThroughput t;
  t.batched = ops.encode_cuda_batch != nullptr && ops.decode_cuda_batch != nullptr;
  auto d2d = time([&]() -> absl::Status {
    return FromCuda(cudaMemcpyAsync(d_copy, d_in, seg_bytes * segments, cudaMemcpyDeviceToDevice,
                                    stream),
                    "d2d copy");
  });
  if (!d2d.ok()) return d2d.status();
  t.d2d_copy_gbps = *d2d;
  auto enc = time([&]() -> absl::Status {
    if (t.batched) {
      return ops.encode_cuda_batch(shape, params, segments, d_in, shape.Elements(), d_payload,
                                   capacity, d_sizes, stream);
    }
    for (int s = 0; s < segments; ++s) {
      KVPOOL_RETURN_IF_ERROR(ops.encode_cuda(shape, params, d_in + s * shape.Elements(),
                                             d_payload + s * capacity, capacity, d_sizes + s,
                                             stream));
    }
    return absl::OkStatus();
  });
  if (!enc.ok()) return enc.status();
  t.encode_gbps = *enc;
  std::vector<uint64_t> host_sizes(segments);
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpy(host_sizes.data(), d_sizes, sizeof(uint64_t) * segments, cudaMemcpyDeviceToHost));
  auto dec = time([&]() -> absl::Status {
    if (t.batched) {
      return ops.decode_cuda_batch(shape, params, segments, d_payload, capacity, host_sizes.data(),
                                   d_out, shape.Elements(), stream);
    }
    for (int s = 0; s < segments; ++s) {
      KVPOOL_RETURN_IF_ERROR(ops.decode_cuda(shape, params, d_payload + s * capacity,
                                             host_sizes[s], d_out + s * shape.Elements(),
                                             stream));
    }
    return absl::OkStatus();
  });
  if (!dec.ok()) return dec.status();
  t.decode_gbps = *dec;
  return t;
}

}  // namespace kvpool::kernels
