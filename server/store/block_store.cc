#include "server/store/block_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"

namespace kvpool::server {

std::shared_ptr<const Segment> Segment::Make(std::string bytes, uint64_t logical_bytes) {
  auto segment = std::make_shared<Segment>();
  segment->digest = Digest128(bytes.data(), bytes.size());
  segment->logical_bytes = logical_bytes;
  // Byte 5 of the header is the codec id (common/encoded_segment.h).
  const uint8_t codec = bytes.size() > 5 ? static_cast<uint8_t>(bytes[5]) : 0;
  segment->codec = static_cast<CodecId>(codec < kNumCodecs ? codec : 0);
  segment->bytes = std::move(bytes);
  return segment;
}

StoredBlock::StoredBlock(std::vector<SegmentRef> refs, uint64_t logical_bytes)
    : refs_(std::move(refs)), logical_bytes_(logical_bytes) {}

std::shared_ptr<StoredBlock> StoredBlock::FromSegments(std::vector<std::string> segments,
                                                       uint64_t logical_bytes) {
  const uint64_t per_segment = segments.empty() ? 0 : logical_bytes / segments.size();
  std::vector<SegmentRef> refs;
  refs.reserve(segments.size());
  for (std::string& s : segments) refs.push_back({Segment::Make(std::move(s), per_segment)});
  return std::make_shared<StoredBlock>(std::move(refs), logical_bytes);
}

bool StoredBlock::scaled() const {
  for (const SegmentRef& r : refs_) {
    if (r.scale != 1.f) return true;
  }
  return false;
}

uint64_t StoredBlock::referenced_bytes() const {
  uint64_t n = 0;
  for (const SegmentRef& r : refs_) n += r.segment->bytes.size();
  return n;
}

absl::Status StoredBlock::Verify() const {
  for (size_t s = 0; s < refs_.size(); ++s) {
    absl::string_view payload;
    auto header = ParseSegment(refs_[s].segment->bytes, &payload);
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

void BlockStore::CountSegmentLocked(const Segment& segment, int sign) {
  const int64_t n = static_cast<int64_t>(segment.bytes.size());
  stored_bytes_ += sign * n;
  segment_count_ += sign;
  StoredBlock::CodecTally& t = codecs_[static_cast<int>(segment.codec)];
  t.segments += sign;
  t.logical_bytes += sign * static_cast<int64_t>(segment.logical_bytes);
  t.stored_bytes += sign * n;
}

BlockStore::SegmentEntry* BlockStore::FindSegmentLocked(const Segment& segment) {
  auto it = segments_.find(segment.digest);
  if (it == segments_.end()) return nullptr;
  for (SegmentEntry& e : it->second) {
    if (e.segment.get() == &segment || e.segment->bytes == segment.bytes) return &e;
  }
  return nullptr;
}

namespace {

// The distinct segments of `blocks` (equal bytes count once), by digest, and their bytes.
struct DistinctSegments {
  absl::flat_hash_map<std::array<uint64_t, 2>, std::vector<const Segment*>> by_digest;
  uint64_t bytes = 0;

  explicit DistinctSegments(absl::Span<const std::shared_ptr<StoredBlock>> blocks) {
    for (const auto& block : blocks) {
      if (block == nullptr) continue;
      for (const SegmentRef& r : block->refs()) {
        if (Find(*r.segment) != nullptr) continue;
        by_digest[r.segment->digest].push_back(r.segment.get());
        bytes += r.segment->bytes.size();
      }
    }
  }
  const Segment* Find(const Segment& segment) const {
    auto it = by_digest.find(segment.digest);
    if (it == by_digest.end()) return nullptr;
    for (const Segment* s : it->second) {
      if (s == &segment || s->bytes == segment.bytes) return s;
    }
    return nullptr;
  }
};

}  // namespace

void BlockStore::AddRefsLocked(NamespaceId ns, StoredBlock* block) {
  for (SegmentRef& r : block->refs_) {
    SegmentEntry* e = FindSegmentLocked(*r.segment);
    if (e == nullptr) {
      segments_[r.segment->digest].push_back(SegmentEntry{r.segment});
      e = &segments_[r.segment->digest].back();
      CountSegmentLocked(*r.segment, +1);
    }
    r.segment = e->segment;  // Share the stored copy.
    ++e->refs;
    ++segment_refs_;
    if (r.fused) ++fused_refs_;
  }
  logical_bytes_ += block->logical_bytes_;
  for (const StoredBlock::NewRepresentative& rep : block->new_representatives_) {
    const size_t k = size_t{2} * rep.layer;
    if (k + 1 >= block->refs_.size()) continue;
    SegmentEntry* e = FindSegmentLocked(*block->refs_[k].segment);
    if (e == nullptr || e->indexed) continue;
    e->indexed = true;
    e->ns = ns;
    e->layer = rep.layer;
    reps_[{ns, rep.layer}].push_back(
        RepEntry{rep.sketch, e->segment, block->refs_[k + 1].segment});
    ++representatives_;
  }
  block->new_representatives_.clear();
}

void BlockStore::DropRefsLocked(const StoredBlock& block, std::vector<SegmentPtr>* freed) {
  logical_bytes_ -= block.logical_bytes_;
  for (const SegmentRef& r : block.refs_) {
    --segment_refs_;
    if (r.fused) --fused_refs_;
    auto it = segments_.find(r.segment->digest);
    if (it == segments_.end()) continue;  // Not reached: every reference was added.
    SegmentBucket& bucket = it->second;
    for (size_t i = 0; i < bucket.size(); ++i) {
      SegmentEntry& e = bucket[i];
      if (e.segment != r.segment) continue;
      if (--e.refs > 0) break;
      if (e.indexed) {
        std::vector<RepEntry>& reps = reps_[{e.ns, e.layer}];
        for (size_t j = 0; j < reps.size(); ++j) {
          if (reps[j].key == e.segment) {
            reps[j] = std::move(reps.back());
            reps.pop_back();
            --representatives_;
            break;
          }
        }
        if (reps.empty()) reps_.erase({e.ns, e.layer});
      }
      CountSegmentLocked(*e.segment, -1);
      if (freed != nullptr) freed->push_back(e.segment);
      bucket.erase(bucket.begin() + i);
      if (bucket.empty()) segments_.erase(it);
      break;
    }
  }
}

void BlockStore::EraseLocked(absl::flat_hash_map<IndexKey, Entry>::iterator it,
                             std::vector<SegmentPtr>* freed) {
  DropRefsLocked(*it->second.block, freed);
  lru_.erase(it->second.lru_pos);
  index_.erase(it);
}

absl::StatusOr<BlockStore::InsertResult> BlockStore::Insert(
    NamespaceId ns, absl::Span<const BlockKey> keys,
    std::vector<std::shared_ptr<StoredBlock>> blocks) {
  if (keys.size() != blocks.size()) {
    return absl::InternalError("Insert: keys and blocks differ in count");
  }
  InsertResult result;
  absl::MutexLock lock(&mu_);
  // Keys repeated in the batch count once (their first block is the candidate); keys already
  // stored keep their block. After evicting everything else the store would hold at most the
  // kept blocks' referenced bytes plus the new blocks' distinct segments: if even that exceeds
  // the capacity, refuse.
  uint64_t kept = 0;
  absl::flat_hash_map<IndexKey, bool> batch;
  for (size_t i = 0; i < keys.size(); ++i) {
    IndexKey k{ns, keys[i]};
    if (!batch.emplace(k, true).second) {
      blocks[i] = nullptr;
      continue;
    }
    auto it = index_.find(k);
    if (it != index_.end()) {
      kept += it->second.block->referenced_bytes();
      blocks[i] = nullptr;
    }
  }
  const DistinctSegments distinct(blocks);
  if (kept + distinct.bytes > options_.capacity_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "put of ", distinct.bytes, " new bytes (plus ", kept,
        " bytes of its blocks already stored) exceeds the host tier capacity of ",
        options_.capacity_bytes, " bytes"));
  }
  // Refresh the batch's stored keys to most recently used, in key order (the last ends up most
  // recent); eviction from the LRU end stops before reaching them.
  size_t batch_stored = 0;  // Distinct keys of the batch that are stored.
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = index_.find(IndexKey{ns, keys[i]});
    if (it != index_.end()) lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
  }
  for (const auto& [k, unused] : batch) batch_stored += index_.contains(k) ? 1 : 0;
  // Bytes the new blocks add: their distinct segments not stored yet. An eviction that frees a
  // segment the batch uses adds it back.
  uint64_t incoming = 0;
  for (const auto& [digest, same] : distinct.by_digest) {
    for (const Segment* seg : same) incoming += FindSegmentLocked(*seg) ? 0 : seg->bytes.size();
  }
  std::vector<SegmentPtr> freed;
  while (lru_.size() > batch_stored && stored_bytes_ + incoming > options_.capacity_bytes) {
    auto victim = index_.find(lru_.back());
    freed.clear();
    EraseLocked(victim, &freed);
    for (const SegmentPtr& seg : freed) {
      result.evicted_bytes += seg->bytes.size();
      if (distinct.Find(*seg) != nullptr) incoming += seg->bytes.size();
    }
    ++result.evicted;
  }
  evictions_ += result.evicted;
  for (size_t i = 0; i < keys.size(); ++i) {
    IndexKey k{ns, keys[i]};
    if (blocks[i] == nullptr || index_.contains(k)) {
      ++result.already_present;
      continue;
    }
    lru_.push_front(k);
    AddRefsLocked(ns, blocks[i].get());
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

std::vector<BlockStore::Candidate> BlockStore::FusionCandidates(NamespaceId ns, uint32_t layer,
                                                                const kernels::Sketch& sketch,
                                                                int radius, size_t max) const {
  std::vector<Candidate> out;
  absl::MutexLock lock(&mu_);
  auto it = reps_.find(RepKey{ns, layer});
  if (it == reps_.end() || max == 0) return out;
  std::vector<std::pair<int, const RepEntry*>> near;
  for (const RepEntry& e : it->second) {
    const int d = kernels::HammingDistance(sketch, e.sketch);
    if (d <= radius) near.push_back({d, &e});
  }
  const size_t n = std::min(max, near.size());
  std::partial_sort(near.begin(), near.begin() + n, near.end(),
                    [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 0; i < n; ++i) {
    out.push_back(Candidate{near[i].second->key, near[i].second->value.lock(), near[i].first});
  }
  return out;
}

absl::Status BlockStore::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  absl::flat_hash_map<const Segment*, uint64_t> refs;
  uint64_t logical = 0, fused = 0, total_refs = 0;
  for (const auto& [key, entry] : index_) {
    logical += entry.block->logical_bytes_;
    for (const SegmentRef& r : entry.block->refs_) {
      ++refs[r.segment.get()];
      ++total_refs;
      if (r.fused) ++fused;
    }
  }
  uint64_t stored = 0, count = 0, indexed = 0;
  for (const auto& [digest, bucket] : segments_) {
    for (const SegmentEntry& e : bucket) {
      auto it = refs.find(e.segment.get());
      const uint64_t want = it == refs.end() ? 0 : it->second;
      if (e.refs != want || want == 0) {
        return absl::InternalError(absl::StrCat("segment has ", e.refs, " references, manifests hold ", want));
      }
      stored += e.segment->bytes.size();
      ++count;
      if (e.indexed) ++indexed;
      refs.erase(e.segment.get());
    }
  }
  if (!refs.empty()) return absl::InternalError("a manifest references a segment the store lacks");
  uint64_t rep_entries = 0;
  for (const auto& [k, reps] : reps_) rep_entries += reps.size();
  if (stored != stored_bytes_ || count != segment_count_ || logical != logical_bytes_ ||
      fused != fused_refs_ || total_refs != segment_refs_ || indexed != representatives_ ||
      rep_entries != representatives_) {
    return absl::InternalError(absl::StrCat(
        "accounting: stored ", stored_bytes_, " vs ", stored, ", segments ", segment_count_,
        " vs ", count, ", logical ", logical_bytes_, " vs ", logical, ", fused ", fused_refs_,
        " vs ", fused, ", refs ", segment_refs_, " vs ", total_refs, ", representatives ",
        representatives_, " vs ", indexed, "/", rep_entries));
  }
  if (stored_bytes_ > options_.capacity_bytes) {
    return absl::InternalError(absl::StrCat("stored ", stored_bytes_, " bytes exceed capacity ",
                                            options_.capacity_bytes));
  }
  return absl::OkStatus();
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
  s.segments = segment_count_;
  s.segment_refs = segment_refs_;
  s.fused_refs = fused_refs_;
  s.representatives = representatives_;
  s.capacity_bytes = options_.capacity_bytes;
  s.evictions = evictions_;
  s.namespaces = static_cast<uint32_t>(namespaces_.size());
  return s;
}

}  // namespace kvpool::server
