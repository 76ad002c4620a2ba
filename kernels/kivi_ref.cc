// PLACEHOLDER until the kivi codec lands: every call is Unimplemented.
#include "kernels/kivi.h"

namespace kvpool::kernels::kivi {

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams&) { return shape.Bytes(); }
absl::StatusOr<uint64_t> EncodeRef(const SegmentShape&, const CodecParams&, const uint16_t*,
                                   uint8_t*, uint64_t) {
  return absl::UnimplementedError("kivi codec not built yet");
}
absl::Status DecodeRef(const SegmentShape&, const CodecParams&, const uint8_t*, uint64_t,
                       uint16_t*) {
  return absl::UnimplementedError("kivi codec not built yet");
}

}  // namespace kvpool::kernels::kivi
