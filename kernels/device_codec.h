// Encoding and decoding many segments on the GPU in one go, for the daemon (encode on put when
// a GPU is present) and the client (decode into a caller's device buffer). Host memory in or
// out is staged through one device allocation per call; all work runs on `stream` and the
// call synchronises that stream before returning. Unavailable without CUDA or a device;
// Unimplemented when the codec has no kernel. Thread-safe (each call owns its buffers).
#ifndef KVPOOL_KERNELS_DEVICE_CODEC_H_
#define KVPOOL_KERNELS_DEVICE_CODEC_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/codec.h"

namespace kvpool::kernels {

// Encodes `count` consecutive segments of `shapes[i]` (host elements, back to back) into whole
// encoded segments. Segments holding NaN/Inf are encoded raw, as EncodeSegment does.
absl::StatusOr<std::vector<std::string>> EncodeSegmentsOnDevice(
    const CodecParams& params, absl::Span<const SegmentShape> shapes,
    absl::Span<const uint16_t> elements, cudaStream_t stream = nullptr);

// Decodes whole encoded segments (host memory; each checked as DecodeSegment does, against
// expected[i]) into device memory: segment i goes to d_out + (sum of the earlier segments'
// elements), its values multiplied by scales[i] when `scales` is not empty (fused segments;
// kernels/fusion.h: to_dtype(scale * v)). REQUIRES: d_out holds that many elements; scales is
// empty or has one entry per segment.
absl::Status DecodeSegmentsToDevice(absl::Span<const absl::string_view> encoded,
                                    absl::Span<const SegmentShape> expected, uint16_t* d_out,
                                    absl::Span<const float> scales = {},
                                    cudaStream_t stream = nullptr);

// True when `ptr` is device (or managed) memory that the CUDA kernels can write.
bool IsDevicePointer(const void* ptr);

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_DEVICE_CODEC_H_
