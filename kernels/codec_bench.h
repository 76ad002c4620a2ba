// Throughput of a codec's CUDA path against a device-to-device copy of the same bytes, both
// timed with CUDA events in the same run (for kvpool-bench codec). Unavailable without CUDA or
// a device; Unimplemented when the codec has no kernel. Thread-compatible.
#ifndef KVPOOL_KERNELS_CODEC_BENCH_H_
#define KVPOOL_KERNELS_CODEC_BENCH_H_

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/codec.h"

namespace kvpool::kernels {

struct DeviceThroughput {
  double d2d_copy_gbps = 0;  // cudaMemcpy device to device, bytes read per second.
  double encode_gbps = 0;    // Input (fp16/bf16) bytes per second.
  double decode_gbps = 0;    // Output bytes per second.
  bool batched = false;      // all segments in one set of launches (CodecOps' batch launchers)
};

// `elements`: `segments` consecutive segments of `shape`. Runs each step `iterations` times.
absl::StatusOr<DeviceThroughput> MeasureDeviceThroughput(const CodecParams& params,
                                                         const SegmentShape& shape,
                                                         absl::Span<const uint16_t> elements,
                                                         int segments, int iterations);

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CODEC_BENCH_H_
