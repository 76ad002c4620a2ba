// Builds without CUDA.
#include "kernels/codec_bench.h"

namespace kvpool::kernels {

absl::StatusOr<DeviceThroughput> MeasureDeviceThroughput(const CodecParams&, const SegmentShape&,
                                                         absl::Span<const uint16_t>, int, int) {
  return absl::UnavailableError("this build has no CUDA");
}

}  // namespace kvpool::kernels
