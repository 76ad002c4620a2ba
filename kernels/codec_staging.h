// Host-buffer wrappers around the CUDA launchers for tools and tests: copy in, launch,
// copy out, synchronise. Unavailable without CUDA or a device; Unimplemented when the codec
// has no kernel. Not for the daemon's hot path. Thread-safe.
#ifndef KVPOOL_KERNELS_CODEC_STAGING_H_
#define KVPOOL_KERNELS_CODEC_STAGING_H_

#include "kernels/codec.h"

namespace kvpool::kernels {

absl::StatusOr<uint64_t> EncodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                        const CodecParams& params, const uint16_t* in,
                                        uint8_t* out, uint64_t capacity);
absl::Status DecodeOnDevice(const CodecOps& ops, const SegmentShape& shape,
                            const CodecParams& params, const uint8_t* payload, uint64_t size,
                            uint16_t* out);

// `count` segments of `shape` (host elements, back to back) through the codec's batch
// launchers: payload i lands at out + i * stride (the same stride on the device), its size in
// sizes[i]. Unimplemented when the codec has no batch launchers.
absl::Status EncodeBatchOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                 const CodecParams& params, uint32_t count, const uint16_t* in,
                                 uint8_t* out, uint64_t stride, uint64_t* sizes);
// Payload i (sizes[i] bytes) at payloads + i * stride, decoded to out + i * shape.Elements().
absl::Status DecodeBatchOnDevice(const CodecOps& ops, const SegmentShape& shape,
                                 const CodecParams& params, uint32_t count, const uint8_t* payloads,
                                 uint64_t stride, const uint64_t* sizes, uint16_t* out);

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CODEC_STAGING_H_
