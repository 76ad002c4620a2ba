// `kvpool-bench fusion`: ingest throughput (encode + fusion + insert, one thread, in-process as
// the daemon's put runs it) with fusion off, online and batch, on a corpus whose blocks share
// content and on unrelated blocks, for the daemon's default codec and for raw. The anchor is
// ingest without fusion, measured in the same run; memcpy of the corpus is printed beside it.
#ifndef KVPOOL_BENCH_FUSION_BENCH_H_
#define KVPOOL_BENCH_FUSION_BENCH_H_

#include <cstdint>

#include "absl/status/status.h"

namespace kvpool::bench {

struct FusionBenchOptions {
  uint32_t layers = 16;
  uint32_t kv_heads = 2;
  uint32_t head_dim = 128;
  uint32_t tokens = 256;
  uint32_t blocks = 32;
  uint32_t repeats = 3;  // Best of.
  bool json = false;
};

absl::Status RunFusionBench(const FusionBenchOptions& options);

}  // namespace kvpool::bench

#endif  // KVPOOL_BENCH_FUSION_BENCH_H_
