// BlockStore: the daemon's index and host-memory tier. Maps (namespace, block key) to a stored
// block, keeps every block's bytes in host memory under a capacity limit, and evicts the least
// recently used blocks to make room.
//
// A namespace is (model id, tokens per block); its first put registers the full KvSpec and every
// later put must match it. Stored blocks are immutable and reference-counted: a reader that got
// a block keeps its bytes alive even if the block is evicted or deleted meanwhile (the capacity
// accounting counts only blocks in the index).
//
// Blocks are stored as encoded segments, each with its own checksum, verified on read.
//
// Thread-safe: every method may be called from any thread; none blocks on I/O.
#ifndef KVPOOL_SERVER_STORE_BLOCK_STORE_H_
#define KVPOOL_SERVER_STORE_BLOCK_STORE_H_

#include <cstdint>
#include <array>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"

namespace kvpool::server {

using NamespaceId = uint32_t;

// One block as stored: its encoded segments (common/encoded_segment.h), one per layer and K/V
// in canonical order (layer 0 K, layer 0 V, layer 1 K, ...). Each carries its own checksum.
// Immutable once built.
class StoredBlock {
 public:
  struct CodecTally {
    uint64_t segments = 0;
    uint64_t logical_bytes = 0;
    uint64_t stored_bytes = 0;
  };

  // `segments` are whole encoded segments; `logical_bytes` is what they decode to.
  StoredBlock(std::vector<std::string> segments, uint64_t logical_bytes);

  const std::vector<std::string>& segments() const { return segments_; }
  uint64_t size() const { return stored_bytes_; }  // Encoded bytes, headers included.
  uint64_t logical_bytes() const { return logical_bytes_; }
  const std::array<CodecTally, kNumCodecs>& tallies() const { return tallies_; }

  // OK when every segment parses and matches its checksum; DataLoss naming the first bad
  // segment otherwise.
  absl::Status Verify() const;

 private:
  std::vector<std::string> segments_;
  uint64_t stored_bytes_ = 0;
  uint64_t logical_bytes_;
  std::array<CodecTally, kNumCodecs> tallies_{};
};

using StoredBlockPtr = std::shared_ptr<const StoredBlock>;

class BlockStore {
 public:
  struct Options {
    uint64_t capacity_bytes = uint64_t{1} << 30;  // Host-memory tier capacity.
  };

  struct InsertResult {
    uint32_t stored = 0;           // New blocks.
    uint32_t already_present = 0;  // Keys that were stored already (kept, moved to MRU).
    uint32_t evicted = 0;          // Other blocks evicted to make room.
    uint64_t evicted_bytes = 0;
  };

  struct Stats {
    uint64_t blocks = 0;
    uint64_t logical_bytes = 0;  // What the blocks decode to.
    uint64_t stored_bytes = 0;   // What they occupy, encoded.
    uint64_t capacity_bytes = 0;
    uint64_t evictions = 0;      // Blocks evicted since creation.
    uint32_t namespaces = 0;
    std::array<StoredBlock::CodecTally, kNumCodecs> codecs{};  // Indexed by CodecId.
  };

  // InvalidArgument when capacity_bytes is 0.
  static absl::StatusOr<std::unique_ptr<BlockStore>> Create(const Options& options);

  // Registers `spec`'s namespace, or checks that it matches the registered one.
  // InvalidArgument naming both specs when they differ.
  absl::StatusOr<NamespaceId> RegisterNamespace(const KvSpec& spec);

  // The namespace id and spec of (model id, tokens per block); nullopt when never registered.
  std::optional<std::pair<NamespaceId, KvSpec>> FindNamespace(absl::string_view model_id,
                                                              uint32_t tokens_per_block) const;

  // present[i] for each key; does not change recency.
  std::vector<bool> Contains(NamespaceId ns, absl::Span<const BlockKey> keys) const;

  // Inserts blocks[i] under keys[i] (blocks[i] must decode to the namespace's BlockBytes()). Keys
  // already stored keep their block. Evicts LRU blocks until the new ones fit. All or nothing:
  // ResourceExhausted, changing nothing, when the new blocks alone exceed the capacity.
  absl::StatusOr<InsertResult> Insert(NamespaceId ns, absl::Span<const BlockKey> keys,
                                      std::vector<StoredBlockPtr> blocks);

  // The block of each key (nullptr for a miss); hits move to most recently used.
  std::vector<StoredBlockPtr> Get(NamespaceId ns, absl::Span<const BlockKey> keys);

  // Removes `key` only if it still maps to `block` (used after a failed checksum).
  void Drop(NamespaceId ns, const BlockKey& key, const StoredBlock* block);

  // Removes the keys; returns how many were stored.
  uint32_t Delete(NamespaceId ns, absl::Span<const BlockKey> keys);

  Stats GetStats() const;

 private:
  struct IndexKey {
    NamespaceId ns;
    BlockKey key;
    bool operator==(const IndexKey& o) const { return ns == o.ns && key == o.key; }
    template <typename H>
    friend H AbslHashValue(H h, const IndexKey& k) {
      return H::combine(std::move(h), k.ns, k.key);
    }
  };
  struct Entry {
    StoredBlockPtr block;
    std::list<IndexKey>::iterator lru_pos;  // Position in lru_ (front = most recent).
  };

  explicit BlockStore(const Options& options) : options_(options) {}
  void EraseLocked(absl::flat_hash_map<IndexKey, Entry>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountLocked(const StoredBlock& block, int sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::vector<KvSpec> namespaces_ ABSL_GUARDED_BY(mu_);  // Indexed by NamespaceId.
  absl::flat_hash_map<IndexKey, Entry> index_ ABSL_GUARDED_BY(mu_);
  std::list<IndexKey> lru_ ABSL_GUARDED_BY(mu_);
  uint64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t logical_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::array<StoredBlock::CodecTally, kNumCodecs> codecs_ ABSL_GUARDED_BY(mu_){};
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_STORE_BLOCK_STORE_H_
