// BlockStore: the daemon's index, content-addressed segment store and host-memory tier. Maps
// (namespace, block key) to a manifest (StoredBlock), keeps every referenced encoded segment once
// in host memory under a capacity limit, and evicts the least recently used blocks to make room.
//
// A namespace is (model id, tokens per block); its first put registers the full KvSpec and every
// later put must match it.
//
// Segments are named by a digest of their bytes (XXH3-128, confirmed by comparing the bytes) and
// reference-counted by the manifests that list them: identical segments are stored once even
// when their keys differ, and a segment stays while any manifest references it. Deleting or
// evicting a block drops its references; a segment whose count reaches zero is freed in the same
// step (and leaves the fusion index). The capacity counts each stored segment once.
//
// Readers hold shared pointers: a reader that got a block keeps its bytes alive even if the block
// is evicted or deleted meanwhile (the capacity accounting counts only what the index holds).
//
// The fusion index (server/store/fuser.h) lives here too, under the same lock, so that a
// representative leaves it in the same step as its last reference: per (namespace, layer), the
// key segments registered as representatives with their sketches and their value partners.
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
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"
#include "kernels/fusion.h"

namespace kvpool::server {

using NamespaceId = uint32_t;

// One encoded segment (common/encoded_segment.h) as stored: immutable, named by its digest.
struct Segment {
  std::string bytes;
  std::array<uint64_t, 2> digest{};  // XXH3-128 of bytes.
  uint64_t logical_bytes = 0;        // What it decodes to.
  CodecId codec = CodecId::kRaw;     // From the header (kRaw when the header is short).

  // Computes the digest; `logical_bytes` is what the segment decodes to.
  static std::shared_ptr<const Segment> Make(std::string bytes, uint64_t logical_bytes);
};
using SegmentPtr = std::shared_ptr<const Segment>;

// One manifest entry: the segment a (layer, K/V) uses and the scale a reader applies to its
// decoded values (kernels::ScaleElements; 1 for a block's own segments).
struct SegmentRef {
  SegmentPtr segment;
  float scale = 1;
  bool fused = false;  // Shared through fusion: the segment is a representative, not this
                       // block's own content.
};

// A block's manifest: one SegmentRef per layer and K/V in canonical order (layer 0 K, layer 0
// V, layer 1 K, ...). Built by the encoder, then owned by the store and immutable.
class StoredBlock {
 public:
  struct CodecTally {
    uint64_t segments = 0;
    uint64_t logical_bytes = 0;
    uint64_t stored_bytes = 0;
  };
  // A key segment this block offers to the fusion index (online fusion).
  struct NewRepresentative {
    uint32_t layer = 0;
    kernels::Sketch sketch;
  };

  // `logical_bytes` is what the whole block decodes to.
  StoredBlock(std::vector<SegmentRef> refs, uint64_t logical_bytes);
  // The same from whole encoded segments, each the block's own (scale 1).
  static std::shared_ptr<StoredBlock> FromSegments(std::vector<std::string> segments,
                                                   uint64_t logical_bytes);

  const std::vector<SegmentRef>& refs() const { return refs_; }
  size_t num_segments() const { return refs_.size(); }
  absl::string_view segment(size_t i) const { return refs_[i].segment->bytes; }
  float scale(size_t i) const { return refs_[i].scale; }
  bool scaled() const;  // Any scale other than 1.
  uint64_t logical_bytes() const { return logical_bytes_; }
  // Bytes of the segments it references, each counted once per reference (an upper bound of
  // what storing it adds).
  uint64_t referenced_bytes() const;

  std::vector<NewRepresentative>& new_representatives() { return new_representatives_; }
  const std::vector<NewRepresentative>& new_representatives() const {
    return new_representatives_;
  }

  // OK when every segment parses and matches its checksum; DataLoss naming the first bad
  // segment otherwise.
  absl::Status Verify() const;

 private:
  friend class BlockStore;  // Replaces segments by the stored copies of equal content.
  std::vector<SegmentRef> refs_;
  uint64_t logical_bytes_;
  std::vector<NewRepresentative> new_representatives_;
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
    uint64_t evicted_bytes = 0;    // Segment bytes freed by those evictions.
  };

