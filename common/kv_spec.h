// KvSpec: the shape of one model's KV cache, and the sizes derived from it.
// A block is [num_layers][2 (K,V)][tokens_per_block][num_kv_heads][head_dim] elements of
// `dtype`, C order, little-endian; a segment is one layer's K or V of one block,
// [tokens_per_block][num_kv_heads][head_dim], and is contiguous inside the block.
// Value type; thread-compatible.
#ifndef KVPOOL_COMMON_KV_SPEC_H_
#define KVPOOL_COMMON_KV_SPEC_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvpool {

enum class DType : uint8_t { kFp16 = 1, kBf16 = 2 };

// "fp16"/"float16"/"half" and "bf16"/"bfloat16"; InvalidArgument otherwise.
absl::StatusOr<DType> ParseDType(absl::string_view name);
absl::string_view DTypeName(DType dtype);  // "fp16" or "bf16".
constexpr size_t DTypeSize(DType) { return 2; }

// Limits a spec must respect (also documented in proto/kvpool/v1/kvpool.proto).
inline constexpr size_t kMaxModelIdLength = 256;
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxKvHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = 4096;
inline constexpr uint32_t kMaxTokensPerBlock = 65536;
inline constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 30;

struct KvSpec {
  std::string model_id;
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;
  uint32_t tokens_per_block = 0;

  // Elements and bytes of one segment ([tokens][heads][dim]) and of one block (2*layers segments).
  uint64_t SegmentElements() const;
  uint64_t SegmentBytes() const;
  uint64_t SegmentsPerBlock() const { return uint64_t{2} * num_layers; }
  uint64_t BlockBytes() const;

  // True when the shapes and dtype match (model id included).
  bool operator==(const KvSpec& other) const;
  bool operator!=(const KvSpec& other) const { return !(*this == other); }

  // "model=M layers=L kv_heads=H head_dim=D dtype=fp16 tokens_per_block=N".
  std::string DebugString() const;
};

// OK when every field is within the limits above and the model id is 1..256 printable ASCII
// characters; InvalidArgument naming the first bad field otherwise.
absl::Status ValidateSpec(const KvSpec& spec);

// Checks a model id alone (same rule as in ValidateSpec).
absl::Status ValidateModelId(absl::string_view model_id);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_KV_SPEC_H_
