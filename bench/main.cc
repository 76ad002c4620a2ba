// kvpool-bench: benchmarks that print each figure beside its anchor measured in the same run.
//
//   kvpool-bench codec [--only SUBSTR] [--paths ref,cpu,cuda] [--plain_stores] [--seconds S]
//                      [--json]
//   kvpool-bench fusion [--json]   (ingest with fusion off / online / batch, in-process)
//   kvpool-bench transfer [--server HOST:PORT] [--redis HOST:PORT] [--blocks N] [--batch B]
//                         [--rounds R] [--json]
//
// Without --server/--redis it starts kvpoold (from its own folder) and redis-server on
// loopback, and stops them afterwards.
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench/codec_bench.h"
#include "bench/fusion_bench.h"
#include "bench/transfer_bench.h"
#include "common/flag_names.h"

ABSL_FLAG(std::string, server, "", "existing kvpoold HOST:PORT (default: start one)");
ABSL_FLAG(std::string, redis, "", "existing Redis HOST:PORT (default: start redis-server)");
ABSL_FLAG(uint32_t, blocks, 64, "2 MiB blocks per round");
ABSL_FLAG(uint32_t, batch, 16, "blocks per batched call");
ABSL_FLAG(uint32_t, rounds, 3, "rounds (median reported)");
ABSL_FLAG(bool, json, false, "print JSON");
ABSL_FLAG(std::string, only, "", "codec: only the codecs whose name contains this");
ABSL_FLAG(double, seconds, 0.3, "codec: minimum seconds per measurement");
ABSL_FLAG(bool, plain_stores, false,
          "codec: decode with plain stores (as the daemon's server-side decode), not as a large "
          "client get (streaming stores where the decoder has them)");
ABSL_FLAG(std::string, paths, "ref,cpu,cuda",
          "codec: the paths to measure, comma-separated (ref, cpu, cuda)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvpool benchmarks. Subcommands: transfer, codec, fusion");
  std::vector<std::string> args = kvpool::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = kvpool::ArgvPointers(args);
  std::vector<char*> positional = absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string command = positional.size() > 1 ? positional[1] : "transfer";
  if ((command != "transfer" && command != "codec" && command != "fusion") ||
      positional.size() > 2) {
    std::cerr << "kvpool-bench: expected one subcommand: transfer, codec, fusion\n";
    return 2;
  }
  if (command == "fusion") {
    kvpool::bench::FusionBenchOptions fo;
    fo.json = absl::GetFlag(FLAGS_json);
    if (absl::Status s = kvpool::bench::RunFusionBench(fo); !s.ok()) {
      std::cerr << "kvpool-bench fusion: " << s.message() << "\n";
      return 1;
    }
    return 0;
  }
  if (command == "codec") {
    kvpool::bench::CodecBenchOptions co;
    co.json = absl::GetFlag(FLAGS_json);
    co.only = absl::GetFlag(FLAGS_only);
    co.seconds = absl::GetFlag(FLAGS_seconds);
    co.paths = absl::GetFlag(FLAGS_paths);
    co.plain_stores = absl::GetFlag(FLAGS_plain_stores);
    if (absl::Status s = kvpool::bench::RunCodecBench(co); !s.ok()) {
      std::cerr << "kvpool-bench codec: " << s.message() << "\n";
      return 1;
    }
    return 0;
  }
  kvpool::bench::TransferOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.redis = absl::GetFlag(FLAGS_redis);
  o.blocks = absl::GetFlag(FLAGS_blocks);
  o.batch = absl::GetFlag(FLAGS_batch);
  o.rounds = absl::GetFlag(FLAGS_rounds);
  o.json = absl::GetFlag(FLAGS_json);
  if (absl::Status s = kvpool::bench::RunTransfer(o); !s.ok()) {
    std::cerr << "kvpool-bench " << command << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}