  struct Stats {
    uint64_t blocks = 0;
    uint64_t logical_bytes = 0;  // What the blocks decode to.
    uint64_t stored_bytes = 0;   // What their segments occupy, each stored segment once.
    uint64_t capacity_bytes = 0;
    uint64_t evictions = 0;      // Blocks evicted since creation.
    uint32_t namespaces = 0;
    uint64_t segments = 0;         // Distinct segments stored.
    uint64_t segment_refs = 0;     // Manifest entries (blocks x segments per block).
    uint64_t fused_refs = 0;       // Manifest entries that use a representative.
    uint64_t representatives = 0;  // Key segments in the fusion index.
    // Per codec, over distinct stored segments. Indexed by CodecId.
    std::array<StoredBlock::CodecTally, kNumCodecs> codecs{};
  };

  // A representative proposed by the fusion index.
  struct Candidate {
    SegmentPtr key;    // The representative key segment.
    SegmentPtr value;  // Its value partner (same block and layer); null when it is gone.
    int distance = 0;  // Hamming distance of the sketches.
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

  // Inserts blocks[i] under keys[i] (blocks[i] must decode to the namespace's BlockBytes()); the
  // store takes the blocks over and points their entries at stored segments of equal content.
  // Keys already stored keep their block. Registers the blocks' new representatives in the
  // fusion index. Evicts LRU blocks until the new segments fit. All or nothing:
  // ResourceExhausted, changing nothing, when the new blocks alone could exceed the capacity.
  absl::StatusOr<InsertResult> Insert(NamespaceId ns, absl::Span<const BlockKey> keys,
                                      std::vector<std::shared_ptr<StoredBlock>> blocks);

  // The block of each key (nullptr for a miss); hits move to most recently used.
  std::vector<StoredBlockPtr> Get(NamespaceId ns, absl::Span<const BlockKey> keys);

  // Removes `key` only if it still maps to `block` (used after a failed checksum).
  void Drop(NamespaceId ns, const BlockKey& key, const StoredBlock* block);

  // Removes the keys; returns how many were stored.
  uint32_t Delete(NamespaceId ns, absl::Span<const BlockKey> keys);

  // Up to `max` representatives of (ns, layer) whose sketch is within `radius` of `sketch`,
  // nearest first. Does not change recency.
  std::vector<Candidate> FusionCandidates(NamespaceId ns, uint32_t layer,
                                          const kernels::Sketch& sketch, int radius,
                                          size_t max) const;

  Stats GetStats() const;

  // Checks the accounting against a recount of the index (tests): Internal naming the first
  // difference.
  absl::Status CheckInvariants() const;

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
    std::shared_ptr<StoredBlock> block;
    std::list<IndexKey>::iterator lru_pos;  // Position in lru_ (front = most recent).
  };
  // A stored segment and the number of manifest entries that reference it.
  struct SegmentEntry {
    SegmentPtr segment;
    uint64_t refs = 0;
    bool indexed = false;  // A representative in reps_[{ns, layer}].
    NamespaceId ns = 0;
    uint32_t layer = 0;
  };
  using Digest = std::array<uint64_t, 2>;
  using SegmentBucket = absl::InlinedVector<SegmentEntry, 1>;  // Equal digests, distinct bytes.
  struct RepEntry {
    kernels::Sketch sketch;
    SegmentPtr key;
    std::weak_ptr<const Segment> value;
  };
  using RepKey = std::pair<NamespaceId, uint32_t>;

  explicit BlockStore(const Options& options) : options_(options) {}
  // Removes a block from the index and drops its references; segments freed by that are
  // appended to `freed` when given.
  void EraseLocked(absl::flat_hash_map<IndexKey, Entry>::iterator it,
                   std::vector<SegmentPtr>* freed = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SegmentEntry* FindSegmentLocked(const Segment& segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes `block`'s references: shares stored segments, stores new ones, indexes new
  // representatives.
  void AddRefsLocked(NamespaceId ns, StoredBlock* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropRefsLocked(const StoredBlock& block, std::vector<SegmentPtr>* freed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountSegmentLocked(const Segment& segment, int sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::vector<KvSpec> namespaces_ ABSL_GUARDED_BY(mu_);  // Indexed by NamespaceId.
  absl::flat_hash_map<IndexKey, Entry> index_ ABSL_GUARDED_BY(mu_);
  std::list<IndexKey> lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Digest, SegmentBucket> segments_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<RepKey, std::vector<RepEntry>> reps_ ABSL_GUARDED_BY(mu_);
  uint64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t logical_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t segment_count_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t segment_refs_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t fused_refs_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t representatives_ ABSL_GUARDED_BY(mu_) = 0;
  std::array<StoredBlock::CodecTally, kNumCodecs> codecs_ ABSL_GUARDED_BY(mu_){};
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_STORE_BLOCK_STORE_H_
