// The kvpool codec. kvpool's own error-bounded codec: meets the caller's relative L2 error budget per segment at the fewest bytes.
// The payload format is defined by kvpool_ref.cc and documented there. Thread-safe.
#ifndef KVPOOL_KERNELS_KVPOOL_H_
#define KVPOOL_KERNELS_KVPOOL_H_

#include "kernels/codec.h"

namespace kvpool::kernels::kvpool {

// Upper bound of the payload size for this shape and these (normalised) parameters; for the
// default profile, the room its encoder writes in place (about 1.26x raw for 128-channel heads;
// its payloads are smaller than raw, which it stores instead).
uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params);

// Reference (plain loops): the definition of the format.
absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity);
absl::Status DecodeRef(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out);

// The same given, for a value segment, its layer's keys (LayerKeys: the key segment of the
// same tokens and shape, and/or its payload from this codec with the same parameters): the
// residual step of each token and head then follows how far its key lies from the head's mean
// key, finer for the tokens queries are likely to attend to (key segments do this from their
// own elements, and their payload carries the classes, which a value then takes as they are).
// The relative L2 budget holds either way.
absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, const LayerKeys& keys, uint8_t* out,
                                   uint64_t capacity);

// Fast CPU path (AVX2/F16C when CpuHasAvx2(), else the reference).
absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity);
absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, const LayerKeys& keys, uint8_t* out,
                                   uint64_t capacity);
absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out);

// CUDA batch launchers (codec.h; defined only in CUDA builds). The encoder writes the default
// profile's payload (mode 4) as the host does, a segment at a time with its passes on the GPU
// (kvpool_rows_cuda_encoder.cuh; head_dim up to 1024), and for the other profiles a simpler
// valid payload than the host's (mode 1, rank 0; raw when coding does not pay); the decoder
// takes every mode and writes 0xffff to every element of a segment whose payload DecodeRef
// would reject (it cannot return that status without synchronising).
CudaEncodeBatchFn EncodeBatchCuda;
CudaDecodeBatchFn DecodeBatchCuda;

}  // namespace kvpool::kernels::kvpool

#endif  // KVPOOL_KERNELS_KVPOOL_H_
