// How close decoded KV is to the original, the way the codec evaluation reports it:
//  - relative L2 error ||x' - x|| / ||x|| over all elements (and over keys, values alone);
//  - maximum absolute error;
//  - attention-output error: the relative L2 error of softmax(q K^T / sqrt(d)) V computed with
//    the decoded K, V against the original, over sampled queries.
// Queries: for each layer and KV head, `queries_per_head` vectors drawn from N(0, I) and each
// scaled so that its logits against the original keys have standard deviation `logit_std`
// over the tokens (2.0 by default: attention spread over a handful of tokens, as decode-time
// heads typically show). Every query attends to all tokens. Deterministic for a seed.
// Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_QUALITY_H_
#define KVPOOL_KERNELS_QUALITY_H_

#include <cstdint>

#include "absl/types/span.h"

namespace kvpool::kernels {

struct QualityOptions {
  uint32_t queries_per_head = 16;
  float logit_std = 2.0f;
  uint64_t seed = 1;
};

struct Quality {
  double rel_l2 = 0;        // All elements.
  double key_rel_l2 = 0;    // Keys only.
  double value_rel_l2 = 0;  // Values only.
  double max_abs = 0;
  double attn_rel_l2 = 0;   // Attention output, all layers, heads and queries.
};

// `original` and `decoded`: [layers][2][tokens][kv_heads][head_dim] as float.
// REQUIRES: both hold layers * 2 * tokens * kv_heads * head_dim values.
Quality MeasureQuality(absl::Span<const float> original, absl::Span<const float> decoded,
                       uint32_t layers, uint32_t tokens, uint32_t kv_heads, uint32_t head_dim,
                       const QualityOptions& options = {});

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_QUALITY_H_
