// Fuser: turns the blocks of a put into manifests, encoding each segment with the codec or, where
// fusion finds a close enough representative, referencing that representative with a scale
// (joint encoding; the seed paper: Joint Encoding of KV-Cache Blocks).
//
// Modes, per model spec (FusionOptions):
//  - off: every segment is encoded; identical segments still share storage (content addressing
//    in BlockStore).
//  - online: per block and layer (skipped layers aside), the key segment's sketch asks the
//    store's fusion index for candidate representatives (same namespace and layer); the
//    exact check (kernels::FitScaled) against each candidate's decoded values accepts the first
//    whose cosine is at least `threshold` and whose read-back error is within `budget`. The value
//    segment then tries the representative's value partner (values follow their keys) and keeps
//    it if its own error is within the budget. A key segment that finds no representative is
//    encoded and offered to the index as a new representative, with its value as partner.
//  - batch: the blocks of one put are grouped per layer by the cosine of their key samples with
//    the paper's recursive merge (kernels::GroupByCosine); each group of two or more gets a
//    representative (the normalised mean, kernels::Representative) encoded with the codec, and
//    each member joins only if its own check passes (cosine >= threshold, error <= budget);
//    values follow the key grouping with their own check. A group with fewer than two accepted
//    members stores its members on their own.
//
// The error check runs on the representative as readers decode it (after the codec) and on the
// values they get (to_dtype(scale * r)), so a fused segment read back is within `budget` of what
// was put, relative L2. Segments that are not fused carry the codec's own error.
//
// Thread-safe (stateless functions; the store synchronises itself).
#ifndef KVPOOL_SERVER_STORE_FUSER_H_
#define KVPOOL_SERVER_STORE_FUSER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"
#include "kernels/codec.h"
#include "server/model_policy.h"
#include "server/store/block_store.h"

namespace kvpool::server {

struct FusionOptions {
  enum class Mode : uint8_t { kOff = 0, kOnline = 1, kBatch = 2 };
  Mode mode = Mode::kOff;
  double threshold = 0.95;  // Minimum cosine between a member and its representative.
  double budget = 0.05;     // Maximum relative L2 error of a fused segment as read back.
  // Layers never fused; negative numbers count from the end (-1 is the last layer). The seed
  // paper leaves the first two and the last two alone.
  std::vector<int32_t> skip_layers = {0, 1, -2, -1};
  uint32_t max_candidates = 2;  // Exact checks per key segment (online).

  bool Skips(uint32_t layer, uint32_t num_layers) const;
};

// "off" | "online" | "batch"; InvalidArgument otherwise.
absl::StatusOr<FusionOptions::Mode> ParseFusionMode(absl::string_view name);
absl::string_view FusionModeName(FusionOptions::Mode mode);
// InvalidArgument naming the field: threshold in [-1, 1], budget in (0, 1), max_candidates <= 64.
absl::Status ValidateFusionOptions(const FusionOptions& options);

// Which fusion options a model's puts get.
using FusionPolicy = PerModel<FusionOptions>;

// What a caller needs to encode one put's blocks.
struct EncodeContext {
  KvSpec spec;
  CodecParams codec;            // Normalised (kernels::NormalizeParams).
  FusionOptions fusion;
  kernels::Path path = kernels::Path::kCpu;  // Host path for encode, decode and checks.
  // Sketches, exact checks and encodes on the GPU (kernels' CUDA path) when DeviceFusionUsable();
  // a device error falls back to the host path for that step, never to a wrong result.
  bool device = false;
  // With `device`: encode on the GPU also where `gpu_encode: auto` would not
  // (kernels::CudaEncoderKeepsProfile false: kvpool's default and entropy profiles).
  bool device_any_profile = false;
  // The model's plan caches for host encodes of its blocks' segments; null: every segment is
  // planned afresh.
  std::shared_ptr<kernels::BlockPlans> plans = nullptr;
};

// Whether EncodeBlock encodes `c`'s segments with the CUDA kernels when a GPU is present: `device`
// and a codec with a CUDA encoder that keeps its profile, or any with `device_any_profile`.
bool DeviceEncodeWanted(const EncodeContext& c);
// The same decision given whether the codec has a CUDA encoder (this build's, above).
bool DeviceEncodeWanted(const EncodeContext& c, bool has_cuda_encoder);

// True when this process has a GPU whose codec and fusion kernels passed their self-checks
// (kernels::SelfCheckCudaFusion, run once; a failure is logged and keeps fusion on the CPU).
// Blocks on the first call (a few small device calls).
bool DeviceFusionUsable();

// Encodes one block (canonical layout, spec.BlockElements() elements) with fusion off or online.
// Online, `store` and `ns` give the fusion index to search (ns nullopt: the namespace has no
// blocks yet, nothing to search). InvalidArgument for a size mismatch or codec errors.
absl::StatusOr<std::shared_ptr<StoredBlock>> EncodeBlock(const EncodeContext& context,
                                                         const BlockStore* store,
                                                         std::optional<NamespaceId> ns,
                                                         absl::Span<const uint16_t> block);

// Encodes the blocks of one put with batch fusion (fusion.mode must be kBatch; other modes
// encode each block as EncodeBlock without an index).
absl::StatusOr<std::vector<std::shared_ptr<StoredBlock>>> EncodeBatch(
    const EncodeContext& context, absl::Span<const absl::Span<const uint16_t>> blocks);

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_STORE_FUSER_H_
