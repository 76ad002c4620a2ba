#include "server/store/fuser.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/status_util.h"
#include "kernels/fusion.h"

namespace kvpool::server {
namespace {

using kernels::Fit;

SegmentShape ShapeOf(const KvSpec& spec, SegmentKind kind) {
  return SegmentShape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim, spec.dtype, kind};
}

uint64_t SegmentElements(const KvSpec& spec) {
  return uint64_t{spec.tokens_per_block} * spec.num_kv_heads * spec.head_dim;
}

// Segment s of a block: layer s / 2, K when s is even.
absl::Span<const uint16_t> SegmentOf(const KvSpec& spec, absl::Span<const uint16_t> block,
                                     uint64_t s) {
  const uint64_t n = SegmentElements(spec);
  return block.subspan(s * n, n);
}

absl::StatusOr<SegmentPtr> Encode(const EncodeContext& c, SegmentKind kind,
                                  absl::Span<const uint16_t> x) {
  KVPOOL_ASSIGN_OR_RETURN(std::string bytes,
                          kernels::EncodeSegment(c.codec, ShapeOf(c.spec, kind), x, c.path));
  return Segment::Make(std::move(bytes), x.size() * 2);
}

// The values a reader decodes from `segment` (before any scale).
absl::StatusOr<std::vector<uint16_t>> Decode(const EncodeContext& c, const Segment& segment,
                                             SegmentKind kind) {
  std::vector<uint16_t> out(SegmentElements(c.spec));
  const SegmentShape shape = ShapeOf(c.spec, kind);
  KVPOOL_RETURN_IF_ERROR(kernels::DecodeSegment(segment.bytes, absl::MakeSpan(out), c.path, &shape));
  return out;
}

bool Accepts(const FusionOptions& f, const Fit& fit, bool check_cosine) {
  return (!check_cosine || fit.cosine >= f.threshold) && fit.rel_error <= f.budget;
}

}  // namespace

bool FusionOptions::Skips(uint32_t layer, uint32_t num_layers) const {
  for (int32_t s : skip_layers) {
    const int64_t l = s < 0 ? int64_t{num_layers} + s : s;
    if (l == layer) return true;
  }
  return false;
}

absl::StatusOr<FusionOptions::Mode> ParseFusionMode(absl::string_view name) {
  if (name == "off") return FusionOptions::Mode::kOff;
  if (name == "online") return FusionOptions::Mode::kOnline;
  if (name == "batch") return FusionOptions::Mode::kBatch;
  return absl::InvalidArgumentError(
      absl::StrCat("fusion mode '", name, "' is not one of off, online, batch"));
}

absl::string_view FusionModeName(FusionOptions::Mode mode) {
  switch (mode) {
    case FusionOptions::Mode::kOff: return "off";
    case FusionOptions::Mode::kOnline: return "online";
    case FusionOptions::Mode::kBatch: return "batch";
  }
  return "off";
}

