#include "client/layout.h"

#include <cstring>

namespace kvpool::client {
namespace {

// Calls copy(sequence_offset, block_offset, bytes) for each contiguous run.
template <typename Copy>
void ForEachRun(const KvSpec& spec, uint64_t tokens, uint64_t num_blocks, Copy copy) {
  const uint64_t token_bytes = uint64_t{spec.num_kv_heads} * spec.head_dim * DTypeSize(spec.dtype);
  const uint64_t run = spec.tokens_per_block * token_bytes;  // One segment of one block.
  const uint64_t segments = spec.SegmentsPerBlock();
  for (uint64_t b = 0; b < num_blocks; ++b) {
    for (uint64_t s = 0; s < segments; ++s) {
      const uint64_t seq_off = (s * tokens + b * spec.tokens_per_block) * token_bytes;
      const uint64_t blk_off = (b * segments + s) * run;
      copy(seq_off, blk_off, run);
    }
  }
}

}  // namespace

void SequenceToBlocks(const KvSpec& spec, absl::Span<const uint8_t> sequence, uint64_t tokens,
                      uint64_t num_blocks, absl::Span<uint8_t> blocks) {
  ForEachRun(spec, tokens, num_blocks, [&](uint64_t seq, uint64_t blk, uint64_t n) {
    std::memcpy(blocks.data() + blk, sequence.data() + seq, n);
  });
}

void BlocksToSequence(const KvSpec& spec, absl::Span<const uint8_t> blocks, uint64_t num_blocks,
                      uint64_t tokens, absl::Span<uint8_t> sequence) {
  ForEachRun(spec, tokens, num_blocks, [&](uint64_t seq, uint64_t blk, uint64_t n) {
    std::memcpy(sequence.data() + seq, blocks.data() + blk, n);
  });
}

}  // namespace kvpool::client
