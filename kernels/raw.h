// The raw codec: the elements as they are (fp16/bf16, little-endian), checksummed by the
// segment format. Payload = Elements() * 2 bytes. Thread-safe.
#ifndef KVPOOL_KERNELS_RAW_H_
#define KVPOOL_KERNELS_RAW_H_

#include "kernels/codec.h"

namespace kvpool::kernels::raw {

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params);
absl::StatusOr<uint64_t> Encode(const SegmentShape& shape, const CodecParams& params,
                                const uint16_t* in, uint8_t* out, uint64_t capacity);
absl::Status Decode(const SegmentShape& shape, const CodecParams& params, const uint8_t* payload,
                    uint64_t size, uint16_t* out);
// CUDA batch launchers (codec.h; defined only in CUDA builds).
CudaEncodeBatchFn EncodeBatchCuda;
CudaDecodeBatchFn DecodeBatchCuda;

}  // namespace kvpool::kernels::raw

#endif  // KVPOOL_KERNELS_RAW_H_
