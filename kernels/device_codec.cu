// Batched GPU encode/decode with one staging allocation per call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <tuple>
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

// What a batch launch needs to be the same for all its segments.
std::tuple<uint32_t, uint32_t, uint32_t, DType, SegmentKind> ShapeKey(const SegmentShape& s) {
  return {s.tokens, s.kv_heads, s.head_dim, s.dtype, s.kind};
}

// Segments in the order their device slots take: by shape (a block's keys, then its values),
// so that a codec's batch launchers take a shape's segments together; and where each
// segment's elements start in the caller's array.
struct ShapeOrder {
  std::vector<size_t> order;
  std::vector<uint64_t> elem_at;  // by segment
};
ShapeOrder OrderByShape(absl::Span<const SegmentShape> shapes) {
  ShapeOrder o{std::vector<size_t>(shapes.size()), std::vector<uint64_t>(shapes.size())};
  std::iota(o.order.begin(), o.order.end(), size_t{0});
  std::stable_sort(o.order.begin(), o.order.end(),
                   [&](size_t a, size_t b) { return ShapeKey(shapes[a]) < ShapeKey(shapes[b]); });
  uint64_t at = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    o.elem_at[i] = at;
    at += shapes[i].Elements();
  }
  return o;
}

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
  const size_t n = shapes.size();
  const auto [order, elem_at] = OrderByShape(shapes);
  std::vector<size_t> slot(n);
  std::vector<uint64_t> in_at(n), out_at(n);  // by segment
  uint64_t in_off = 0, out_off = 0;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = order[k];
    slot[i] = k;
    in_at[i] = in_off;
    out_at[i] = out_off;
    in_off += Align(shapes[i].Bytes());
    out_off += caps[i];
  }
  CudaScratch st;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t s, st.Stream(stream));
  const uint64_t sizes_bytes = Align(sizeof(uint64_t) * n);
  KVPOOL_ASSIGN_OR_RETURN(uint8_t* in, st.Alloc<uint8_t>(in_bytes + out_bytes + sizes_bytes));
  auto* out = in + in_bytes;
  auto* d_sizes = reinterpret_cast<uint64_t*>(out + out_bytes);  // by slot
  for (size_t i = 0; i < n; ++i) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(in + in_at[i], elements.data() + elem_at[i],
                                                shapes[i].Bytes(), cudaMemcpyHostToDevice, s));
  }
  for (size_t k = 0, run = 1; k < n; k += run) {
    const size_t i = order[k];
    run = 1;
    while (ops.encode_cuda_batch != nullptr && k + run < n &&
           ShapeKey(shapes[order[k + run]]) == ShapeKey(shapes[i])) {
      ++run;
    }
    const auto* d_in = reinterpret_cast<const uint16_t*>(in + in_at[i]);
    if (run > 1) {
      KVPOOL_RETURN_IF_ERROR(ops.encode_cuda_batch(shapes[i], p, static_cast<uint32_t>(run), d_in,
                                                   Align(shapes[i].Bytes()) / 2, out + out_at[i],
                                                   caps[i], d_sizes + k, s));
    } else {
      KVPOOL_RETURN_IF_ERROR(
          ops.encode_cuda(shapes[i], p, d_in, out + out_at[i], caps[i], d_sizes + k, s));
    }
  }
  std::vector<uint64_t> sizes(n);  // by slot
  std::vector<uint8_t> host(out_bytes);
  KVPOOL_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(sizes.data(), d_sizes, sizeof(uint64_t) * n, cudaMemcpyDeviceToHost, s));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host.data(), out, out_bytes, cudaMemcpyDeviceToHost, s));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
  std::vector<std::string> segments;
  for (size_t i = 0; i < n; ++i) {
    const uint16_t* src = elements.data() + elem_at[i];
    if (p.codec != CodecId::kRaw && HasNonFinite(shapes[i].dtype, {src, shapes[i].Elements()})) {
      // As EncodeSegment: lossy codecs store NaN/Inf segments raw.
      KVPOOL_ASSIGN_OR_RETURN(std::string raw,
                              EncodeSegment(CodecParams{CodecId::kRaw}, shapes[i],
                                            {src, shapes[i].Elements()}, Path::kCpu));
      segments.push_back(std::move(raw));
    } else {
      const uint64_t size = sizes[slot[i]];
      if (size > caps[i]) return absl::InternalError("CUDA encoder overflowed its capacity");
      SegmentHeader h;
      h.params = p;
      h.shape = shapes[i];
      segments.push_back(SerializeSegment(
          h, absl::string_view(reinterpret_cast<const char*>(host.data()) + out_at[i], size)));
    }
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
    headers.push_back(h);
    payloads.push_back(payload);
  }
  // A run of segments (in shape order) with one shape and codec parameters whose outputs lie
  // at equal distances decodes in one set of launches where the codec has batch launchers; its
  // payloads are staged at one stride (the run's longest, aligned). `expected` holds the
  // headers' shapes (checked above).
  const size_t n = headers.size();
  const auto [order, elem_at] = OrderByShape(expected);
  struct Run {
    size_t first, count;  // order[first ..]
    uint64_t step, stride, slot;
  };
  std::vector<Run> runs;
  uint64_t staging = 0;
  for (size_t k = 0; k < n;) {
    const size_t i = order[k];
    const CodecOps& ops = GetCodecOps(headers[i].params.codec);
    Run r{k, 1, k + 1 < n ? elem_at[order[k + 1]] - elem_at[i] : 0, Align(payloads[i].size()),
          staging};
    while (ops.decode_cuda_batch != nullptr && k + r.count < n) {
      const size_t j = order[k + r.count];
      if (ShapeKey(headers[j].shape) != ShapeKey(headers[i].shape) ||
          !(headers[j].params == headers[i].params) ||
          elem_at[j] != elem_at[i] + r.count * r.step) {
        break;
      }
      r.stride = std::max(r.stride, Align(payloads[j].size()));
      ++r.count;
    }
    staging += r.count * r.stride;
    runs.push_back(r);
    k += r.count;
  }
  CudaScratch st;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t s, st.Stream(stream));
  KVPOOL_ASSIGN_OR_RETURN(uint8_t * base, st.Alloc<uint8_t>(staging));
  for (const Run& r : runs) {
    std::vector<uint64_t> sizes(r.count);
    for (size_t m = 0; m < r.count; ++m) {
      const absl::string_view payload = payloads[order[r.first + m]];
      sizes[m] = payload.size();
      KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(base + r.slot + m * r.stride, payload.data(),
                                                  payload.size(), cudaMemcpyHostToDevice, s));
    }
    const size_t i = order[r.first];
    const CodecOps& ops = GetCodecOps(headers[i].params.codec);
    if (r.count > 1) {
      KVPOOL_RETURN_IF_ERROR(ops.decode_cuda_batch(
          headers[i].shape, headers[i].params, static_cast<uint32_t>(r.count), base + r.slot,
          r.stride, sizes.data(), d_out + elem_at[i], r.step, s));
    } else {
      KVPOOL_RETURN_IF_ERROR(ops.decode_cuda(headers[i].shape, headers[i].params, base + r.slot,
                                             sizes[0], d_out + elem_at[i], s));
    }
  }
  for (size_t i = 0; i < n && !scales.empty(); ++i) {
    if (scales[i] != 1.f) {
      KVPOOL_RETURN_IF_ERROR(ScaleOnDevice(headers[i].shape.dtype, d_out + elem_at[i],
                                           headers[i].shape.Elements(), scales[i], s));
    }
  }
  return FromCuda(cudaStreamSynchronize(s), "decode to device");
}

}  // namespace kvpool::kernels
