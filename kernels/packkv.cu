// PLACEHOLDER until the packkv codec lands.
#include "kernels/packkv.h"

namespace kvpool::kernels::packkv {

absl::Status EncodeCuda(const SegmentShape&, const CodecParams&, const uint16_t*, uint8_t*,
                        uint64_t, uint64_t*, cudaStream_t) {
  return absl::UnimplementedError("packkv CUDA kernel not built yet");
}
absl::Status DecodeCuda(const SegmentShape&, const CodecParams&, const uint8_t*, uint64_t,
                        uint16_t*, cudaStream_t) {
  return absl::UnimplementedError("packkv CUDA kernel not built yet");
}

}  // namespace kvpool::kernels::packkv
