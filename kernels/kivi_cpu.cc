// PLACEHOLDER until the kivi codec lands: the fast path is the reference.
#include "kernels/kivi.h"

namespace kvpool::kernels::kivi {

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  return EncodeRef(shape, params, in, out, capacity);
}
absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out) {
  return DecodeRef(shape, params, payload, size, out);
}

}  // namespace kvpool::kernels::kivi
