// Staging host buffers through device memory for the CUDA codec paths (tools and tests).
#include <cuda_runtime.h>

#include "common/status_macros.h"
#include "kernels/codec_staging.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"

namespace kvpool::kernels {
namespace {

absl::Status Ready(const void* launcher) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  if (launcher == nullptr) return absl::UnimplementedError("codec has no CUDA kernel");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> EncodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                        const CodecParams& params, const uint16_t* in,
                                        uint8_t* out, uint64_t capacity) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.encode_cuda)); !s.ok()) return s;
  CudaScratch b;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t stream, b.Stream());
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_in, b.Alloc<uint16_t>(shape.Elements()));
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* d_out, b.Alloc<uint8_t>(capacity));
  KVPOOL_ASSIGN_OR_RETURN(uint64_t* d_size, b.Alloc<uint64_t>(1));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(d_in, in, shape.Bytes(), cudaMemcpyHostToDevice, stream));
  KVPOOL_RETURN_IF_ERROR(ops.encode_cuda(shape, params, d_in, d_out, capacity, d_size, stream));
  uint64_t size = 0;
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(&size, d_size, sizeof(size), cudaMemcpyDeviceToHost, stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  if (size > capacity) return absl::InternalError("CUDA encoder overflowed its capacity");
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpy(out, d_out, size, cudaMemcpyDeviceToHost));
  return size;
}

absl::Status DecodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                            const CodecParams& params, const uint8_t* payload, uint64_t size,
                            uint16_t* out) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.decode_cuda)); !s.ok()) return s;
  CudaScratch b;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t stream, b.Stream());
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* d_in, b.Alloc<uint8_t>(size));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_out, b.Alloc<uint16_t>(shape.Elements()));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_in, payload, size, cudaMemcpyHostToDevice, stream));
  KVPOOL_RETURN_IF_ERROR(ops.decode_cuda(shape, params, d_in, size, d_out, stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(out, d_out, shape.Bytes(), cudaMemcpyDeviceToHost, stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status EncodeBatchOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                 const CodecParams& params, uint32_t count, const uint16_t* in,
                                 uint8_t* out, uint64_t stride, uint64_t* sizes) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.encode_cuda_batch)); !s.ok()) {
    return s;
  }
  CudaScratch b;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t stream, b.Stream());
  KVPOOL_ASSIGN_OR_RETURN(uint16_t * d_in, b.Alloc<uint16_t>(shape.Elements() * count));
  KVPOOL_ASSIGN_OR_RETURN(uint8_t * d_out, b.Alloc<uint8_t>(stride * count));
  KVPOOL_ASSIGN_OR_RETURN(uint64_t * d_sizes, b.Alloc<uint64_t>(count));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(d_in, in, shape.Bytes() * count, cudaMemcpyHostToDevice, stream));
  KVPOOL_RETURN_IF_ERROR(ops.encode_cuda_batch(shape, params, count, d_in, shape.Elements(), d_out,
                                               stride, d_sizes, stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(sizes, d_sizes, sizeof(uint64_t) * count, cudaMemcpyDeviceToHost, stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(out, d_out, stride * count, cudaMemcpyDeviceToHost, stream));
  return FromCuda(cudaStreamSynchronize(stream), "encode batch");
}

absl::Status DecodeBatchOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                 const CodecParams& params, uint32_t count, const uint8_t* payloads,
                                 uint64_t stride, const uint64_t* sizes, uint16_t* out) {
  if (absl::Status s = Ready(reinterpret_cast<const void*>(ops.decode_cuda_batch)); !s.ok()) {
    return s;
  }
  CudaScratch b;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t stream, b.Stream());
  KVPOOL_ASSIGN_OR_RETURN(uint8_t * d_in, b.Alloc<uint8_t>(stride * count));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t * d_out, b.Alloc<uint16_t>(shape.Elements() * count));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(d_in, payloads, stride * count, cudaMemcpyHostToDevice, stream));
  KVPOOL_RETURN_IF_ERROR(ops.decode_cuda_batch(shape, params, count, d_in, stride, sizes, d_out,
                                               shape.Elements(), stream));
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(out, d_out, shape.Bytes() * count, cudaMemcpyDeviceToHost, stream));
  return FromCuda(cudaStreamSynchronize(stream), "decode batch");
}

}  // namespace kvpool::kernels
