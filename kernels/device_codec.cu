// Batched GPU encode/decode with one staging allocation per call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"
#include "kernels/device_codec.h"

namespace kvpool::kernels {
namespace {

uint64_t Align(uint64_t n) { return (n + 255) & ~uint64_t{255}; }

// x[i] = to_dtype(scale * x[i]), round to nearest even (kernels::ScaleElements on the device).
template <bool kBf16>
__global__ void ScaleKernel(uint16_t* x, uint64_t n, float scale) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    if constexpr (kBf16) {
      const float v = __bfloat162float(__ushort_as_bfloat16(x[i])) * scale;
      x[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    } else {
      const float v = __half2float(__ushort_as_half(x[i])) * scale;
      x[i] = __half_as_ushort(__float2half_rn(v));
    }
  }
}

absl::Status ScaleOnDevice(DType dtype, uint16_t* d_x, uint64_t n, float scale,
                           cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const unsigned blocks = static_cast<unsigned>(std::min<uint64_t>((n + 255) / 256, 4096));
  if (dtype == DType::kBf16) {
    ScaleKernel<true><<<blocks, 256, 0, stream>>>(d_x, n, scale);
  } else {
    ScaleKernel<false><<<blocks, 256, 0, stream>>>(d_x, n, scale);
  }
  return FromCuda(cudaGetLastError(), "scale kernel");
}

}  // namespace

bool IsDevicePointer(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

absl::StatusOr<std::vector<std::string>> EncodeSegmentsOnDevice(
    const CodecParams& params, absl::Span<const SegmentShape> shapes,
    absl::Span<const uint16_t> elements, cudaStream_t stream) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  KVPOOL_ASSIGN_OR_RETURN(CodecParams p, NormalizeParams(params));
  const CodecOps& ops = GetCodecOps(p.codec);
  if (ops.encode_cuda == nullptr) return absl::UnimplementedError("codec has no CUDA encoder");
  uint64_t in_bytes = 0, out_bytes = 0, total_elements = 0;
  std::vector<uint64_t> caps(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    caps[i] = Align(ops.max_payload_bytes(shapes[i], p));
    in_bytes += Align(shapes[i].Bytes());
    out_bytes += caps[i];
    total_elements += shapes[i].Elements();
  }
  if (total_elements != elements.size()) {
    return absl::InvalidArgumentError("elements do not match the shapes");
  }
  CudaScratch st;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t s, st.Stream(stream));
  const uint64_t sizes_bytes = Align(sizeof(uint64_t) * shapes.size());
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* in, st.Alloc<uint8_t>(in_bytes + out_bytes + sizes_bytes));
  auto* out = in + in_bytes;
  auto* d_sizes = reinterpret_cast<uint64_t*>(out + out_bytes);
  uint64_t in_off = 0, out_off = 0, elem_off = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(in + in_off, elements.data() + elem_off,
                                                shapes[i].Bytes(), cudaMemcpyHostToDevice, s));
    KVPOOL_RETURN_IF_ERROR(ops.encode_cuda(shapes[i], p,
                                           reinterpret_cast<const uint16_t*>(in + in_off),
                                           out + out_off, caps[i], d_sizes + i, s));
    in_off += Align(shapes[i].Bytes());
    out_off += caps[i];
    elem_off += shapes[i].Elements();
  }
  std::vector<uint64_t> sizes(shapes.size());
  std::vector<uint8_t> host(out_bytes);
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(sizes.data(), d_sizes, sizeof(uint64_t) * sizes.size(),
                                              cudaMemcpyDeviceToHost, s));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host.data(), out, out_bytes, cudaMemcpyDeviceToHost, s));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
  std::vector<std::string> segments;
  out_off = elem_off = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const uint16_t* src = elements.data() + elem_off;
    if (p.codec != CodecId::kRaw && HasNonFinite(shapes[i].dtype, {src, shapes[i].Elements()})) {
      // As EncodeSegment: lossy codecs store NaN/Inf segments raw.
      KVPOOL_ASSIGN_OR_RETURN(std::string raw,
                              EncodeSegment(CodecParams{CodecId::kRaw}, shapes[i],
                                            {src, shapes[i].Elements()}, Path::kCpu));
      segments.push_back(std::move(raw));
    } else {
      if (sizes[i] > caps[i]) return absl::InternalError("CUDA encoder overflowed its capacity");
      SegmentHeader h;
      h.params = p;
      h.shape = shapes[i];
      segments.push_back(SerializeSegment(
          h, absl::string_view(reinterpret_cast<const char*>(host.data()) + out_off, sizes[i])));
    }
    out_off += caps[i];
    elem_off += shapes[i].Elements();
  }
  return segments;
}

absl::Status DecodeSegmentsToDevice(absl::Span<const absl::string_view> encoded,
                                    absl::Span<const SegmentShape> expected, uint16_t* d_out,
                                    absl::Span<const float> scales, cudaStream_t stream) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  if (encoded.size() != expected.size()) return absl::InvalidArgumentError("count mismatch");
  if (!scales.empty() && scales.size() != encoded.size()) {
    return absl::InvalidArgumentError("scales: one per segment");
  }
  std::vector<SegmentHeader> headers;
  std::vector<absl::string_view> payloads;
  uint64_t staging = 0;
  for (size_t i = 0; i < encoded.size(); ++i) {
    absl::string_view payload;
    KVPOOL_ASSIGN_OR_RETURN(SegmentHeader h, ParseSegment(encoded[i], &payload));
    const SegmentShape& e = expected[i];
    if (h.shape.tokens != e.tokens || h.shape.kv_heads != e.kv_heads ||
        h.shape.head_dim != e.head_dim || h.shape.dtype != e.dtype || h.shape.kind != e.kind) {
      return absl::DataLossError(absl::StrCat("segment ", i, "'s shape differs from the expected"));
    }
    const CodecOps& ops = GetCodecOps(h.params.codec);
    if (ops.decode_cuda == nullptr) return absl::UnimplementedError("codec has no CUDA decoder");
    staging += Align(payload.size());
    headers.push_back(h);
    payloads.push_back(payload);
  }
  CudaScratch st;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t s, st.Stream(stream));
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* base, st.Alloc<uint8_t>(staging));
  uint64_t off = 0, elem_off = 0;
  for (size_t i = 0; i < headers.size(); ++i) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(base + off, payloads[i].data(), payloads[i].size(),
                                                cudaMemcpyHostToDevice, s));
    KVPOOL_RETURN_IF_ERROR(GetCodecOps(headers[i].params.codec)
                               .decode_cuda(headers[i].shape, headers[i].params, base + off,
                                            payloads[i].size(), d_out + elem_off, s));
    if (!scales.empty() && scales[i] != 1.f) {
      KVPOOL_RETURN_IF_ERROR(ScaleOnDevice(headers[i].shape.dtype, d_out + elem_off,
                                           headers[i].shape.Elements(), scales[i], s));
    }
    off += Align(payloads[i].size());
    elem_off += headers[i].shape.Elements();
  }
  return FromCuda(cudaStreamSynchronize(s), "decode to device");
}

}  // namespace kvpool::kernels
