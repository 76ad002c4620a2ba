// raw: reference and CPU path are one memcpy.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/raw.h"

namespace kvpool::kernels::raw {

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams&) { return shape.Bytes(); }

absl::StatusOr<uint64_t> Encode(const SegmentShape& shape, const CodecParams&, const uint16_t* in,
                                uint8_t* out, uint64_t capacity) {
  if (capacity < shape.Bytes()) return absl::InvalidArgumentError("raw: output too small");
  std::memcpy(out, in, shape.Bytes());
  return shape.Bytes();
}

absl::Status Decode(const SegmentShape& shape, const CodecParams&, const uint8_t* payload,
                    uint64_t size, uint16_t* out) {
  if (size != shape.Bytes()) {
    return absl::DataLossError(
        absl::StrCat("raw payload is ", size, " bytes, the shape needs ", shape.Bytes()));
  }
  std::memcpy(out, payload, size);
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::raw
