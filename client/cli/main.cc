// kvpool: the command-line client.
//
//   kvpool [--server HOST:PORT] put    --model M --tokens-per-block N --token-ids IDS.npy --in KV.npy
//   kvpool [--server HOST:PORT] lookup --model M --tokens-per-block N --token-ids IDS.npy [--json]
//   kvpool [--server HOST:PORT] get    --model M --tokens-per-block N --token-ids IDS.npy --out KV.npy
//   kvpool [--server HOST:PORT] delete --model M --tokens-per-block N --token-ids IDS.npy
//   kvpool [--server HOST:PORT] stats  [--json]
//   kvpool gen  --out KV.npy [--token-ids IDS.npy] [--layers L --kv-heads H --head-dim D
//               --tokens T --dtype fp16|bf16 --seed S]
//   kvpool [--server HOST:PORT] demo [--requests R --shared-blocks S --unique-blocks U]
//   kvpool codec encode --in KV.npy --out X.kvz [--codec C --bits B --group G --budget E
//                       --tokens-per-block N --plan-reuse N]
//   kvpool codec decode --in X.kvz --out KV.npy
//   kvpool codec eval   --in KV.npy [--codec C params... | --budgets 0.01,0.05] [--plan-reuse N]
//                       [--json]
//   kvpool fusion eval  [--layers L --kv-heads H --head-dim D --tokens T --blocks N
//                       --families F --variation V --fusion online,batch --fusion-threshold X
//                       --fusion-budget E --skip-layers 0,1,-2,-1 --codec C params...] [--json]
//
// Exit 0 on success; 1 with a one-line reason on failure; 2 on a usage error.
#include <iostream>
#include <map>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "common/flag_names.h"

ABSL_FLAG(std::string, server, "127.0.0.1:7470", "kvpoold gRPC address HOST:PORT");
ABSL_FLAG(double, deadline, 60, "seconds each request may take");
ABSL_FLAG(std::string, model, "", "model id (the namespace with --tokens-per-block)");
ABSL_FLAG(uint32_t, tokens_per_block, 0, "tokens per block");
ABSL_FLAG(std::string, token_ids, "", "token ids .npy (int32/int64); gen writes it");
ABSL_FLAG(std::string, in, "", "input KV .npy [layers][2][tokens][kv_heads][head_dim]");
ABSL_FLAG(std::string, out, "", "output .npy");
ABSL_FLAG(std::string, codec, "", "raw | kivi | packkv | kvpool (put: default the daemon's config)");
ABSL_FLAG(uint32_t, bits, 0, "codec bits (kivi: 2, 4, 8; packkv: max bit width)");
ABSL_FLAG(uint32_t, group, 0, "codec group size (kivi: G; packkv: tokens per pack)");
ABSL_FLAG(float, budget, 0, "packkv, kvpool: relative L2 error budget per segment");
ABSL_FLAG(std::string, profile, "",
          "kvpool: default (rows: low rank, fixed bits per row), fast (bit planes, no low rank), "
          "entropy (entropy-coded, the largest ratio, slowest on a CPU)");
ABSL_FLAG(bool, fast, false, "kvpool: --profile=fast");
ABSL_FLAG(std::string, budgets, "0.01,0.02,0.05,0.1",
          "codec eval: kvpool error budgets to compare (without --codec)");
ABSL_FLAG(uint32_t, plan_reuse, 32,
          "codec encode/eval: kvpool segments of a layer's K or V per plan, as the daemon's "
          "plan_reuse (1: a plan per segment)");
