// Builds without CUDA: there is no device.
#include "kernels/device_codec.h"

namespace kvpool::kernels {

absl::StatusOr<std::vector<std::string>> EncodeSegmentsOnDevice(const CodecParams&,
                                                                absl::Span<const SegmentShape>,
                                                                absl::Span<const uint16_t>,
                                                                cudaStream_t) {
  return absl::UnavailableError("this build has no CUDA");
}

absl::Status DecodeSegmentsToDevice(absl::Span<const absl::string_view>,
                                    absl::Span<const SegmentShape>, uint16_t*,
                                    absl::Span<const float>, cudaStream_t) {
  return absl::UnavailableError("this build has no CUDA");
}

bool IsDevicePointer(const void*) { return false; }

}  // namespace kvpool::kernels
