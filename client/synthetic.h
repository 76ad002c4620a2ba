// Synthetic KV cache for demos, tests and benchmarks. NOT real model output: it imitates the
// structure real caches show, so that compression figures on it are meaningful:
//  - keys: low-rank token structure (each head's keys are a mix of `rank` shared directions
//    plus noise) and a few outlier channels with ~10x larger magnitude, like post-RoPE keys;
//  - values: Gaussian per token without channel outliers.
// Deterministic for a given seed. Thread-safe (stateless).
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
  uint32_t rank = 4;             // Shared key directions per head.
  uint32_t outlier_channels = 4; // Key channels with large magnitude per head.
  uint32_t vocab = 32000;        // Token ids are drawn from [0, vocab).
};

// [layers][2][tokens][kv_heads][head_dim] elements of options.dtype, little-endian.
std::string SyntheticKv(const SyntheticOptions& options);

// `count` token ids from [0, vocab), deterministic for the seed.
std::vector<uint32_t> SyntheticTokenIds(uint64_t count, uint32_t vocab, uint64_t seed);

}  // namespace kvpool::client

#endif  // KVPOOL_CLIENT_SYNTHETIC_H_
