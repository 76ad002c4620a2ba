// The kivi codec. KIVI baseline: asymmetric min-max quantisation to 2, 4 or 8 bits; keys per channel over groups of G tokens, values per token over groups of G channels; fp16 scale and minimum per group; bit-packed values.
// The payload format is defined by kivi_ref.cc and documented there. Thread-safe.
#ifndef KVPOOL_KERNELS_KIVI_H_
#define KVPOOL_KERNELS_KIVI_H_

#include "kernels/codec.h"

namespace kvpool::kernels::kivi {

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

// CUDA batch launchers (codec.h; defined only in CUDA builds).
CudaEncodeBatchFn EncodeBatchCuda;
CudaDecodeBatchFn DecodeBatchCuda;

}  // namespace kvpool::kernels::kivi

#endif  // KVPOOL_KERNELS_KIVI_H_
