#include "bench/fusion_bench.h"

#include <algorithm>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/synthetic.h"
#include "common/status_macros.h"
#include "kernels/codec.h"
#include "server/store/fuser.h"
#include "server/store/fusion_eval.h"

namespace kvpool::bench {
namespace {

using server::FusionOptions;

double MemcpyGbps(const std::vector<std::string>& blocks) {
  std::string dst(blocks.empty() ? 0 : blocks[0].size(), '\0');
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    const absl::Time start = absl::Now();
    uint64_t bytes = 0;
    for (const std::string& b : blocks) {
      std::memcpy(dst.data(), b.data(), b.size());
      bytes += b.size();
    }
    const double s = absl::ToDoubleSeconds(absl::Now() - start);
    if (s > 0) best = std::max(best, bytes / s / 1e9);
  }
  return best;
}

}  // namespace

absl::Status RunFusionBench(const FusionBenchOptions& o) {
  KvSpec spec;
  spec.model_id = "fusion-bench";
  spec.num_layers = o.layers;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim;
  spec.tokens_per_block = o.tokens;
  spec.dtype = DType::kFp16;
  KVPOOL_RETURN_IF_ERROR(ValidateSpec(spec));
  CodecParams kvpool_codec{CodecId::kKvpool};
  kvpool_codec.budget = 0.02f;  // The daemon's default.
  struct Corpus {
    const char* name;
    uint32_t families;
  };
  const Corpus corpora[] = {{"shared", std::max(1u, o.blocks / 8)}, {"unrelated", o.blocks}};
  std::string json;
  if (!o.json) {
    std::cout << absl::StrFormat(
        "fusion ingest: %d blocks of [%d][2][%d][%d][%d] fp16 per corpus, one thread, best of %d\n"
        "%-10s %-7s %-5s %-7s %10s %9s %9s\n",
        o.blocks, o.layers, o.tokens, o.kv_heads, o.head_dim, o.repeats, "corpus", "codec",
        "path", "fusion", "GB/s", "vs off", "ratio");
  }
  // The CPU, and the GPU (sketches, checks and encodes) when one is present and its fusion
  // kernels pass their self-check; each against fusion off on the same path.
  std::vector<bool> on_device = {false};
  if (server::DeviceFusionUsable()) on_device.push_back(true);
  for (const Corpus& corpus : corpora) {
    client::CorpusOptions co;
    co.shape = client::SyntheticShape(spec);
    co.blocks = o.blocks;
    co.families = corpus.families;
    co.variation = 0.02f;
    const std::vector<std::string> blocks = client::SyntheticCorpus(co);
    const double memcpy_gbps = MemcpyGbps(blocks);
    for (const CodecParams& codec : {kvpool_codec, CodecParams{CodecId::kRaw}}) {
      KVPOOL_ASSIGN_OR_RETURN(CodecParams normalized, kernels::NormalizeParams(codec));
      for (bool device : on_device) {
        double off_gbps = 0;
        for (auto mode : {FusionOptions::Mode::kOff, FusionOptions::Mode::kOnline,
                          FusionOptions::Mode::kBatch}) {
          server::EncodeContext c{spec, normalized, FusionOptions{}, kernels::Path::kCpu};
          c.fusion.mode = mode;
          c.device = device;
          c.device_any_profile = device;  // The cuda rows encode on the GPU (gpu_encode: always).
          server::FusionEvalOptions eo;
          eo.measure_quality = false;
          eo.batch_blocks = mode == FusionOptions::Mode::kBatch ? 16 : 1;
          double best = 0, ratio = 0;
          for (uint32_t r = 0; r < std::max(1u, o.repeats); ++r) {
            KVPOOL_ASSIGN_OR_RETURN(server::FusionEvalResult res,
                                    server::EvaluateFusion(c, blocks, eo));
            best = std::max(best, res.ingest_gbps());
            ratio = res.compression_ratio();
          }
          if (mode == FusionOptions::Mode::kOff) off_gbps = best;
          const double vs_off = off_gbps > 0 ? best / off_gbps : 0;
          const char* path = device ? "cuda" : "cpu";
          if (o.json) {
            absl::StrAppend(&json, json.empty() ? "" : ", ",
                            absl::StrFormat("{\"corpus\": \"%s\", \"codec\": \"%s\", \"path\": "
                                            "\"%s\", \"fusion\": \"%s\", \"ingest_gbps\": %.4f, "
                                            "\"vs_off\": %.4f, \"compression_ratio\": %.4f, "
                                            "\"memcpy_gbps\": %.3f}",
                                            corpus.name, CodecName(codec.codec), path,
                                            server::FusionModeName(mode), best, vs_off, ratio,
                                            memcpy_gbps));
          } else {
            std::cout << absl::StrFormat("%-10s %-7s %-5s %-7s %10.3f %8.2fx %8.2fx\n",
                                         corpus.name, CodecName(codec.codec), path,
                                         server::FusionModeName(mode), best, vs_off, ratio);
          }
        }
      }
    }
    if (!o.json) {
      std::cout << absl::StrFormat("%-10s memcpy of the corpus: %.2f GB/s (same run)\n",
                                   corpus.name, memcpy_gbps);
    }
  }
  if (o.json) std::cout << "{\"results\": [" << json << "]}\n";
  return absl::OkStatus();
}

}  // namespace kvpool::bench
