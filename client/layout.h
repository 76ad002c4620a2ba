// Moving KV between a whole sequence's cache, [layers][2][tokens][kv_heads][head_dim] (the
// layout of `kvpool put --in KV.npy`), and blocks in the canonical block layout
// [layers][2][tokens_per_block][kv_heads][head_dim], block after block.
// Thread-safe (stateless).
#ifndef KVPOOL_CLIENT_LAYOUT_H_
#define KVPOOL_CLIENT_LAYOUT_H_

#include <cstdint>

#include "absl/types/span.h"
#include "common/kv_spec.h"

namespace kvpool::client {

// Copies the first num_blocks * spec.tokens_per_block tokens of `sequence` (which holds
// `tokens` tokens) into `blocks` (num_blocks * spec.BlockBytes() bytes).
// REQUIRES: num_blocks * tokens_per_block <= tokens; spans of the stated sizes.
void SequenceToBlocks(const KvSpec& spec, absl::Span<const uint8_t> sequence, uint64_t tokens,
                      uint64_t num_blocks, absl::Span<uint8_t> blocks);

// The inverse: writes num_blocks blocks into the first num_blocks * tokens_per_block tokens of
// `sequence` (which holds `tokens` tokens).
void BlocksToSequence(const KvSpec& spec, absl::Span<const uint8_t> blocks, uint64_t num_blocks,
                      uint64_t tokens, absl::Span<uint8_t> sequence);

}  // namespace kvpool::client

#endif  // KVPOOL_CLIENT_LAYOUT_H_
