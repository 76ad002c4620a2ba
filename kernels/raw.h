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
// CUDA launchers, as kivi's (kivi.h).
absl::Status EncodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint16_t* d_in, uint64_t in_stride, uint8_t* d_out,
                             uint64_t out_stride, uint64_t* d_sizes, cudaStream_t stream);
absl::Status DecodeBatchCuda(const SegmentShape& shape, const CodecParams& params, uint32_t count,
                             const uint8_t* d_payload, uint64_t payload_stride,
                             const uint64_t* sizes, uint16_t* d_out, uint64_t out_stride,
                             cudaStream_t stream);

}  // namespace kvpool::kernels::raw

#endif  // KVPOOL_KERNELS_RAW_H_
