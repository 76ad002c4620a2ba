// Fusion math's CUDA entry points in builds without CUDA: there is no device.
#include "kernels/fusion.h"

namespace kvpool::kernels {

absl::StatusOr<std::vector<Sketch>> SketchSegmentsOnDevice(
    DType, absl::Span<const absl::Span<const uint16_t>>, cudaStream_t) {
  return absl::UnavailableError("this build has no CUDA");
}

absl::StatusOr<std::vector<Fit>> FitEncodedOnDevice(absl::Span<const FitRequest>, cudaStream_t) {
  return absl::UnavailableError("this build has no CUDA");
}

}  // namespace kvpool::kernels
