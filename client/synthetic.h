// Synthetic KV cache for demos, tests and benchmarks. NOT real model output: it imitates the
// structure real caches show, so that compression figures on it mean something, and its
// knobs say how much structure there is. Per layer and KV head:
//  - keys: k_t = mu + s * (sqrt(1 - noise^2) * mix_t + noise * n_t), where mix_t is a random
//    combination of `key_rank` shared directions (low-rank token structure, unit variance per
//    channel), n_t is i.i.d. N(0, 1), and `outlier_channels` channels have a scale s of 8-12
//    and a consistent offset mu of half their scale (the large, same-sign outlier channels of
//    post-RoPE keys); other channels have s = 1, mu = 0;
//  - values: v_t = sqrt(1 - noise^2) * mix_t + noise * n_t with `value_rank` shared
//    directions and no channel outliers.
// noise = 1 gives i.i.d. Gaussian data with no structure. Deterministic for a given seed.
// Thread-safe (stateless).
#ifndef KVPOOL_CLIENT_SYNTHETIC_H_
#define KVPOOL_CLIENT_SYNTHETIC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "common/kv_spec.h"

namespace kvpool::client {

struct SyntheticOptions {
  uint32_t num_layers = 4;
  uint32_t num_kv_heads = 2;
  uint32_t head_dim = 64;
  uint64_t tokens = 256;
  DType dtype = DType::kFp16;
  uint64_t seed = 1;
  uint32_t key_rank = 4;         // Shared key directions per head.
  uint32_t value_rank = 8;       // Shared value directions per head.
  float noise = 0.3f;            // Fraction (in amplitude) of unstructured i.i.d. noise, [0, 1].
  uint32_t outlier_channels = 4; // Key channels with large magnitude per head.
  uint32_t vocab = 32000;        // Token ids are drawn from [0, vocab).
};

// [layers][2][tokens][kv_heads][head_dim] elements of options.dtype, little-endian.
std::string SyntheticKv(const SyntheticOptions& options);

// Options of `spec`'s shape: its layers, KV heads, head dim, dtype, and one block of tokens;
// structure knobs at their defaults.
SyntheticOptions SyntheticShape(const KvSpec& spec);

// A corpus of blocks that share content to a chosen degree, for evaluating fusion. NOT real
// model output. `families` base blocks are drawn with SyntheticKv (shape and structure from
// `shape`, tokens = one block); block b belongs to family b * families / blocks (families are
// runs of consecutive blocks, like the chunks of one long prompt) and each of its segments
// is  a * (base + variation * own)  where `own` is an independent SyntheticKv draw of the same
// structure and `a` is drawn per segment, log-uniform in [0.5, 2] (members differ in norm, as
// the seed paper's do). So a member's relative L2 distance from its family's direction is about
// `variation`; families == blocks gives unrelated blocks. Deterministic for the seed.
struct CorpusOptions {
  SyntheticOptions shape;     // tokens is the block size.
  uint32_t blocks = 64;
  uint32_t families = 8;
  float variation = 0.05f;
  uint64_t seed = 1;
};

// `blocks` blocks, each [layers][2][tokens][kv_heads][head_dim] elements of shape.dtype.
std::vector<std::string> SyntheticCorpus(const CorpusOptions& options);

// `count` token ids from [0, vocab), deterministic for the seed.
std::vector<uint32_t> SyntheticTokenIds(uint64_t count, uint32_t vocab, uint64_t seed);

}  // namespace kvpool::client

#endif  // KVPOOL_CLIENT_SYNTHETIC_H_
