// `kvpool fusion eval`: a corpus of blocks that share content to a chosen degree
// (client::SyntheticCorpus), ingested in-process through the codec alone and through codec +
// fusion (server/store/fusion_eval.h), with the compression ratio, fusion ratio and the
// attention-output error distribution of every configuration.
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"
#include "client/synthetic.h"
#include "common/status_macros.h"
#include "server/store/fusion_eval.h"

namespace kvpool::cli {
namespace {

absl::StatusOr<std::vector<int32_t>> ParseLayers(const std::string& text) {
  std::vector<int32_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int32_t v;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--skip-layers: '", part, "' is not a layer"));
    }
    out.push_back(v);
  }
  return out;
}

// A one-line progress bar on stderr, only when it is a terminal.
void Progress(const std::string& label, uint64_t done, uint64_t total) {
  if (!isatty(2) || total == 0) return;
  const int width = 30, filled = static_cast<int>(width * done / total);
  std::cerr << absl::StrFormat("\r%-18s [%s%s] %d/%d", label, std::string(filled, '#'),
                               std::string(width - filled, ' '), done, total)
            << (done == total ? "\n" : "") << std::flush;
}

}  // namespace

absl::Status RunFusionEval(const CliOptions& o) {
  KvSpec spec;
  spec.model_id = "fusion-eval";
  spec.num_layers = o.layers;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim;
  spec.tokens_per_block = static_cast<uint32_t>(o.tokens);
  KVPOOL_ASSIGN_OR_RETURN(spec.dtype, ParseDType(o.dtype));
  KVPOOL_RETURN_IF_ERROR(ValidateSpec(spec));
  if (o.blocks == 0 || o.families == 0) {
    return absl::InvalidArgumentError("--blocks and --families must be positive");
  }
  if (!(o.variation >= 0)) return absl::InvalidArgumentError("--variation must be >= 0");
  CliOptions codec_flags = o;
  if (o.codec.empty() && o.budget == 0) codec_flags.budget = 0.02f;  // The daemon's default.
  KVPOOL_ASSIGN_OR_RETURN(CodecParams codec, CodecFromFlags(codec_flags));

  client::CorpusOptions corpus;
  corpus.shape = client::SyntheticShape(spec);
  corpus.blocks = o.blocks;
  corpus.families = o.families;
  corpus.variation = o.variation;
  corpus.seed = o.seed;
  const std::vector<std::string> blocks = client::SyntheticCorpus(corpus);

  server::FusionOptions fusion;
  fusion.threshold = o.fusion_threshold;
  fusion.budget = o.fusion_budget;
  KVPOOL_ASSIGN_OR_RETURN(fusion.skip_layers, ParseLayers(o.skip_layers));
  KVPOOL_RETURN_IF_ERROR(server::ValidateFusionOptions(fusion));
  std::vector<server::FusionOptions::Mode> modes = {server::FusionOptions::Mode::kOff};
  for (absl::string_view m : absl::StrSplit(o.fusion_modes, ',', absl::SkipEmpty())) {
    KVPOOL_ASSIGN_OR_RETURN(auto mode, server::ParseFusionMode(m));
    if (mode != server::FusionOptions::Mode::kOff) modes.push_back(mode);
  }
  uint32_t fusable = 0;
  for (uint32_t l = 0; l < spec.num_layers; ++l) fusable += fusion.Skips(l, spec.num_layers) ? 0 : 1;
  if (fusable == 0) {
    std::cerr << "kvpool fusion eval: every layer is skipped (--skip-layers); nothing can fuse\n";
  }

  if (!o.json) {
    std::cout << absl::StrFormat(
        "corpus: %d blocks [%d][2][%d][%d][%d] %s, %d families, variation %.3g, seed %d "
        "(synthetic; see client/synthetic.h)\ncodec %s budget %.3g; fusion threshold %.3g, "
        "budget %.3g, %d of %d layers fusable\n",
        o.blocks, spec.num_layers, spec.tokens_per_block, spec.num_kv_heads, spec.head_dim,
        o.dtype, o.families, o.variation, o.seed, CodecName(codec.codec), codec.budget,
        fusion.threshold, fusion.budget, fusable, spec.num_layers);
    std::cout << absl::StrFormat("%-14s %8s %8s %7s %10s %10s %10s %10s %9s\n", "config",
                                 "ratio", "fusion", "fused", "attn_mean", "attn_p99", "attn_max",
                                 "rel_l2_max", "ingest");
  }
  std::string json_rows;
  double alone_ratio = 0;
  for (auto mode : modes) {
    server::EncodeContext c{spec, codec, fusion, kernels::Path::kCpu};
    c.fusion.mode = mode;
    const std::string label = mode == server::FusionOptions::Mode::kOff
                                  ? "codec alone"
                                  : absl::StrCat("codec+", server::FusionModeName(mode));
    server::FusionEvalOptions eo;
    // Online fusion searches what earlier puts committed: each block is its own put (requests
    // arriving one after another). Batch fusion groups within a put of --batch-blocks blocks.
    eo.batch_blocks = mode == server::FusionOptions::Mode::kBatch ? o.batch_blocks : 1;
    eo.progress = [&label](uint64_t done, uint64_t total) { Progress(label, done, total); };
    KVPOOL_ASSIGN_OR_RETURN(server::FusionEvalResult r, server::EvaluateFusion(c, blocks, eo));
    if (mode == server::FusionOptions::Mode::kOff) alone_ratio = r.compression_ratio();
    double attn_mean = 0;
    for (double e : r.attn_errors) attn_mean += e / r.attn_errors.size();
    const double p99 = server::Quantile(r.attn_errors, 0.99);
    const double amax = server::Quantile(r.attn_errors, 1.0);
    const double rmax = server::Quantile(r.rel_errors, 1.0);
    if (o.json) {
      absl::StrAppend(
          &json_rows, json_rows.empty() ? "" : ", ",
          absl::StrFormat(
              "{\"config\": \"%s\", \"compression_ratio\": %.4f, \"fusion_ratio\": %.4f, "
              "\"segments\": %d, \"segment_refs\": %d, \"fused_segments\": %d, "
              "\"attn_mean\": %.5f, \"attn_p99\": %.5f, \"attn_max\": %.5f, \"rel_l2_max\": "
              "%.5f, \"ingest_gbps\": %.4f, \"gain_over_codec\": %.4f}",
              label, r.compression_ratio(), r.fusion_ratio(), r.segments, r.segment_refs,
              r.fused_refs, attn_mean, p99, amax, rmax, r.ingest_gbps(),
              alone_ratio > 0 ? r.compression_ratio() / alone_ratio : 0));
    } else {
      std::cout << absl::StrFormat("%-14s %7.2fx %7.2fx %7d %10.4f %10.4f %10.4f %10.4f %6.3f GB/s\n",
                                   label, r.compression_ratio(), r.fusion_ratio(), r.fused_refs,
                                   attn_mean, p99, amax, rmax, r.ingest_gbps());
    }
  }
  if (o.json) {
    std::cout << absl::StrFormat(
        "{\"blocks\": %d, \"families\": %d, \"variation\": %.4f, \"seed\": %d, \"codec\": \"%s\", "
        "\"codec_budget\": %.4f, \"fusion_threshold\": %.4f, \"fusion_budget\": %.4f, "
        "\"results\": [%s]}\n",
        o.blocks, o.families, o.variation, o.seed, CodecName(codec.codec), codec.budget,
        fusion.threshold, fusion.budget, json_rows);
  }
  return absl::OkStatus();
}

}  // namespace kvpool::cli