ABSL_FLAG(bool, server_decode, false, "get: the daemon decodes (default: this client decodes)");
ABSL_FLAG(std::string, extra_key, "", "extra key bytes mixed into every block key (LoRA, tenant)");
ABSL_FLAG(bool, json, false, "print JSON");
ABSL_FLAG(uint32_t, layers, 4, "gen: layers");
ABSL_FLAG(uint32_t, kv_heads, 2, "gen: KV heads");
ABSL_FLAG(uint32_t, head_dim, 64, "gen: head dim");
ABSL_FLAG(uint64_t, tokens, 256, "gen: tokens");
ABSL_FLAG(std::string, dtype, "fp16", "gen: fp16 | bf16");
ABSL_FLAG(uint64_t, seed, 1, "gen/demo: random seed");
ABSL_FLAG(uint32_t, vocab, 32000, "gen: token ids are drawn from [0, vocab)");
ABSL_FLAG(uint32_t, key_rank, 4, "gen: shared key directions per head (low-rank structure)");
ABSL_FLAG(uint32_t, value_rank, 8, "gen: shared value directions per head");
ABSL_FLAG(float, noise, 0.3f, "gen: unstructured noise fraction in [0, 1]; 1 = i.i.d. Gaussian");
ABSL_FLAG(uint32_t, outlier_channels, 4, "gen: large-magnitude key channels per head");
ABSL_FLAG(uint32_t, requests, 24, "demo: requests");
ABSL_FLAG(uint32_t, shared_blocks, 8, "demo: blocks of the shared system prompt");
ABSL_FLAG(uint32_t, unique_blocks, 4, "demo: blocks of each request's own text");
ABSL_FLAG(uint32_t, blocks, 64, "fusion eval: blocks in the corpus");
ABSL_FLAG(uint32_t, families, 8, "fusion eval: families of similar blocks (= blocks: unrelated)");
ABSL_FLAG(float, variation, 0.05f, "fusion eval: each member's own part, relative to its family");
ABSL_FLAG(std::string, fusion, "online,batch", "fusion eval: fusion modes to compare with the codec alone");
ABSL_FLAG(double, fusion_threshold, 0.95, "fusion eval: cosine threshold");
ABSL_FLAG(double, fusion_budget, 0.05, "fusion eval: error budget (relative L2) of fused segments");
ABSL_FLAG(std::string, skip_layers, "0,1,-2,-1", "fusion eval: layers never fused (negative from the end)");
ABSL_FLAG(uint32_t, batch_blocks, 16, "fusion eval: blocks per put");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvpool client. Subcommands: put, lookup, get, delete, stats, gen, demo. "
      "See --helpfull for flags.");
  std::vector<std::string> args = kvpool::NormalizeFlagNames(argc, argv);
  std::vector<char*> arg_ptrs = kvpool::ArgvPointers(args);
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(args.size()), arg_ptrs.data());
  using Command = absl::Status (*)(const kvpool::cli::CliOptions&);
  const std::map<std::string, Command> commands = {
      {"put", kvpool::cli::RunPut},     {"lookup", kvpool::cli::RunLookup},
      {"get", kvpool::cli::RunGet},     {"delete", kvpool::cli::RunDelete},
      {"stats", kvpool::cli::RunStats}, {"gen", kvpool::cli::RunGen},
      {"demo", kvpool::cli::RunDemo},   {"codec encode", kvpool::cli::RunCodecEncode},
      {"codec decode", kvpool::cli::RunCodecDecode}, {"codec eval", kvpool::cli::RunCodecEval},
      {"fusion eval", kvpool::cli::RunFusionEval}};
  std::string command = positional.size() > 1 ? positional[1] : "";
  const bool two_words = command == "codec" || command == "fusion";
  if (two_words && positional.size() == 3) command += std::string(" ") + positional[2];
  const size_t expected_args = two_words ? 3 : 2;
  if (positional.size() != expected_args || commands.count(command) == 0) {
    std::cerr << "kvpool: expected one subcommand: put, lookup, get, delete, stats, gen, demo, "
                 "codec encode|decode|eval, fusion eval\n";
    return 2;
  }
  kvpool::cli::CliOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.deadline = absl::Seconds(absl::GetFlag(FLAGS_deadline));
  o.model = absl::GetFlag(FLAGS_model);
  o.tokens_per_block = absl::GetFlag(FLAGS_tokens_per_block);
  o.token_ids = absl::GetFlag(FLAGS_token_ids);
  o.in = absl::GetFlag(FLAGS_in);
  o.out = absl::GetFlag(FLAGS_out);
  o.codec = absl::GetFlag(FLAGS_codec);
  o.bits = absl::GetFlag(FLAGS_bits);
  o.group = absl::GetFlag(FLAGS_group);
  o.budget = absl::GetFlag(FLAGS_budget);
  o.server_decode = absl::GetFlag(FLAGS_server_decode);
  o.budgets = absl::GetFlag(FLAGS_budgets);
  o.plan_reuse = absl::GetFlag(FLAGS_plan_reuse);
  o.profile = absl::GetFlag(FLAGS_fast) ? "fast" : absl::GetFlag(FLAGS_profile);
  o.extra_key = absl::GetFlag(FLAGS_extra_key);
  o.json = absl::GetFlag(FLAGS_json);
  o.layers = absl::GetFlag(FLAGS_layers);
  o.kv_heads = absl::GetFlag(FLAGS_kv_heads);
  o.head_dim = absl::GetFlag(FLAGS_head_dim);
  o.tokens = absl::GetFlag(FLAGS_tokens);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.vocab = absl::GetFlag(FLAGS_vocab);
  o.key_rank = absl::GetFlag(FLAGS_key_rank);
  o.value_rank = absl::GetFlag(FLAGS_value_rank);
  o.noise = absl::GetFlag(FLAGS_noise);
  o.outlier_channels = absl::GetFlag(FLAGS_outlier_channels);
  o.requests = absl::GetFlag(FLAGS_requests);
  o.shared_blocks = absl::GetFlag(FLAGS_shared_blocks);
  o.unique_blocks = absl::GetFlag(FLAGS_unique_blocks);
  o.blocks = absl::GetFlag(FLAGS_blocks);
  o.families = absl::GetFlag(FLAGS_families);
  o.variation = absl::GetFlag(FLAGS_variation);
  o.fusion_modes = absl::GetFlag(FLAGS_fusion);
  o.fusion_threshold = absl::GetFlag(FLAGS_fusion_threshold);
  o.fusion_budget = absl::GetFlag(FLAGS_fusion_budget);
  o.skip_layers = absl::GetFlag(FLAGS_skip_layers);
  o.batch_blocks = absl::GetFlag(FLAGS_batch_blocks);
  if (absl::Status s = commands.at(command)(o); !s.ok()) {
    std::cerr << "kvpool " << command << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}
