// The packkv codec. PackKV pipeline: per-token quantisation with a scale relative to the token's range (a relative error bound), optional token re-ordering inside a block, bit-width-adaptive packing per pack of 16 tokens and per column (minimum, bit width, packed values).
// The payload format is defined by packkv_ref.cc and documented there. Thread-safe.
#ifndef KVPOOL_KERNELS_PACKKV_H_
#define KVPOOL_KERNELS_PACKKV_H_

#include "kernels/codec.h"

namespace kvpool::kernels::packkv {

// Upper bound of the payload size for this shape and these (normalised) parameters.
uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params);

// Reference (plain loops): the definition of the format.
absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity);
absl::Status DecodeRef(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out);

// Fast CPU path (AVX2/F16C when CpuHasAvx2(), else the reference).
absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity);
absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out);

// CUDA batch launchers (defined only in CUDA builds; codec.h says what they take): payloads
// the reference's byte for byte, decoded values bit for bit.
CudaEncodeBatchFn EncodeBatchCuda;
CudaDecodeBatchFn DecodeBatchCuda;

}  // namespace kvpool::kernels::packkv

#endif  // KVPOOL_KERNELS_PACKKV_H_
