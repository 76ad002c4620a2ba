// CUDA codec throughput against a device-to-device copy, timed with events on one stream.
#include <cuda_runtime.h>

#include <vector>

#include "common/status_macros.h"
#include "kernels/codec_bench.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"

namespace kvpool::kernels {
namespace {

struct Buffers {
  std::vector<void*> ptrs;
  std::vector<cudaEvent_t> events;
  cudaStream_t stream = nullptr;
  ~Buffers() {
    for (void* p : ptrs) cudaFree(p);
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
  absl::StatusOr<void*> Alloc(size_t n) {
    void* p = nullptr;
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMalloc(&p, n));
    ptrs.push_back(p);
    return p;
  }
};

}  // namespace

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
  const uint64_t capacity = ops.max_payload_bytes(shape, params);
  Buffers b;
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamCreate(&b.stream));
  b.events.resize(2);
  for (cudaEvent_t& e : b.events) KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventCreate(&e));
  auto in = b.Alloc(seg_bytes * segments);
  auto copy = b.Alloc(seg_bytes * segments);
  auto payload = b.Alloc(capacity * segments);
  auto out = b.Alloc(seg_bytes * segments);
  auto sizes = b.Alloc(sizeof(uint64_t) * segments);
  for (auto* s : {&in, &copy, &payload, &out, &sizes}) {
    if (!s->ok()) return s->status();
  }
  auto* d_in = static_cast<uint16_t*>(*in);
  auto* d_payload = static_cast<uint8_t*>(*payload);
  auto* d_out = static_cast<uint16_t*>(*out);
  auto* d_sizes = static_cast<uint64_t*>(*sizes);
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpy(d_in, elements.data(), seg_bytes * segments, cudaMemcpyHostToDevice));
  auto time = [&](auto&& step) -> absl::StatusOr<double> {
    KVPOOL_RETURN_IF_ERROR(step());  // Warm-up.
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventRecord(b.events[0], b.stream));
    for (int i = 0; i < iterations; ++i) KVPOOL_RETURN_IF_ERROR(step());
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventRecord(b.events[1], b.stream));
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(b.events[1]));
    float ms = 0;
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaEventElapsedTime(&ms, b.events[0], b.events[1]));
    return double(seg_bytes) * segments * iterations / (ms * 1e-3) / 1e9;
  };
  DeviceThroughput t;
  auto d2d = time([&]() -> absl::Status {
    return FromCuda(cudaMemcpyAsync(*copy, d_in, seg_bytes * segments, cudaMemcpyDeviceToDevice,
                                    b.stream),
                    "d2d copy");
  });
  if (!d2d.ok()) return d2d.status();
  t.d2d_copy_gbps = *d2d;
  auto enc = time([&]() -> absl::Status {
    for (int s = 0; s < segments; ++s) {
      KVPOOL_RETURN_IF_ERROR(ops.encode_cuda(shape, params, d_in + s * shape.Elements(),
                                             d_payload + s * capacity, capacity, d_sizes + s,
                                             b.stream));
    }
    return absl::OkStatus();
  });
  if (!enc.ok()) return enc.status();
  t.encode_gbps = *enc;
  std::vector<uint64_t> host_sizes(segments);
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpy(host_sizes.data(), d_sizes, sizeof(uint64_t) * segments,
                                         cudaMemcpyDeviceToHost));
  auto dec = time([&]() -> absl::Status {
    for (int s = 0; s < segments; ++s) {
      KVPOOL_RETURN_IF_ERROR(ops.decode_cuda(shape, params, d_payload + s * capacity,
                                             host_sizes[s], d_out + s * shape.Elements(),
                                             b.stream));
    }
    return absl::OkStatus();
  });
  if (!dec.ok()) return dec.status();
  t.decode_gbps = *dec;
  return t;
}

}  // namespace kvpool::kernels
