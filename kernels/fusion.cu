// Fusion math, CUDA path: the launchers of the kernels in fusion_kernels.cuh, staging host
// memory through device allocations.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda_scratch.h"
#include "kernels/cuda_status.h"
#include "kernels/device.h"
#include "kernels/device_codec.h"
#include "kernels/fusion.h"
#include "kernels/fusion_internal.h"
#include "kernels/fusion_kernels.cuh"

namespace kvpool::kernels {
namespace {

using internal::ErrorKernel;
using internal::kSplits;
using internal::kThreads;
using internal::PairRef;
using internal::SketchKernel;
using internal::SumsKernel;

// The projections, transposed, on the device current at the first call; never freed.
absl::StatusOr<const float*> DeviceProjections() {
  static std::once_flag once;
  static float* d_projections = nullptr;
  static cudaError_t error = cudaSuccess;
  std::call_once(once, [] {
    const std::vector<float> t = internal::TransposedProjections();
    error = cudaMalloc(&d_projections, t.size() * sizeof(float));
    if (error == cudaSuccess) {
      error = cudaMemcpy(d_projections, t.data(), t.size() * sizeof(float),
                         cudaMemcpyHostToDevice);
    }
  });
  KVPOOL_RETURN_IF_CUDA_ERROR(error);
  return d_projections;
}

unsigned Grid(uint64_t n) { return static_cast<unsigned>(n); }

}  // namespace

absl::StatusOr<std::vector<Sketch>> SketchSegmentsOnDevice(
    DType dtype, absl::Span<const absl::Span<const uint16_t>> segments, cudaStream_t stream) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  std::vector<Sketch> out(segments.size());
  if (segments.empty()) return out;
  // The samples are gathered on the host (at most kSketchSamples elements per segment), so
  // only they cross the bus.
  std::vector<uint16_t> samples;
  std::vector<uint32_t> counts;
  KVPOOL_RETURN_IF_ERROR(internal::GatherSamples(segments, &samples, &counts));
  KVPOOL_ASSIGN_OR_RETURN(const float* d_projections, DeviceProjections());
  CudaScratch scratch;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t st, scratch.Stream(stream));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_samples, scratch.Alloc<uint16_t>(samples.size()));
  KVPOOL_ASSIGN_OR_RETURN(uint32_t* d_counts, scratch.Alloc<uint32_t>(counts.size()));
  KVPOOL_ASSIGN_OR_RETURN(uint64_t* d_bits, scratch.Alloc<uint64_t>(2 * segments.size()));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_samples, samples.data(),
                                              samples.size() * sizeof(uint16_t),
                                              cudaMemcpyHostToDevice, st));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_counts, counts.data(),
                                              counts.size() * sizeof(uint32_t),
                                              cudaMemcpyHostToDevice, st));
  if (dtype == DType::kBf16) {
    SketchKernel<true><<<Grid(segments.size()), kSketchBits, 0, st>>>(d_samples, d_counts,
                                                                      d_projections, d_bits);
  } else {
    SketchKernel<false><<<Grid(segments.size()), kSketchBits, 0, st>>>(d_samples, d_counts,
                                                                       d_projections, d_bits);
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  std::vector<uint64_t> bits(2 * segments.size());
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(bits.data(), d_bits, bits.size() * sizeof(uint64_t),
                                              cudaMemcpyDeviceToHost, st));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(st));
  for (size_t s = 0; s < segments.size(); ++s) {
    out[s].bits[0] = bits[2 * s];
    out[s].bits[1] = bits[2 * s + 1];
  }
  return out;
}

