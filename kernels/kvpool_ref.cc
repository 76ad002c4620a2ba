// PLACEHOLDER until the kvpool codec lands: every call is Unimplemented.
#include "kernels/kvpool.h"

namespace kvpool::kernels::kvpool {

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams&) { return shape.Bytes(); }
absl::StatusOr<uint64_t> EncodeRef(const SegmentShape&, const CodecParams&, const uint16_t*,
                                   uint8_t*, uint64_t) {
  return absl::UnimplementedError("kvpool codec not built yet");
}
absl::Status DecodeRef(const SegmentShape&, const CodecParams&, const uint8_t*, uint64_t,
                       uint16_t*) {
  return absl::UnimplementedError("kvpool codec not built yet");
}

}  // namespace kvpool::kernels::kvpool
