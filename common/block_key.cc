#include "common/block_key.h"

#include <openssl/sha.h>

#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvpool {

std::string BlockKey::Hex() const { return absl::BytesToHexString(AsStringView()); }

BlockKey RootBlockKey() { return BlockKey{}; }

BlockKey ChainBlockKey(const BlockKey& parent, absl::Span<const uint32_t> block_tokens,
                       absl::string_view extra) {
  std::string message;
  message.resize(kBlockKeySize + 4 * block_tokens.size() + extra.size());
  char* p = message.data();
  std::memcpy(p, parent.bytes.data(), kBlockKeySize);
  p += kBlockKeySize;
  for (uint32_t t : block_tokens) {
    *p++ = static_cast<char>(t);
    *p++ = static_cast<char>(t >> 8);
    *p++ = static_cast<char>(t >> 16);
    *p++ = static_cast<char>(t >> 24);
  }
  std::memcpy(p, extra.data(), extra.size());
  BlockKey key;
  SHA256(reinterpret_cast<const unsigned char*>(message.data()), message.size(), key.bytes.data());
  return key;
}

absl::StatusOr<std::vector<BlockKey>> ComputeBlockKeys(absl::Span<const uint32_t> tokens,
                                                       uint32_t tokens_per_block,
                                                       absl::string_view extra) {
  if (tokens_per_block == 0) return absl::InvalidArgumentError("tokens_per_block is 0");
  std::vector<BlockKey> keys;
  keys.reserve(tokens.size() / tokens_per_block);
  BlockKey parent = RootBlockKey();
  for (size_t start = 0; start + tokens_per_block <= tokens.size(); start += tokens_per_block) {
    parent = ChainBlockKey(parent, tokens.subspan(start, tokens_per_block), extra);
    keys.push_back(parent);
  }
  return keys;
}

absl::StatusOr<BlockKey> BlockKeyFromBytes(absl::string_view bytes) {
  if (bytes.size() != kBlockKeySize) {
    return absl::InvalidArgumentError(
        absl::StrCat("block key is ", bytes.size(), " bytes, expected ", kBlockKeySize));
  }
  BlockKey key;
  std::memcpy(key.bytes.data(), bytes.data(), kBlockKeySize);
  return key;
}

}  // namespace kvpool