absl::StatusOr<std::vector<Fit>> FitEncodedOnDevice(absl::Span<const FitRequest> requests,
                                                    cudaStream_t stream) {
  if (DeviceCount() == 0) return absl::UnavailableError("no CUDA device");
  std::vector<Fit> out(requests.size());
  if (requests.empty()) return out;
  const DType dtype = requests[0].shape.dtype;
  if (requests.size() > 65535) {
    return absl::InvalidArgumentError("more than 65535 fit requests in one call");
  }
  // Distinct x spans and representatives (by pointer), each with its element offset in the
  // staging area.
  absl::flat_hash_map<const uint16_t*, size_t> x_index;
  absl::flat_hash_map<const char*, size_t> r_index;
  std::vector<absl::Span<const uint16_t>> xs;
  std::vector<uint64_t> x_offsets, r_offsets;
  std::vector<absl::string_view> reps;
  std::vector<SegmentShape> rep_shapes;
  std::vector<PairRef> pairs(requests.size());
  uint64_t x_total = 0, r_total = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const FitRequest& q = requests[i];
    if (q.shape.dtype != dtype) return absl::InvalidArgumentError("fit requests mix dtypes");
    if (q.x.size() != q.shape.Elements()) {
      return absl::InvalidArgumentError(absl::StrCat("fit request ", i, ": x has ", q.x.size(),
                                                     " elements, its shape ",
                                                     q.shape.Elements()));
    }
    auto [xit, x_new] = x_index.try_emplace(q.x.data(), xs.size());
    if (x_new) {
      xs.push_back(q.x);
      x_offsets.push_back(x_total);
      x_total += q.x.size();
    } else if (xs[xit->second].size() != q.x.size()) {
      return absl::InvalidArgumentError("fit requests: one x pointer with two sizes");
    }
    auto [rit, r_new] = r_index.try_emplace(q.representative.data(), reps.size());
    if (r_new) {
      reps.push_back(q.representative);
      rep_shapes.push_back(q.shape);
      r_offsets.push_back(r_total);
      r_total += q.shape.Elements();
    } else if (reps[rit->second].size() != q.representative.size() ||
               rep_shapes[rit->second].Elements() != q.shape.Elements() ||
               rep_shapes[rit->second].kind != q.shape.kind) {
      return absl::InvalidArgumentError("fit requests: one representative with two shapes");
    }
    pairs[i] = PairRef{x_offsets[xit->second], r_offsets[rit->second], q.x.size()};
  }
  CudaScratch scratch;
  KVPOOL_ASSIGN_OR_RETURN(cudaStream_t st, scratch.Stream(stream));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_x, scratch.Alloc<uint16_t>(x_total));
  KVPOOL_ASSIGN_OR_RETURN(uint16_t* d_r, scratch.Alloc<uint16_t>(r_total));
  KVPOOL_ASSIGN_OR_RETURN(PairRef* d_pairs, scratch.Alloc<PairRef>(pairs.size()));
  KVPOOL_ASSIGN_OR_RETURN(double* d_partials, scratch.Alloc<double>(pairs.size() * kSplits * 3));
  KVPOOL_ASSIGN_OR_RETURN(float* d_scales, scratch.Alloc<float>(pairs.size()));
  // The representatives: parsed, checked and decoded (DataLoss on corrupt bytes) on `st`.
  KVPOOL_RETURN_IF_ERROR(DecodeSegmentsToDevice(reps, rep_shapes, d_r, {}, st));
  for (size_t j = 0; j < xs.size(); ++j) {
    KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_x + x_offsets[j], xs[j].data(),
                                                xs[j].size() * sizeof(uint16_t),
                                                cudaMemcpyHostToDevice, st));
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_pairs, pairs.data(), pairs.size() * sizeof(PairRef),
                                              cudaMemcpyHostToDevice, st));
  const dim3 grid(kSplits, Grid(pairs.size()));
  const bool bf16 = dtype == DType::kBf16;
  if (bf16) {
    SumsKernel<true><<<grid, kThreads, 0, st>>>(d_x, d_r, d_pairs, d_partials);
  } else {
    SumsKernel<false><<<grid, kThreads, 0, st>>>(d_x, d_r, d_pairs, d_partials);
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  std::vector<double> partials(pairs.size() * kSplits * 3);
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(partials.data(), d_partials,
                                              partials.size() * sizeof(double),
                                              cudaMemcpyDeviceToHost, st));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(st));
  // Cosine and scale per pair; pairs whose fit is final skip the error pass (n = 0).
  std::vector<double> xx(pairs.size());
  std::vector<bool> needs_error(pairs.size());
  std::vector<float> scales(pairs.size(), 0.f);
  std::vector<PairRef> error_pairs = pairs;
  for (size_t i = 0; i < pairs.size(); ++i) {
    needs_error[i] = internal::FitFromPartials(partials.data(), i, &out[i], &xx[i]);
    scales[i] = out[i].scale;
    if (!needs_error[i]) error_pairs[i].n = 0;
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_pairs, error_pairs.data(),
                                              error_pairs.size() * sizeof(PairRef),
                                              cudaMemcpyHostToDevice, st));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_scales, scales.data(), scales.size() * sizeof(float),
                                              cudaMemcpyHostToDevice, st));
  if (bf16) {
    ErrorKernel<true><<<grid, kThreads, 0, st>>>(d_x, d_r, d_pairs, d_scales, d_partials);
  } else {
    ErrorKernel<false><<<grid, kThreads, 0, st>>>(d_x, d_r, d_pairs, d_scales, d_partials);
  }
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  std::vector<double> errors(pairs.size() * kSplits);
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(errors.data(), d_partials,
                                              errors.size() * sizeof(double),
                                              cudaMemcpyDeviceToHost, st));
  KVPOOL_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(st));
  for (size_t i = 0; i < pairs.size(); ++i) {
    if (needs_error[i]) out[i].rel_error = internal::RelErrorFromPartials(errors.data(), i, xx[i]);
  }
  return out;
}

}  // namespace kvpool::kernels