absl::Status ValidateFusionOptions(const FusionOptions& o) {
  if (!(o.threshold >= -1 && o.threshold <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fusion threshold ", o.threshold, " is outside [-1, 1]"));
  }
  if (!(o.budget > 0 && o.budget < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fusion budget ", o.budget, " is outside (0, 1)"));
  }
  if (o.max_candidates > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("fusion max_candidates ", o.max_candidates, " exceeds 64"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<StoredBlock>> EncodeBlock(const EncodeContext& c,
                                                         const BlockStore* store,
                                                         std::optional<NamespaceId> ns,
                                                         absl::Span<const uint16_t> block) {
  const KvSpec& spec = c.spec;
  if (block.size() * 2 != spec.BlockBytes()) {
    return absl::InvalidArgumentError("EncodeBlock: block size does not match the spec");
  }
  const bool online = c.fusion.mode == FusionOptions::Mode::kOnline && store != nullptr;
  const int radius = kernels::SketchRadius(c.fusion.threshold);
  std::vector<SegmentRef> refs(spec.SegmentsPerBlock());
  std::vector<StoredBlock::NewRepresentative> reps;
  for (uint32_t layer = 0; layer < spec.num_layers; ++layer) {
    const uint64_t k = uint64_t{2} * layer;
    absl::Span<const uint16_t> key = SegmentOf(spec, block, k);
    absl::Span<const uint16_t> value = SegmentOf(spec, block, k + 1);
    bool fused = false;
    kernels::Sketch sketch;
    if (online && !c.fusion.Skips(layer, spec.num_layers)) {
      sketch = kernels::SketchSegment(spec.dtype, key, c.path);
      std::vector<BlockStore::Candidate> candidates;
      if (ns.has_value()) {
        candidates = store->FusionCandidates(*ns, layer, sketch, radius, c.fusion.max_candidates);
      }
      for (const BlockStore::Candidate& cand : candidates) {
        auto rep = Decode(c, *cand.key, SegmentKind::kKey);
        if (!rep.ok()) continue;  // A corrupt representative is never used.
        const Fit fit = kernels::FitScaled(spec.dtype, key, *rep, c.path);
        if (!Accepts(c.fusion, fit, /*check_cosine=*/true)) continue;
        refs[k] = SegmentRef{cand.key, fit.scale, true};
        fused = true;
        if (cand.value != nullptr) {
          auto rep_value = Decode(c, *cand.value, SegmentKind::kValue);
          if (rep_value.ok()) {
            const Fit vfit = kernels::FitScaled(spec.dtype, value, *rep_value, c.path);
            if (Accepts(c.fusion, vfit, /*check_cosine=*/false)) {
              refs[k + 1] = SegmentRef{cand.value, vfit.scale, true};
            }
          }
        }
        break;
      }
      if (!fused) reps.push_back({layer, sketch});
    }
    if (!fused) {
      KVPOOL_ASSIGN_OR_RETURN(refs[k].segment, Encode(c, SegmentKind::kKey, key));
    }
    if (refs[k + 1].segment == nullptr) {
      KVPOOL_ASSIGN_OR_RETURN(refs[k + 1].segment, Encode(c, SegmentKind::kValue, value));
    }
  }
  auto out = std::make_shared<StoredBlock>(std::move(refs), spec.BlockBytes());
  out->new_representatives() = std::move(reps);
  return out;
}

namespace {

// Batch fusion of one layer's segments of one kind over `members` (block indices): encodes
// the group's representative and sets refs for the members that pass their check. Returns the
// members that joined.
absl::StatusOr<std::vector<uint32_t>> FuseGroup(
    const EncodeContext& c, absl::Span<const absl::Span<const uint16_t>> blocks, uint64_t s,
    const std::vector<uint32_t>& members, bool check_cosine,
    std::vector<std::vector<SegmentRef>>* refs) {
  const KvSpec& spec = c.spec;
  const SegmentKind kind = s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue;
  std::vector<absl::Span<const uint16_t>> xs;
  for (uint32_t m : members) xs.push_back(SegmentOf(spec, blocks[m], s));
  std::vector<uint16_t> rep(SegmentElements(spec));
  kernels::Representative(spec.dtype, xs, absl::MakeSpan(rep));
  KVPOOL_ASSIGN_OR_RETURN(SegmentPtr encoded, Encode(c, kind, rep));
  KVPOOL_ASSIGN_OR_RETURN(std::vector<uint16_t> decoded, Decode(c, *encoded, kind));
  std::vector<uint32_t> joined;
  std::vector<float> scales;
  for (size_t i = 0; i < members.size(); ++i) {
    const Fit fit = kernels::FitScaled(spec.dtype, xs[i], decoded, c.path);
    if (!Accepts(c.fusion, fit, check_cosine)) continue;
    joined.push_back(members[i]);
    scales.push_back(fit.scale);
  }
  if (joined.size() < 2) return std::vector<uint32_t>{};  // Not worth a representative.
  for (size_t i = 0; i < joined.size(); ++i) {
    (*refs)[joined[i]][s] = SegmentRef{encoded, scales[i], true};
  }
  return joined;
}

}  // namespace

absl::StatusOr<std::vector<std::shared_ptr<StoredBlock>>> EncodeBatch(
    const EncodeContext& c, absl::Span<const absl::Span<const uint16_t>> blocks) {
  const KvSpec& spec = c.spec;
  std::vector<std::shared_ptr<StoredBlock>> out;
  if (c.fusion.mode != FusionOptions::Mode::kBatch) {
    for (absl::Span<const uint16_t> b : blocks) {
      KVPOOL_ASSIGN_OR_RETURN(auto block, EncodeBlock(c, nullptr, std::nullopt, b));
      out.push_back(std::move(block));
    }
    return out;
  }
  for (absl::Span<const uint16_t> b : blocks) {
    if (b.size() * 2 != spec.BlockBytes()) {
      return absl::InvalidArgumentError("EncodeBatch: block size does not match the spec");
    }
  }
  std::vector<std::vector<SegmentRef>> refs(blocks.size(),
                                            std::vector<SegmentRef>(spec.SegmentsPerBlock()));
  for (uint32_t layer = 0; layer < spec.num_layers && blocks.size() > 1; ++layer) {
    if (c.fusion.Skips(layer, spec.num_layers)) continue;
    const uint64_t k = uint64_t{2} * layer;
    std::vector<std::vector<float>> samples;
    for (absl::Span<const uint16_t> b : blocks) {
      samples.push_back(kernels::SampleSegment(spec.dtype, SegmentOf(spec, b, k)));
    }
    for (const std::vector<uint32_t>& group : kernels::GroupByCosine(samples, c.fusion.threshold)) {
      if (group.size() < 2) continue;
      KVPOOL_ASSIGN_OR_RETURN(std::vector<uint32_t> joined,
                              FuseGroup(c, blocks, k, group, /*check_cosine=*/true, &refs));
      if (joined.size() >= 2) {
        KVPOOL_RETURN_IF_ERROR(
            FuseGroup(c, blocks, k + 1, joined, /*check_cosine=*/false, &refs).status());
      }
    }
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    for (uint64_t s = 0; s < spec.SegmentsPerBlock(); ++s) {
      if (refs[i][s].segment != nullptr) continue;
      KVPOOL_ASSIGN_OR_RETURN(
          refs[i][s].segment,
          Encode(c, s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue, SegmentOf(spec, blocks[i], s)));
    }
    out.push_back(std::make_shared<StoredBlock>(std::move(refs[i]), spec.BlockBytes()));
  }
  return out;
}

}  // namespace kvpool::server
