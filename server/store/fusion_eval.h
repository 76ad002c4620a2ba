// The fusion evaluation harness behind `kvpool fusion eval` and `kvpool-bench fusion`: ingests
// a corpus of blocks in-process exactly as the daemon's put does (EncodeBlock / EncodeBatch into
// a BlockStore, one thread), reads every block back as a client would (decode, scale), and
// measures what was stored, how long ingest took, and the error of every block (relative L2
// and attention-output error, kernels/quality.h).
//
// Thread-compatible (stateless function).
#ifndef KVPOOL_SERVER_STORE_FUSION_EVAL_H_
#define KVPOOL_SERVER_STORE_FUSION_EVAL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/fuser.h"

namespace kvpool::server {

struct FusionEvalResult {
  uint64_t blocks = 0;
  uint64_t logical_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t segments = 0;        // Distinct segments stored.
  uint64_t segment_refs = 0;
  uint64_t fused_refs = 0;
  double ingest_seconds = 0;    // Encode + fusion + insert, one thread.
  // Per block, read back against what was put.
  std::vector<double> attn_errors;
  std::vector<double> rel_errors;

  double compression_ratio() const { return stored_bytes ? double(logical_bytes) / stored_bytes : 0; }
  double fusion_ratio() const { return segments ? double(segment_refs) / segments : 0; }
  double ingest_gbps() const { return ingest_seconds > 0 ? logical_bytes / ingest_seconds / 1e9 : 0; }
};

struct FusionEvalOptions {
  uint32_t batch_blocks = 16;    // Blocks per put (batch fusion groups within one put).
  bool measure_quality = true;   // Read back and measure errors (skip for throughput runs).
  // Called after each put with (blocks done, total), e.g. for a progress bar; may be empty.
  std::function<void(uint64_t, uint64_t)> progress;
};

// `blocks` are canonical blocks of context.spec. InvalidArgument for blocks of the wrong size;
// codec errors otherwise.
absl::StatusOr<FusionEvalResult> EvaluateFusion(const EncodeContext& context,
                                                const std::vector<std::string>& blocks,
                                                const FusionEvalOptions& options);

// The q-quantile (0..1) of `values` (nearest rank); 0 when empty.
double Quantile(std::vector<double> values, double q);

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_STORE_FUSION_EVAL_H_
