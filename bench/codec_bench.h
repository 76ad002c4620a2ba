// `kvpool-bench codec`: encode and decode throughput of each codec on one core (GB/s of
// fp16 input / output), per path (ref, cpu), beside memcpy of the same bytes measured in the
// same run; with a GPU, the CUDA paths beside a device-to-device copy. Host paths measure whole
// segments through EncodeSegment (values with their keys, as put passes them) and
// DecodeSegment (checksum verified), as the daemon and the client run them.
#ifndef KVPOOL_BENCH_CODEC_BENCH_H_
#define KVPOOL_BENCH_CODEC_BENCH_H_

#include <string>

#include "absl/status/status.h"

namespace kvpool::bench {

struct CodecBenchOptions {
  bool json = false;
  double seconds = 0.3;  // Minimum time per measurement.
  std::string only;      // Non-empty: only the codecs whose printed name contains it.
  std::string paths = "ref,cpu,cuda";  // The paths measured, comma-separated.
  bool plain_stores = false;  // Decode without kernels::StreamingOutput (as server-side decode).
};

absl::Status RunCodecBench(const CodecBenchOptions& options);

}  // namespace kvpool::bench

#endif  // KVPOOL_BENCH_CODEC_BENCH_H_
