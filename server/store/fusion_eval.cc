#include "server/store/fusion_eval.h"

#include <algorithm>
#include <cmath>

#include "absl/time/clock.h"
#include "common/block_key.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "kernels/fusion.h"
#include "kernels/quality.h"
#include "server/store/block_store.h"

namespace kvpool::server {
namespace {

absl::Span<const uint16_t> Elements(const std::string& block) {
  return {reinterpret_cast<const uint16_t*>(block.data()), block.size() / 2};
}

}  // namespace

double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t rank = static_cast<size_t>(std::ceil(q * values.size()));
  return values[std::min(values.size() - 1, rank > 0 ? rank - 1 : 0)];
}

absl::StatusOr<FusionEvalResult> EvaluateFusion(const EncodeContext& c,
                                                const std::vector<std::string>& blocks,
                                                const FusionEvalOptions& options) {
  const KvSpec& spec = c.spec;
  for (const std::string& b : blocks) {
    if (b.size() != spec.BlockBytes()) {
      return absl::InvalidArgumentError("EvaluateFusion: a block does not match the spec");
    }
  }
  KVPOOL_ASSIGN_OR_RETURN(auto store, BlockStore::Create({uint64_t{1} << 40}));
  KVPOOL_ASSIGN_OR_RETURN(NamespaceId ns, store->RegisterNamespace(spec));
  std::vector<BlockKey> keys;
  for (uint32_t i = 0; i < blocks.size(); ++i) {
    keys.push_back(ChainBlockKey(RootBlockKey(), absl::MakeConstSpan(&i, 1)));
  }
  FusionEvalResult r;
  const uint32_t batch = std::max<uint32_t>(1, options.batch_blocks);
  const absl::Time start = absl::Now();
  for (size_t first = 0; first < blocks.size(); first += batch) {
    const size_t n = std::min<size_t>(batch, blocks.size() - first);
    std::vector<std::shared_ptr<StoredBlock>> encoded;
    if (c.fusion.mode == FusionOptions::Mode::kBatch) {
      std::vector<absl::Span<const uint16_t>> views;
      for (size_t i = first; i < first + n; ++i) views.push_back(Elements(blocks[i]));
      KVPOOL_ASSIGN_OR_RETURN(encoded, EncodeBatch(c, views));
    } else {
      for (size_t i = first; i < first + n; ++i) {
        KVPOOL_ASSIGN_OR_RETURN(auto block, EncodeBlock(c, store.get(), ns, Elements(blocks[i])));
        encoded.push_back(std::move(block));
      }
    }
    KVPOOL_RETURN_IF_ERROR(
        store->Insert(ns, absl::MakeConstSpan(keys).subspan(first, n), std::move(encoded))
            .status());
    if (options.progress) options.progress(first + n, blocks.size());
  }
  r.ingest_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const BlockStore::Stats s = store->GetStats();
  r.blocks = s.blocks;
  r.logical_bytes = s.logical_bytes;
  r.stored_bytes = s.stored_bytes;
  r.segments = s.segments;
  r.segment_refs = s.segment_refs;
  r.fused_refs = s.fused_refs;
  if (!options.measure_quality) return r;

  const uint64_t n = uint64_t{spec.tokens_per_block} * spec.num_kv_heads * spec.head_dim;
  std::vector<uint16_t> read(spec.BlockBytes() / 2);
  for (size_t b = 0; b < blocks.size(); ++b) {
    StoredBlockPtr got = store->Get(ns, {&keys[b], 1})[0];
    if (got == nullptr) return absl::InternalError("EvaluateFusion: a block went missing");
    for (size_t seg = 0; seg < got->num_segments(); ++seg) {
      const SegmentShape shape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim,
                               spec.dtype, seg % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue};
      absl::Span<uint16_t> out(read.data() + seg * n, n);
      KVPOOL_RETURN_IF_ERROR(kernels::DecodeSegment(got->segment(seg), out, c.path, &shape));
      kernels::ScaleElements(spec.dtype, out, got->scale(seg), c.path);
    }
    const std::vector<float> original = ElementsToFloats(spec.dtype, Elements(blocks[b]));
    const std::vector<float> decoded = ElementsToFloats(spec.dtype, read);
    const kernels::Quality q =
        kernels::MeasureQuality(original, decoded, spec.num_layers, spec.tokens_per_block,
                                spec.num_kv_heads, spec.head_dim, kernels::QualityOptions{});
    r.attn_errors.push_back(q.attn_rel_l2);
    r.rel_errors.push_back(q.rel_l2);
    if (options.progress) options.progress(b + 1, blocks.size());
  }
  return r;
}

}  // namespace kvpool::server
