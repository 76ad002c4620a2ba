#include "server/store/fuser.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/status_util.h"
#include "kernels/device.h"
#include "kernels/device_codec.h"
#include "kernels/fusion.h"

namespace kvpool::server {
namespace {

using kernels::Fit;

SegmentShape ShapeOf(const KvSpec& spec, SegmentKind kind) {
  return SegmentShape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim, spec.dtype, kind};
}

// Segment s of a block is layer s / 2's key when s is even, its value when odd.
SegmentKind KindOf(uint64_t s) { return s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue; }

uint64_t SegmentElements(const KvSpec& spec) {
  return uint64_t{spec.tokens_per_block} * spec.num_kv_heads * spec.head_dim;
}

// Segment s of a block: layer s / 2, K when s is even.
absl::Span<const uint16_t> SegmentOf(const KvSpec& spec, absl::Span<const uint16_t> block,
                                     uint64_t s) {
  const uint64_t n = SegmentElements(spec);
  return block.subspan(s * n, n);
}

// `keys`: for a value segment, its layer's keys (the codec weights tokens by them), or empty;
// `encoded_keys`: their segment as this context encoded it (the codec takes their token classes
// from it), or empty.
// `plans`: the stream's PlanCache, or null.
absl::StatusOr<SegmentPtr> Encode(const EncodeContext& c, SegmentKind kind,
                                  absl::Span<const uint16_t> x,
                                  absl::Span<const uint16_t> keys = {},
                                  absl::string_view encoded_keys = {},
                                  kernels::PlanCache* plans = nullptr) {
  KVPOOL_ASSIGN_OR_RETURN(std::string bytes,
                          kernels::EncodeSegment(c.codec, ShapeOf(c.spec, kind), x, c.path, keys,
                                                 encoded_keys, plans));
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

namespace {

// The layers of one block that online fusion looks at, with their index candidates.
struct LayerPlan {
  uint32_t layer = 0;
  kernels::Sketch sketch;
  std::vector<BlockStore::Candidate> candidates;
};

// The sketches of `keys`: on the GPU when the context asks for it and it works, else the host.
std::vector<kernels::Sketch> Sketches(const EncodeContext& c,
                                      absl::Span<const absl::Span<const uint16_t>> keys) {
  if (c.device && DeviceFusionUsable()) {
    auto sketches = kernels::SketchSegmentsOnDevice(c.spec.dtype, keys);
    if (sketches.ok()) return *std::move(sketches);
    KVPOOL_LOG(WARNING) << "fusion sketch on the GPU failed, using the CPU: " << sketches.status();
  }
  return kernels::SketchSegments(c.spec.dtype, keys, c.path);
}

// The exact checks of a block's candidates. On the GPU every candidate's key and value partner
// are checked in one call up front; on the host each check runs when first asked for, so the
// search stops at the first accepted candidate. nullopt: the representative cannot be used
// (it is corrupt).
class Checks {
 public:
  Checks(const EncodeContext& c, absl::Span<const uint16_t> block,
         const std::vector<LayerPlan>& plans)
      : c_(c), block_(block), plans_(plans) {
    if (c.device && DeviceFusionUsable()) RunOnDevice();
  }

  std::optional<Fit> Get(size_t plan, size_t cand, SegmentKind kind) {
    const LayerPlan& p = plans_[plan];
    const bool key = kind == SegmentKind::kKey;
    if (device_ok_) {
      const auto& fits = device_[plan][cand];
      return key ? fits.first : fits.second;
    }
    const SegmentPtr& rep = key ? p.candidates[cand].key : p.candidates[cand].value;
    if (rep == nullptr) return std::nullopt;
    auto decoded = Decode(c_, *rep, kind);
    if (!decoded.ok()) return std::nullopt;
    const uint64_t s = uint64_t{2} * p.layer + (key ? 0 : 1);
    return kernels::FitWithin(c_.spec.dtype, SegmentOf(c_.spec, block_, s), *decoded,
                              c_.fusion.budget, c_.path);
  }

 private:
  void RunOnDevice() {
    std::vector<kernels::FitRequest> requests;
    for (const LayerPlan& p : plans_) {
      for (const BlockStore::Candidate& cand : p.candidates) {
        requests.push_back({SegmentOf(c_.spec, block_, 2 * uint64_t{p.layer}), cand.key->bytes,
                            ShapeOf(c_.spec, SegmentKind::kKey)});
        if (cand.value != nullptr) {
          requests.push_back({SegmentOf(c_.spec, block_, 2 * uint64_t{p.layer} + 1),
                              cand.value->bytes, ShapeOf(c_.spec, SegmentKind::kValue)});
        }
      }
    }
    if (requests.empty()) return;
    auto fits = kernels::FitEncodedOnDevice(requests);
    if (!fits.ok()) {
      // A corrupt representative fails the whole call: the host path skips just that one.
      KVPOOL_LOG(WARNING) << "fusion checks on the GPU failed, using the CPU: " << fits.status();
      return;
    }
    size_t next = 0;
    device_.resize(plans_.size());
    for (size_t i = 0; i < plans_.size(); ++i) {
      for (const BlockStore::Candidate& cand : plans_[i].candidates) {
        std::pair<std::optional<Fit>, std::optional<Fit>> f;
        f.first = (*fits)[next++];
        if (cand.value != nullptr) f.second = (*fits)[next++];
        device_[i].push_back(f);
      }
    }
    device_ok_ = true;
  }

  const EncodeContext& c_;
  const absl::Span<const uint16_t> block_;
  const std::vector<LayerPlan>& plans_;
  bool device_ok_ = false;
  std::vector<std::vector<std::pair<std::optional<Fit>, std::optional<Fit>>>> device_;
};

// Encodes the segments of `block` whose refs are still empty: on the GPU when the context asks
// for it and the codec has a CUDA encoder (falling back to the host on a device error).
absl::Status EncodeRemaining(const EncodeContext& c, absl::Span<const uint16_t> block,
                             std::vector<SegmentRef>* refs) {
  std::vector<uint64_t> todo;
  for (uint64_t s = 0; s < refs->size(); ++s) {
    if ((*refs)[s].segment == nullptr) todo.push_back(s);
  }
  if (!todo.empty() && DeviceEncodeWanted(c) && kernels::DeviceCount() > 0) {
    std::vector<SegmentShape> shapes;
    std::vector<uint16_t> gathered;  // The segments to encode, back to back, unless all are.
    for (uint64_t s : todo) {
      shapes.push_back(ShapeOf(c.spec, KindOf(s)));
      if (todo.size() == refs->size()) continue;
      absl::Span<const uint16_t> x = SegmentOf(c.spec, block, s);
      gathered.insert(gathered.end(), x.begin(), x.end());
    }
    auto encoded = kernels::EncodeSegmentsOnDevice(
        c.codec, shapes, todo.size() == refs->size() ? block : absl::MakeConstSpan(gathered));
    if (encoded.ok()) {
      for (size_t i = 0; i < todo.size(); ++i) {
        (*refs)[todo[i]].segment =
            Segment::Make(std::move((*encoded)[i]), SegmentElements(c.spec) * 2);
      }
      return absl::OkStatus();
    }
    KVPOOL_LOG(WARNING) << "encoding on the GPU failed, using the CPU: " << encoded.status();
  }
  for (size_t i = 0; i < todo.size(); ++i) {
    const uint64_t s = todo[i];
    const bool value = KindOf(s) == SegmentKind::kValue;
    const absl::Span<const uint16_t> keys =
        value ? SegmentOf(c.spec, block, s - 1) : absl::Span<const uint16_t>();
    // The keys' segment when this loop encoded it (not one a fused key refers to).
    const absl::string_view encoded_keys = value && i > 0 && todo[i - 1] == s - 1
                                               ? (*refs)[s - 1].segment->bytes
                                               : absl::string_view();
    KVPOOL_ASSIGN_OR_RETURN((*refs)[s].segment,
                            Encode(c, KindOf(s), SegmentOf(c.spec, block, s), keys, encoded_keys,
                                   c.plans ? c.plans->For(s) : nullptr));
  }
  return absl::OkStatus();
}

}  // namespace

bool DeviceEncodeWanted(const EncodeContext& c, bool has_cuda_encoder) {
  if (!c.device || !has_cuda_encoder) return false;
  if (!c.device_any_profile && !kernels::CudaEncoderKeepsProfile(c.codec)) return false;
  // kvpool's default profile on the GPU (payload mode 4) only where its own check passed.
  return !IsKvpoolRowsMode(c.codec) || kernels::SelfCheckCudaRowsEncoder().ok();
}

bool DeviceEncodeWanted(const EncodeContext& c) {
  return DeviceEncodeWanted(c, kernels::GetCodecOps(c.codec.codec).encode_cuda != nullptr);
}

bool DeviceFusionUsable() {
  static const bool usable = [] {
    const absl::Status check = kernels::SelfCheckCudaFusion();
    if (!check.ok() && !absl::IsUnavailable(check)) {
      KVPOOL_LOG(ERROR) << "fusion on the GPU failed its self-check, fusion runs on the CPU: "
                        << check;
    }
    return check.ok();
  }();
  return usable;
}

absl::StatusOr<std::shared_ptr<StoredBlock>> EncodeBlock(const EncodeContext& c,
                                                         const BlockStore* store,
                                                         std::optional<NamespaceId> ns,
                                                         absl::Span<const uint16_t> block) {
  const KvSpec& spec = c.spec;
  if (block.size() * 2 != spec.BlockBytes()) {
    return absl::InvalidArgumentError("EncodeBlock: block size does not match the spec");
  }
  std::vector<SegmentRef> refs(spec.SegmentsPerBlock());
  std::vector<StoredBlock::NewRepresentative> reps;
  if (c.fusion.mode == FusionOptions::Mode::kOnline && store != nullptr) {
    // Sketch every fused layer's key, ask the index, check the candidates.
    std::vector<LayerPlan> plans;
    std::vector<absl::Span<const uint16_t>> keys;
    for (uint32_t layer = 0; layer < spec.num_layers; ++layer) {
      if (c.fusion.Skips(layer, spec.num_layers)) continue;
      plans.push_back({layer, {}, {}});
      keys.push_back(SegmentOf(spec, block, 2 * uint64_t{layer}));
    }
    const std::vector<kernels::Sketch> sketches = Sketches(c, keys);
    const int radius = kernels::SketchRadius(c.fusion.threshold);
    for (size_t i = 0; i < plans.size(); ++i) {
      plans[i].sketch = sketches[i];
      if (ns.has_value()) {
        plans[i].candidates = store->FusionCandidates(*ns, plans[i].layer, sketches[i], radius,
                                                      c.fusion.max_candidates);
      }
    }
    Checks checks(c, block, plans);
    for (size_t i = 0; i < plans.size(); ++i) {
      const uint64_t k = 2 * uint64_t{plans[i].layer};
      bool fused = false;
      for (size_t j = 0; j < plans[i].candidates.size() && !fused; ++j) {
        const std::optional<Fit> fit = checks.Get(i, j, SegmentKind::kKey);
        if (!fit.has_value() || !Accepts(c.fusion, *fit, /*check_cosine=*/true)) continue;
        fused = true;
        refs[k] = SegmentRef{plans[i].candidates[j].key, fit->scale, true};
        // Values follow their keys, under their own error check.
        const std::optional<Fit> vfit = checks.Get(i, j, SegmentKind::kValue);
        if (vfit.has_value() && Accepts(c.fusion, *vfit, /*check_cosine=*/false)) {
          refs[k + 1] = SegmentRef{plans[i].candidates[j].value, vfit->scale, true};
        }
      }
      if (!fused) reps.push_back({plans[i].layer, plans[i].sketch});
    }
  }
  KVPOOL_RETURN_IF_ERROR(EncodeRemaining(c, block, &refs));
  auto out = std::make_shared<StoredBlock>(std::move(refs), spec.BlockBytes());
  out->new_representatives() = std::move(reps);
  return out;
}

namespace {

// The exact checks of `xs` against one encoded representative: on the GPU in one call when the
// context asks for it (falling back to the host on a device error), else on the host.
absl::StatusOr<std::vector<Fit>> FitMembers(const EncodeContext& c, SegmentKind kind,
                                            absl::Span<const absl::Span<const uint16_t>> xs,
                                            const Segment& representative) {
  if (c.device && DeviceFusionUsable()) {
    std::vector<kernels::FitRequest> requests;
    for (absl::Span<const uint16_t> x : xs) {
      requests.push_back({x, representative.bytes, ShapeOf(c.spec, kind)});
    }
    auto fits = kernels::FitEncodedOnDevice(requests);
    if (fits.ok()) return fits;
    KVPOOL_LOG(WARNING) << "fusion checks on the GPU failed, using the CPU: " << fits.status();
  }
  KVPOOL_ASSIGN_OR_RETURN(std::vector<uint16_t> decoded, Decode(c, representative, kind));
  std::vector<Fit> fits;
  for (absl::Span<const uint16_t> x : xs) {
    fits.push_back(kernels::FitWithin(c.spec.dtype, x, decoded, c.fusion.budget, c.path));
  }
  return fits;
}

// Batch fusion of one layer's segments of one kind over `members` (block indices): encodes
// the group's representative and sets refs for the members that pass their check. Returns the
// members that joined.
absl::StatusOr<std::vector<uint32_t>> FuseGroup(
    const EncodeContext& c, absl::Span<const absl::Span<const uint16_t>> blocks, uint64_t s,
    const std::vector<uint32_t>& members, bool check_cosine,
    std::vector<std::vector<SegmentRef>>* refs) {
  const KvSpec& spec = c.spec;
  const SegmentKind kind = KindOf(s);
  std::vector<absl::Span<const uint16_t>> xs;
  for (uint32_t m : members) xs.push_back(SegmentOf(spec, blocks[m], s));
  std::vector<uint16_t> rep(SegmentElements(spec));
  kernels::Representative(spec.dtype, xs, absl::MakeSpan(rep));
  KVPOOL_ASSIGN_OR_RETURN(SegmentPtr encoded, Encode(c, kind, rep));
  KVPOOL_ASSIGN_OR_RETURN(std::vector<Fit> fits, FitMembers(c, kind, xs, *encoded));
  std::vector<uint32_t> joined;
  std::vector<float> scales;
  for (size_t i = 0; i < members.size(); ++i) {
    const Fit& fit = fits[i];
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
    KVPOOL_RETURN_IF_ERROR(EncodeRemaining(c, blocks[i], &refs[i]));
    out.push_back(std::make_shared<StoredBlock>(std::move(refs[i]), spec.BlockBytes()));
  }
  return out;
}

}  // namespace kvpool::server
