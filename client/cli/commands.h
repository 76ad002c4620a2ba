// The `kvpool` CLI's subcommands. Each takes its parsed options, prints what it did to stdout
// and returns a Status; main.cc turns a failure into one line on stderr and exit code 1.
#ifndef KVPOOL_CLIENT_CLI_COMMANDS_H_
#define KVPOOL_CLIENT_CLI_COMMANDS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/encoded_segment.h"
#include "absl/time/time.h"

namespace kvpool::cli {

struct CliOptions {
  std::string server;
  absl::Duration deadline;
  std::string model;
  uint32_t tokens_per_block = 0;
  std::string token_ids;  // .npy path (input; output for gen).
  std::string in;
  std::string out;
  std::string codec;     // "" = the daemon's default.
  uint32_t bits = 0;
  uint32_t group = 0;
  float budget = 0;
  std::string profile;  // kvpool: "" (default), "default", "fast", "entropy".
  bool server_decode = false;
  std::string budgets;   // codec eval: kvpool budgets to compare, comma-separated.
  uint32_t plan_reuse = 32;  // codec encode/eval: kvpool segments per plan (1: one each).
  std::string extra_key;
  bool json = false;
  // gen
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint64_t tokens = 0;
  std::string dtype;
  uint64_t seed = 0;
  uint32_t vocab = 0;
  uint32_t key_rank = 0;
  uint32_t value_rank = 0;
  float noise = 0;
  uint32_t outlier_channels = 0;
  // demo
  uint32_t requests = 0;
  uint32_t shared_blocks = 0;
  uint32_t unique_blocks = 0;
  // fusion eval
  uint32_t blocks = 0;
  uint32_t families = 0;
  float variation = 0;
  std::string fusion_modes;
  double fusion_threshold = 0;
  double fusion_budget = 0;
  std::string skip_layers;
  uint32_t batch_blocks = 0;
};

// The codec the flags describe (--codec, --bits, --group, --budget), normalised; "" = kvpool.
absl::StatusOr<CodecParams> CodecFromFlags(const CliOptions& o);

absl::Status RunPut(const CliOptions& o);
absl::Status RunLookup(const CliOptions& o);
absl::Status RunGet(const CliOptions& o);
absl::Status RunDelete(const CliOptions& o);
absl::Status RunStats(const CliOptions& o);
absl::Status RunGen(const CliOptions& o);
absl::Status RunDemo(const CliOptions& o);
absl::Status RunCodecEncode(const CliOptions& o);
absl::Status RunCodecDecode(const CliOptions& o);
absl::Status RunCodecEval(const CliOptions& o);
absl::Status RunFusionEval(const CliOptions& o);

}  // namespace kvpool::cli

#endif  // KVPOOL_CLIENT_CLI_COMMANDS_H_
