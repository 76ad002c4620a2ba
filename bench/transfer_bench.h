// `kvpool-bench transfer`: put and get throughput of 2 MiB blocks through kvpoold over gRPC on
// loopback, beside Redis SET/GET of values of the same size and a memcpy of the same size, all
// measured in the same run.
#ifndef KVPOOL_BENCH_TRANSFER_BENCH_H_
#define KVPOOL_BENCH_TRANSFER_BENCH_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace kvpool::bench {

struct TransferOptions {
  std::string server;        // An existing kvpoold; "" starts one from build/bin.
  std::string redis;         // An existing Redis; "" starts redis-server on a free port.
  uint32_t blocks = 64;      // Blocks per round.
  uint32_t batch = 16;       // Blocks per batched Put/Get call.
  uint32_t rounds = 3;       // Rounds; the median is reported.
  bool json = false;
};

absl::Status RunTransfer(const TransferOptions& options);

}  // namespace kvpool::bench

#endif  // KVPOOL_BENCH_TRANSFER_BENCH_H_
