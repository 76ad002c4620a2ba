// Block keys: 32 bytes naming a block by its content's history, so that equal keys mean equal
// KV content. The definition, which any client in any language can reproduce:
//
//   key[0] = SHA-256(root || tokens[0] || extra)
//   key[i] = SHA-256(key[i-1] || tokens[i] || extra)
//
// where root is 32 zero bytes, tokens[i] are the tokens_per_block token ids of block i, each
// as a little-endian uint32, and extra is the caller's extra-key bytes (LoRA id, tenant salt;
// empty by default) appended unchanged to every block. Only full blocks get keys.
// Thread-safe (stateless).
#ifndef KVPOOL_COMMON_BLOCK_KEY_H_
#define KVPOOL_COMMON_BLOCK_KEY_H_

#include <array>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvpool {

inline constexpr size_t kBlockKeySize = 32;

struct BlockKey {
  std::array<uint8_t, kBlockKeySize> bytes{};

  absl::string_view AsStringView() const {
    return absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  std::string Hex() const;
  bool operator==(const BlockKey& o) const { return bytes == o.bytes; }
  bool operator!=(const BlockKey& o) const { return bytes != o.bytes; }
  template <typename H>
  friend H AbslHashValue(H h, const BlockKey& k) {
    return H::combine_contiguous(std::move(h), k.bytes.data(), k.bytes.size());
  }
};

// The root parent of the first block: 32 zero bytes.
BlockKey RootBlockKey();

// The key of one block given its parent's key.
BlockKey ChainBlockKey(const BlockKey& parent, absl::Span<const uint32_t> block_tokens,
                       absl::string_view extra = {});

// Keys of the full blocks of `tokens` (tokens.size() / tokens_per_block of them; a trailing
// partial block gets none). InvalidArgument when tokens_per_block is 0.
absl::StatusOr<std::vector<BlockKey>> ComputeBlockKeys(absl::Span<const uint32_t> tokens,
                                                       uint32_t tokens_per_block,
                                                       absl::string_view extra = {});

// Parses 32 raw bytes; InvalidArgument naming the size otherwise.
absl::StatusOr<BlockKey> BlockKeyFromBytes(absl::string_view bytes);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_BLOCK_KEY_H_
