// Encoding a whole KV cache, [layers][2][tokens][kv_heads][head_dim], into segments and back:
// the sequence is cut into blocks of tokens_per_block tokens (the last one may be shorter) and
// each layer's K and V of each block is one encoded segment. Used by `kvpool codec` and the
// benchmarks; also the .kvz container that `kvpool codec encode` writes:
//
//   "KVZ1", u32 layers, u32 tokens, u32 kv_heads, u32 head_dim, u8 dtype, u8[3] 0,
//   u32 tokens_per_block, u64 segment count, then per segment: u64 size, the encoded segment
//   (common/encoded_segment.h); segments ordered by block, then layer, then K before V.
//
// Thread-safe (stateless).
#ifndef KVPOOL_CLIENT_KV_CODEC_H_
#define KVPOOL_CLIENT_KV_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"
#include "kernels/codec.h"

namespace kvpool::client {

struct KvShape {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;

  uint64_t Elements() const { return uint64_t{layers} * 2 * tokens * kv_heads * head_dim; }
};

struct EncodedKv {
  KvShape shape;
  uint32_t tokens_per_block = 0;
  std::vector<std::string> segments;

  uint64_t EncodedBytes() const;  // Sum of the segments' sizes (headers included).
};

// Encodes `kv` (shape.Elements() elements) block by block, as a put of its blocks to the
// daemon would: each value with its layer's keys, and each layer's keys and values with a
// PlanCache of their own (`replan_every` segments per plan; 1: a plan for each segment).
// InvalidArgument for a size mismatch or bad params.
absl::StatusOr<EncodedKv> EncodeKv(const KvShape& shape, absl::Span<const uint16_t> kv,
                                   uint32_t tokens_per_block, const CodecParams& params,
                                   kernels::Path path,
                                   uint64_t replan_every = kernels::PlanCache::kReplanEvery);

// Decodes into `out` (shape.Elements() elements). DataLoss for corrupt or mismatched segments.
absl::Status DecodeKv(const EncodedKv& encoded, absl::Span<uint16_t> out, kernels::Path path);

std::string SerializeKvz(const EncodedKv& encoded);
// DataLoss for anything malformed; never reads out of bounds.
absl::StatusOr<EncodedKv> ParseKvz(absl::string_view bytes);

}  // namespace kvpool::client

#endif  // KVPOOL_CLIENT_KV_CODEC_H_
