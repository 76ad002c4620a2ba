#include "server/store/block_store.h"

#include "absl/strings/str_cat.h"

namespace kvpool::server {

StoredBlock::StoredBlock(std::vector<std::string> segments, uint64_t logical_bytes)
    : segments_(std::move(segments)), logical_bytes_(logical_bytes) {
  const uint64_t logical_per_segment = segments_.empty() ? 0 : logical_bytes_ / segments_.size();
  for (const std::string& seg : segments_) {
    stored_bytes_ += seg.size();
    // Byte 5 of the header is the codec id (common/encoded_segment.h); the store only builds
    // blocks from segments it encoded, so the id is valid.
    const uint8_t codec = seg.size() > 5 ? static_cast<uint8_t>(seg[5]) : 0;
    CodecTally& t = tallies_[codec < kNumCodecs ? codec : 0];
    ++t.segments;
    t.logical_bytes += logical_per_segment;
    t.stored_bytes += seg.size();
  }
}

absl::Status StoredBlock::Verify() const {
  for (size_t s = 0; s < segments_.size(); ++s) {
    absl::string_view payload;
    auto header = ParseSegment(segments_[s], &payload);
    if (!header.ok()) {
      return absl::DataLossError(absl::StrCat("segment ", s, " (layer ", s / 2,
                                              s % 2 == 0 ? " K" : " V", "): ",
                                              header.status().message(),
                                              "; the block was dropped"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BlockStore>> BlockStore::Create(const Options& options) {
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("host tier capacity must be positive");
  }
  return std::unique_ptr<BlockStore>(new BlockStore(options));
}

absl::StatusOr<NamespaceId> BlockStore::RegisterNamespace(const KvSpec& spec) {
  absl::MutexLock lock(&mu_);
  for (NamespaceId id = 0; id < namespaces_.size(); ++id) {
    const KvSpec& known = namespaces_[id];
    if (known.model_id != spec.model_id || known.tokens_per_block != spec.tokens_per_block) {
      continue;
    }
    if (known != spec) {
      return absl::InvalidArgumentError(
          absl::StrCat("spec {", spec.DebugString(), "} conflicts with the registered spec {",
                       known.DebugString(), "} of this model and block size"));
    }
    return id;
  }
  namespaces_.push_back(spec);
  return static_cast<NamespaceId>(namespaces_.size() - 1);
}

std::optional<std::pair<NamespaceId, KvSpec>> BlockStore::FindNamespace(
    absl::string_view model_id, uint32_t tokens_per_block) const {
  absl::MutexLock lock(&mu_);
  for (NamespaceId id = 0; id < namespaces_.size(); ++id) {
    if (namespaces_[id].model_id == model_id &&
        namespaces_[id].tokens_per_block == tokens_per_block) {
      return std::make_pair(id, namespaces_[id]);
    }
  }
  return std::nullopt;
}

std::vector<bool> BlockStore::Contains(NamespaceId ns, absl::Span<const BlockKey> keys) const {
  std::vector<bool> present(keys.size());
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < keys.size(); ++i) present[i] = index_.contains(IndexKey{ns, keys[i]});
  return present;
}

void BlockStore::CountLocked(const StoredBlock& block, int sign) {
  stored_bytes_ += sign * static_cast<int64_t>(block.size());
  logical_bytes_ += sign * static_cast<int64_t>(block.logical_bytes());
  for (int c = 0; c < kNumCodecs; ++c) {
    codecs_[c].segments += sign * static_cast<int64_t>(block.tallies()[c].segments);
    codecs_[c].logical_bytes += sign * static_cast<int64_t>(block.tallies()[c].logical_bytes);
    codecs_[c].stored_bytes += sign * static_cast<int64_t>(block.tallies()[c].stored_bytes);
  }
}

void BlockStore::EraseLocked(absl::flat_hash_map<IndexKey, Entry>::iterator it) {
  CountLocked(*it->second.block, -1);
  lru_.erase(it->second.lru_pos);
  index_.erase(it);
}

absl::StatusOr<BlockStore::InsertResult> BlockStore::Insert(NamespaceId ns,
                                                            absl::Span<const BlockKey> keys,
                                                            std::vector<StoredBlockPtr> blocks) {
  if (keys.size() != blocks.size()) {
    return absl::InternalError("Insert: keys and blocks differ in count");
  }
  InsertResult result;
  absl::MutexLock lock(&mu_);
  // Bytes the new keys need, and bytes of this batch's keys that are already stored (those stay:
  // eviction must not take them). Keys repeated in the batch count once.
  uint64_t incoming = 0;
  uint64_t kept = 0;
  absl::flat_hash_map<IndexKey, bool> batch;
  for (size_t i = 0; i < keys.size(); ++i) {
    IndexKey k{ns, keys[i]};
    if (!batch.emplace(k, true).second) continue;
    auto it = index_.find(k);
    if (it != index_.end()) {
      kept += it->second.block->size();
    } else {
      incoming += blocks[i]->size();
    }
  }
  if (kept + incoming > options_.capacity_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "put of ", incoming, " new bytes (plus ", kept,
        " bytes of its blocks already stored) exceeds the host tier capacity of ",
        options_.capacity_bytes, " bytes"));
  }
  // Refresh the batch's stored keys to most recently used; eviction from the LRU end then stops
  // before reaching them, because kept + incoming fits.
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = index_.find(IndexKey{ns, keys[i]});
    if (it != index_.end()) lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
  }
  while (stored_bytes_ + incoming > options_.capacity_bytes && !lru_.empty()) {
    auto victim = index_.find(lru_.back());
    result.evicted_bytes += victim->second.block->size();
    ++result.evicted;
    EraseLocked(victim);
  }
  evictions_ += result.evicted;
  for (size_t i = 0; i < keys.size(); ++i) {
    IndexKey k{ns, keys[i]};
    if (index_.contains(k)) {
      ++result.already_present;
      continue;
    }
    lru_.push_front(k);
    CountLocked(*blocks[i], +1);
    index_.emplace(k, Entry{std::move(blocks[i]), lru_.begin()});
    ++result.stored;
  }
  return result;
}

std::vector<StoredBlockPtr> BlockStore::Get(NamespaceId ns, absl::Span<const BlockKey> keys) {
  std::vector<StoredBlockPtr> out(keys.size());
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = index_.find(IndexKey{ns, keys[i]});
    if (it == index_.end()) continue;
    lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
    out[i] = it->second.block;
  }
  return out;
}

void BlockStore::Drop(NamespaceId ns, const BlockKey& key, const StoredBlock* block) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(IndexKey{ns, key});
  if (it != index_.end() && it->second.block.get() == block) EraseLocked(it);
}

uint32_t BlockStore::Delete(NamespaceId ns, absl::Span<const BlockKey> keys) {
  uint32_t deleted = 0;
  absl::MutexLock lock(&mu_);
  for (const BlockKey& key : keys) {
    auto it = index_.find(IndexKey{ns, key});
    if (it == index_.end()) continue;
    EraseLocked(it);
    ++deleted;
  }
  return deleted;
}

BlockStore::Stats BlockStore::GetStats() const {
  absl::MutexLock lock(&mu_);
  Stats s;
  s.blocks = index_.size();
  s.logical_bytes = logical_bytes_;
  s.stored_bytes = stored_bytes_;
  s.codecs = codecs_;
  s.capacity_bytes = options_.capacity_bytes;
  s.evictions = evictions_;
  s.namespaces = static_cast<uint32_t>(namespaces_.size());
  return s;
}

}  // namespace kvpool::server
