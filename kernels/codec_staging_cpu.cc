// Builds without CUDA: the CUDA path is unavailable.
#include "kernels/codec_staging.h"

namespace kvpool::kernels {

absl::StatusOr<uint64_t> EncodeOnDevice(const CodecOps&, const SegmentShape&, const CodecParams&,
                                        const uint16_t*, uint8_t*, uint64_t) {
  return absl::UnavailableError("this build has no CUDA");
}
absl::Status DecodeOnDevice(const CodecOps&, const SegmentShape&, const CodecParams&,
                            const uint8_t*, uint64_t, uint16_t*) {
  return absl::UnavailableError("this build has no CUDA");
}

absl::Status EncodeBatchOnDevice(const CodecOps&, const SegmentShape&, const CodecParams&, uint32_t,
                                 const uint16_t*, uint8_t*, uint64_t, uint64_t*) {
  return absl::UnavailableError("this build has no CUDA");
}
absl::Status DecodeBatchOnDevice(const CodecOps&, const SegmentShape&, const CodecParams&, uint32_t,
                                 const uint8_t*, uint64_t, const uint64_t*, uint16_t*) {
  return absl::UnavailableError("this build has no CUDA");
}

}  // namespace kvpool::kernels
