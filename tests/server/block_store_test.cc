// Tests for server/store/block_store.h: namespaces, the index, the host tier's capacity and LRU
// eviction, checksums, a seeded randomized comparison against a reference LRU model, and a
// multi-threaded run checked for consistency at the end.
#include "server/store/block_store.h"

#include <algorithm>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"
#include "kernels/codec.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool::server {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// 2 layers, 1 head of 4, 4 tokens per block, fp16: segments of 32 bytes, blocks of 128 bytes
// (stored raw: 4 encoded segments of 64 header + 32 payload bytes = 384 bytes).
KvSpec SmallSpec(const std::string& model = "test-model", uint32_t tokens_per_block = 4) {
  KvSpec spec;
  spec.model_id = model;
  spec.num_layers = 2;
  spec.num_kv_heads = 1;
  spec.head_dim = 4;
  spec.dtype = DType::kFp16;
  spec.tokens_per_block = tokens_per_block;
  return spec;
}
// What one block occupies in the store (its capacity counts encoded bytes).
constexpr uint64_t kBlockBytes = 4 * (kSegmentHeaderBytes + 32);

BlockKey Key(uint32_t i) {
  const uint32_t token = i;
  return ChainBlockKey(RootBlockKey(), absl::MakeConstSpan(&token, 1));
}

std::vector<BlockKey> Keys(std::initializer_list<uint32_t> ids) {
  std::vector<BlockKey> keys;
  for (uint32_t i : ids) keys.push_back(Key(i));
  return keys;
}

// Deterministic content for (key id, version): seeded bytes, different for every pair.
std::string Content(const KvSpec& spec, uint32_t id, uint32_t version = 0) {
  std::mt19937 rng(id * 7919u + version * 104729u + 1);
  std::string bytes(spec.BlockBytes(), '\0');
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  return bytes;
}

// The block of `bytes` (canonical layout) as raw-codec encoded segments.
std::shared_ptr<StoredBlock> MakeBlock(const KvSpec& spec, const std::string& bytes) {
  EXPECT_EQ(bytes.size(), spec.BlockBytes());
  SegmentShape shape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim, spec.dtype};
  std::vector<std::string> segments;
  for (uint64_t s = 0; s < spec.SegmentsPerBlock(); ++s) {
    shape.kind = s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue;
    const uint16_t* elements = reinterpret_cast<const uint16_t*>(bytes.data()) + s * shape.Elements();
    auto encoded = kernels::EncodeSegment(CodecParams{CodecId::kRaw}, shape,
                                          {elements, shape.Elements()}, kernels::Path::kRef);
    EXPECT_TRUE(encoded.ok()) << encoded.status();
    segments.push_back(*encoded);
  }
  return StoredBlock::FromSegments(std::move(segments), spec.BlockBytes());
}

// The canonical bytes of a stored block (its raw segments' payloads, back to back).
std::string BytesOf(const StoredBlock& block) {
  std::string out;
  for (size_t s = 0; s < block.num_segments(); ++s) {
    out += std::string(block.segment(s).substr(kSegmentHeaderBytes));
  }
  return out;
}

// Flips bits of byte `offset` of the block's canonical bytes, inside its stored segment.
void Corrupt(const StoredBlock& block, uint64_t offset, uint8_t mask) {
  const uint64_t per_segment = block.segment(0).size() - kSegmentHeaderBytes;
  auto& segment = const_cast<std::string&>(block.refs()[offset / per_segment].segment->bytes);
  segment[kSegmentHeaderBytes + offset % per_segment] ^= mask;
}

// Blocks for `ids` with Content(id, version).
std::vector<std::shared_ptr<StoredBlock>> Blocks(const KvSpec& spec,
                                                 std::initializer_list<uint32_t> ids,
                                                 uint32_t version = 0) {
  std::vector<std::shared_ptr<StoredBlock>> blocks;
  for (uint32_t i : ids) blocks.push_back(MakeBlock(spec, Content(spec, i, version)));
  return blocks;
}

std::unique_ptr<BlockStore> MakeStore(uint64_t capacity_blocks) {
  auto store = BlockStore::Create({capacity_blocks * kBlockBytes});
  EXPECT_THAT(store, IsOk());
  return store.ok() ? std::move(*store) : nullptr;
}

class BlockStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(spec_.BlockBytes(), 128u);
    store_ = MakeStore(3);
    ASSERT_NE(store_, nullptr);
    auto ns = store_->RegisterNamespace(spec_);
    ASSERT_THAT(ns, IsOk());
    ns_ = *ns;
  }

  // Inserts ids (version 0) and expects success.
  BlockStore::InsertResult Put(std::initializer_list<uint32_t> ids, uint32_t version = 0) {
    std::vector<BlockKey> keys = Keys(ids);
    auto result = store_->Insert(ns_, keys, Blocks(spec_, ids, version));
    EXPECT_THAT(result, IsOk());
    return result.ok() ? *result : BlockStore::InsertResult{};
  }

  std::vector<bool> Has(std::initializer_list<uint32_t> ids) {
    return store_->Contains(ns_, Keys(ids));
  }

  const KvSpec spec_ = SmallSpec();
  std::unique_ptr<BlockStore> store_;
  NamespaceId ns_ = 0;
};

TEST(BlockStoreCreateTest, ZeroCapacityIsInvalidArgument) {
  EXPECT_THAT(BlockStore::Create({0}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(BlockStoreCreateTest, EmptyStats) {
  auto store = MakeStore(5);
  ASSERT_NE(store, nullptr);
  const BlockStore::Stats stats = store->GetStats();
  EXPECT_EQ(stats.blocks, 0u);
  EXPECT_EQ(stats.stored_bytes, 0u);
  EXPECT_EQ(stats.logical_bytes, 0u);
  EXPECT_EQ(stats.capacity_bytes, 5 * kBlockBytes);
  EXPECT_EQ(stats.evictions, 0u);
  EXPECT_EQ(stats.namespaces, 0u);
}

TEST(BlockStoreNamespaceTest, RegisterAndFind) {
  auto store = MakeStore(4);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->FindNamespace("test-model", 4), std::nullopt);

  auto a = store->RegisterNamespace(SmallSpec("test-model", 4));
  auto b = store->RegisterNamespace(SmallSpec("test-model", 8));  // Other block size.
  auto c = store->RegisterNamespace(SmallSpec("other-model", 4));
  auto a_again = store->RegisterNamespace(SmallSpec("test-model", 4));
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(c, IsOk());
  ASSERT_THAT(a_again, IsOk());
  EXPECT_EQ(*a_again, *a);
  EXPECT_NE(*a, *b);
  EXPECT_NE(*a, *c);
  EXPECT_NE(*b, *c);
  EXPECT_EQ(store->GetStats().namespaces, 3u);

  auto found = store->FindNamespace("test-model", 8);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->first, *b);
  EXPECT_EQ(found->second, SmallSpec("test-model", 8));
  EXPECT_EQ(store->FindNamespace("test-model", 16), std::nullopt);
  EXPECT_EQ(store->FindNamespace("missing", 4), std::nullopt);
}

TEST(BlockStoreNamespaceTest, ConflictingSpecNamesBoth) {
  auto store = MakeStore(4);
  ASSERT_NE(store, nullptr);
  const KvSpec registered = SmallSpec();
  ASSERT_THAT(store->RegisterNamespace(registered), IsOk());
  KvSpec conflicting = registered;
  conflicting.num_layers = 3;
  EXPECT_THAT(store->RegisterNamespace(conflicting),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr(registered.DebugString()),
                                        HasSubstr(conflicting.DebugString()))));
  conflicting = registered;
  conflicting.dtype = DType::kBf16;
  EXPECT_THAT(store->RegisterNamespace(conflicting),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype=bf16")));
  // The registered spec is unchanged.
  auto found = store->FindNamespace(registered.model_id, registered.tokens_per_block);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->second, registered);
  EXPECT_EQ(store->GetStats().namespaces, 1u);
}

TEST_F(BlockStoreTest, InsertContainsGetByteExact) {
  const BlockStore::InsertResult r = Put({1, 2, 3});
  EXPECT_EQ(r.stored, 3u);
  EXPECT_EQ(r.already_present, 0u);
  EXPECT_EQ(r.evicted, 0u);
  EXPECT_EQ(r.evicted_bytes, 0u);

  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(true, true, true, false));
  std::vector<StoredBlockPtr> got = store_->Get(ns_, Keys({3, 4, 1}));
  ASSERT_EQ(got.size(), 3u);
  ASSERT_NE(got[0], nullptr);
  EXPECT_EQ(got[1], nullptr);
  ASSERT_NE(got[2], nullptr);
  EXPECT_EQ(BytesOf(*got[0]), Content(spec_, 3));
  EXPECT_EQ(BytesOf(*got[2]), Content(spec_, 1));
  EXPECT_THAT(got[0]->Verify(), IsOk());

  const BlockStore::Stats stats = store_->GetStats();
  EXPECT_EQ(stats.blocks, 3u);
  EXPECT_EQ(stats.stored_bytes, 3 * kBlockBytes);
  EXPECT_EQ(stats.logical_bytes, 3 * spec_.BlockBytes());
  EXPECT_EQ(stats.evictions, 0u);
}

TEST_F(BlockStoreTest, EmptyRequests) {
  EXPECT_TRUE(store_->Contains(ns_, {}).empty());
  EXPECT_TRUE(store_->Get(ns_, {}).empty());
  EXPECT_EQ(store_->Delete(ns_, {}), 0u);
  auto r = store_->Insert(ns_, {}, {});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->stored, 0u);
}

TEST_F(BlockStoreTest, NamespacesAreSeparate) {
  auto other = store_->RegisterNamespace(SmallSpec("other-model"));
  ASSERT_THAT(other, IsOk());
  Put({1});
  EXPECT_THAT(store_->Contains(*other, Keys({1})), ElementsAre(false));
  EXPECT_EQ(store_->Get(*other, Keys({1}))[0], nullptr);
  EXPECT_EQ(store_->Delete(*other, Keys({1})), 0u);
  EXPECT_THAT(Has({1}), ElementsAre(true));

  // The same key in the other namespace is a separate block.
  auto r = store_->Insert(*other, Keys({1}), Blocks(spec_, {1}, /*version=*/5));
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->stored, 1u);
  EXPECT_EQ(BytesOf(*store_->Get(*other, Keys({1}))[0]), Content(spec_, 1, 5));
  EXPECT_EQ(BytesOf(*store_->Get(ns_, Keys({1}))[0]), Content(spec_, 1, 0));
  EXPECT_EQ(store_->GetStats().blocks, 2u);
}

TEST_F(BlockStoreTest, AlreadyPresentKeysKeepTheirBlock) {
  Put({1, 2});
  const StoredBlockPtr original = store_->Get(ns_, Keys({2}))[0];
  ASSERT_NE(original, nullptr);

  const BlockStore::InsertResult r = Put({2, 3}, /*version=*/9);
  EXPECT_EQ(r.stored, 1u);
  EXPECT_EQ(r.already_present, 1u);
  EXPECT_EQ(r.evicted, 0u);
  const std::vector<StoredBlockPtr> got = store_->Get(ns_, Keys({2, 3}));
  EXPECT_EQ(got[0], original);
  EXPECT_EQ(BytesOf(*got[0]), Content(spec_, 2, 0));
  EXPECT_EQ(BytesOf(*got[1]), Content(spec_, 3, 9));
  EXPECT_EQ(store_->GetStats().blocks, 3u);
}

TEST_F(BlockStoreTest, RepeatedKeyInOneBatchIsStoredOnce) {
  const BlockStore::InsertResult r = Put({7, 7, 7});
  EXPECT_EQ(r.stored, 1u);
  EXPECT_EQ(r.already_present, 2u);
  EXPECT_EQ(store_->GetStats().blocks, 1u);
  EXPECT_EQ(store_->GetStats().stored_bytes, kBlockBytes);
}

TEST_F(BlockStoreTest, MismatchedKeysAndBlocksFailAndChangeNothing) {
  EXPECT_FALSE(store_->Insert(ns_, Keys({1, 2}), Blocks(spec_, {1})).ok());
  EXPECT_EQ(store_->GetStats().blocks, 0u);
}

TEST_F(BlockStoreTest, FillsToExactCapacityWithoutEviction) {
  const BlockStore::InsertResult r = Put({1, 2, 3});  // Capacity is exactly 3 blocks.
  EXPECT_EQ(r.evicted, 0u);
  const BlockStore::Stats stats = store_->GetStats();
  EXPECT_EQ(stats.stored_bytes, stats.capacity_bytes);
  EXPECT_EQ(stats.evictions, 0u);
}

TEST_F(BlockStoreTest, EvictsLeastRecentlyUsed) {
  Put({1});
  Put({2});
  Put({3});
  // One more than capacity: 1 is the least recently used.
  BlockStore::InsertResult r = Put({4});
  EXPECT_EQ(r.stored, 1u);
  EXPECT_EQ(r.evicted, 1u);
  EXPECT_EQ(r.evicted_bytes, kBlockBytes);
  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(false, true, true, true));
  EXPECT_EQ(store_->GetStats().evictions, 1u);
  EXPECT_EQ(store_->GetStats().stored_bytes, 3 * kBlockBytes);
}

TEST_F(BlockStoreTest, GetRefreshesRecency) {
  Put({1});
  Put({2});
  Put({3});
  ASSERT_NE(store_->Get(ns_, Keys({1}))[0], nullptr);  // Order now (old to new): 2, 3, 1.
  Put({4});
  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(true, false, true, true));
  Put({5});
  EXPECT_THAT(Has({1, 3, 4, 5}), ElementsAre(true, false, true, true));
  Put({6});
  EXPECT_THAT(Has({1, 4, 5, 6}), ElementsAre(false, true, true, true));
  EXPECT_EQ(store_->GetStats().evictions, 3u);
}

TEST_F(BlockStoreTest, GetMissDoesNotRefreshAndContainsDoesNotRefresh) {
  Put({1});
  Put({2});
  Put({3});
  EXPECT_THAT(Has({1}), ElementsAre(true));  // No effect on recency.
  EXPECT_EQ(store_->Get(ns_, Keys({9}))[0], nullptr);
  Put({4});
  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(false, true, true, true));
}

TEST_F(BlockStoreTest, ReinsertingAPresentKeyRefreshesIt) {
  Put({1});
  Put({2});
  Put({3});
  const BlockStore::InsertResult again = Put({1});
  EXPECT_EQ(again.already_present, 1u);
  EXPECT_EQ(again.stored, 0u);
  Put({4});
  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(true, false, true, true));
}

TEST_F(BlockStoreTest, PresentKeysOfABatchAreNotEvictedForItsNewKeys) {
  Put({1});
  Put({2});
  Put({3});
  // 1 is the least recently used, but it is part of the batch: 2 and 3 go instead.
  const BlockStore::InsertResult r = Put({1, 4, 5});
  EXPECT_EQ(r.already_present, 1u);
  EXPECT_EQ(r.stored, 2u);
  EXPECT_EQ(r.evicted, 2u);
  EXPECT_EQ(r.evicted_bytes, 2 * kBlockBytes);
  EXPECT_THAT(Has({1, 2, 3, 4, 5}), ElementsAre(true, false, false, true, true));
}

TEST_F(BlockStoreTest, BatchLargerThanCapacityIsResourceExhaustedAndChangesNothing) {
  Put({1});
  Put({2});
  const BlockStore::Stats before = store_->GetStats();
  const std::vector<BlockKey> keys = Keys({10, 11, 12, 13});
  EXPECT_THAT(store_->Insert(ns_, keys, Blocks(spec_, {10, 11, 12, 13})),
              StatusIs(absl::StatusCode::kResourceExhausted));
  // Present keys do not count towards the new bytes, but 4 new blocks never fit in 3.
  EXPECT_THAT(store_->Insert(ns_, Keys({1, 10, 11, 12, 13}), Blocks(spec_, {1, 10, 11, 12, 13})),
              StatusIs(absl::StatusCode::kResourceExhausted));
  const BlockStore::Stats after = store_->GetStats();
  EXPECT_EQ(after.blocks, before.blocks);
  EXPECT_EQ(after.stored_bytes, before.stored_bytes);
  EXPECT_EQ(after.evictions, before.evictions);
  EXPECT_THAT(Has({1, 2, 10, 11, 12, 13}), ElementsAre(true, true, false, false, false, false));
  // Recency is unchanged too: the failed batch did not refresh 1, so it is still evicted first.
  Put({3});
  Put({4});
  EXPECT_THAT(Has({1, 2, 3, 4}), ElementsAre(false, true, true, true));
}

TEST_F(BlockStoreTest, BatchOfExactlyCapacityEvictsEverythingElse) {
  Put({1, 2});
  const BlockStore::InsertResult r = Put({3, 4, 5});
  EXPECT_EQ(r.stored, 3u);
  EXPECT_EQ(r.evicted, 2u);
  EXPECT_THAT(Has({1, 2, 3, 4, 5}), ElementsAre(false, false, true, true, true));
}

TEST_F(BlockStoreTest, DeleteCounts) {
  Put({1, 2, 3});
  EXPECT_EQ(store_->Delete(ns_, Keys({2, 9, 2})), 1u);
  EXPECT_THAT(Has({1, 2, 3}), ElementsAre(true, false, true));
  EXPECT_EQ(store_->GetStats().blocks, 2u);
  EXPECT_EQ(store_->GetStats().stored_bytes, 2 * kBlockBytes);
  EXPECT_EQ(store_->GetStats().evictions, 0u);  // Deletes are not evictions.
  EXPECT_EQ(store_->Delete(ns_, Keys({1, 3})), 2u);
  EXPECT_EQ(store_->GetStats().blocks, 0u);
  EXPECT_EQ(store_->GetStats().stored_bytes, 0u);
  // The freed room is usable without evictions.
  const BlockStore::InsertResult r = Put({4, 5, 6});
  EXPECT_EQ(r.evicted, 0u);
}

TEST_F(BlockStoreTest, GotBlockOutlivesEvictionAndDeletion) {
  Put({1, 2});
  StoredBlockPtr held = store_->Get(ns_, Keys({1}))[0];
  ASSERT_NE(held, nullptr);
  StoredBlockPtr deleted = store_->Get(ns_, Keys({2}))[0];
  ASSERT_NE(deleted, nullptr);
  ASSERT_EQ(store_->Delete(ns_, Keys({2})), 1u);
  Put({3, 4, 5});  // Evicts 1.
  ASSERT_THAT(Has({1}), ElementsAre(false));
  EXPECT_EQ(held.use_count(), 1);  // Only this test holds it now.
  EXPECT_EQ(BytesOf(*held), Content(spec_, 1));
  EXPECT_THAT(held->Verify(), IsOk());
  EXPECT_EQ(BytesOf(*deleted), Content(spec_, 2));
  // Capacity counts only indexed blocks.
  EXPECT_EQ(store_->GetStats().stored_bytes, 3 * kBlockBytes);
}

TEST(StoredBlockTest, SizeAndSeal) {
  const KvSpec spec = SmallSpec();
  auto block = MakeBlock(spec, Content(spec, 1));
  EXPECT_EQ(block->referenced_bytes(), kBlockBytes);
  EXPECT_EQ(block->logical_bytes(), spec.BlockBytes());
  EXPECT_EQ(block->num_segments(), 4u);
  EXPECT_FALSE(block->scaled());
  for (const SegmentRef& r : block->refs()) EXPECT_EQ(r.segment->codec, CodecId::kRaw);
  EXPECT_THAT(block->Verify(), IsOk());
}

TEST(StoredBlockTest, VerifyNamesTheCorruptSegment) {
  const KvSpec spec = SmallSpec();  // 4 segments of 32 bytes: L0 K, L0 V, L1 K, L1 V.
  StoredBlockPtr block = MakeBlock(spec, Content(spec, 1));
  struct Case {
    size_t offset;
    std::string segment;
  };
  for (const Case& c : {Case{0, "segment 0 (layer 0 K)"}, Case{31, "segment 0 (layer 0 K)"},
                        Case{32, "segment 1 (layer 0 V)"}, Case{70, "segment 2 (layer 1 K)"},
                        Case{127, "segment 3 (layer 1 V)"}}) {
    Corrupt(*block, c.offset, 0x01);
    EXPECT_THAT(block->Verify(), StatusIs(absl::StatusCode::kDataLoss, HasSubstr(c.segment)))
        << "offset " << c.offset;
    Corrupt(*block, c.offset, 0x01);
    EXPECT_THAT(block->Verify(), IsOk());
  }
  // Two corrupt segments: the first is named.
  Corrupt(*block, 100, 0x80);
  Corrupt(*block, 40, 0x80);
  EXPECT_THAT(block->Verify(), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("segment 1 ")));
}

TEST_F(BlockStoreTest, DropRemovesOnlyTheSameBlock) {
  Put({1, 2});
  const StoredBlockPtr stored = store_->Get(ns_, Keys({1}))[0];
  ASSERT_NE(stored, nullptr);
  const StoredBlockPtr other = MakeBlock(spec_, Content(spec_, 1));  // Same bytes, other block.
  store_->Drop(ns_, Key(1), other.get());
  EXPECT_THAT(Has({1}), ElementsAre(true));
  store_->Drop(ns_, Key(1), nullptr);
  EXPECT_THAT(Has({1}), ElementsAre(true));
  auto other_ns = store_->RegisterNamespace(SmallSpec("other-model"));
  ASSERT_THAT(other_ns, IsOk());
  store_->Drop(*other_ns, Key(1), stored.get());  // Wrong namespace.
  EXPECT_THAT(Has({1}), ElementsAre(true));

  store_->Drop(ns_, Key(1), stored.get());
  EXPECT_THAT(Has({1, 2}), ElementsAre(false, true));
  EXPECT_EQ(store_->GetStats().blocks, 1u);
  EXPECT_EQ(store_->GetStats().stored_bytes, kBlockBytes);
  store_->Drop(ns_, Key(1), stored.get());  // Already gone: no effect.
  EXPECT_EQ(store_->GetStats().blocks, 1u);
}

TEST_F(BlockStoreTest, DropAfterCorruptionThenReinsert) {
  Put({1});
  StoredBlockPtr got = store_->Get(ns_, Keys({1}))[0];
  ASSERT_NE(got, nullptr);
  Corrupt(*got, 5, 0xff);
  const absl::Status status = got->Verify();
  ASSERT_THAT(status, StatusIs(absl::StatusCode::kDataLoss, HasSubstr("segment 0")));
  store_->Drop(ns_, Key(1), got.get());
  EXPECT_THAT(Has({1}), ElementsAre(false));
  const BlockStore::InsertResult r = Put({1});
  EXPECT_EQ(r.stored, 1u);
  EXPECT_THAT(store_->Get(ns_, Keys({1}))[0]->Verify(), IsOk());
}

// Regression: a batch's keys that are already stored must not be evicted to make room for the
// batch's new keys (they used to be, then re-added, leaving 3 blocks in a 2-block tier). When
// kept + new blocks exceed the capacity the insert is ResourceExhausted and changes nothing.
TEST(BlockStoreInsertTest, BatchWithPresentKeysNeverExceedsCapacity) {
  const KvSpec spec = SmallSpec();
  auto store = MakeStore(2);
  ASSERT_NE(store, nullptr);
  auto ns = store->RegisterNamespace(spec);
  ASSERT_THAT(ns, IsOk());
  ASSERT_THAT(store->Insert(*ns, Keys({1}), Blocks(spec, {1})), IsOk());
  auto r = store->Insert(*ns, Keys({1, 2, 3}), Blocks(spec, {1, 2, 3}));
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(store->Contains(*ns, Keys({1}))[0]);
  const BlockStore::Stats stats = store->GetStats();
  EXPECT_LE(stats.stored_bytes, stats.capacity_bytes);
  EXPECT_LE(stats.blocks, 2u);
}

// A reference model of the documented behaviour: an LRU list (front = most recent) and the
// bytes stored for each key. Insert refreshes the batch's present keys (in batch order), evicts
// from the back until the new blocks fit (never taking the batch's own keys), then adds the new keys in batch order; Get refreshes
// hits in request order. A batch whose stored plus new keys exceed the capacity fails and
// changes nothing.
class LruModel {
 public:
  explicit LruModel(uint64_t capacity_blocks) : capacity_(capacity_blocks) {}

  struct Result {
    bool ok = true;
    uint32_t stored = 0, already_present = 0, evicted = 0;
  };

  Result Insert(const std::vector<uint32_t>& ids, const std::vector<std::string>& bytes) {
    Result r;
    std::vector<uint32_t> fresh;
    std::vector<uint32_t> kept;
    for (uint32_t id : ids) {
      std::vector<uint32_t>& list = data_.count(id) ? kept : fresh;
      if (std::find(list.begin(), list.end(), id) == list.end()) list.push_back(id);
    }
    // The batch's stored keys stay; with the new ones they must fit, or nothing changes.
    if (fresh.size() + kept.size() > capacity_) return Result{false};
    for (uint32_t id : ids) {
      if (data_.count(id)) Touch(id);
    }
    while (data_.size() + fresh.size() > capacity_ && !lru_.empty()) {
      data_.erase(lru_.back());
      lru_.pop_back();
      ++r.evicted;
      ++evictions_;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      if (data_.count(ids[i])) {
        ++r.already_present;
        continue;
      }
      data_[ids[i]] = bytes[i];
      lru_.push_front(ids[i]);
      ++r.stored;
    }
    return r;
  }

  // The bytes of each id, or nullopt for a miss; hits become most recent.
  std::vector<std::optional<std::string>> Get(const std::vector<uint32_t>& ids) {
    std::vector<std::optional<std::string>> out;
    for (uint32_t id : ids) {
      auto it = data_.find(id);
      if (it == data_.end()) {
        out.push_back(std::nullopt);
        continue;
      }
      Touch(id);
      out.push_back(it->second);
    }
    return out;
  }

  uint32_t Delete(const std::vector<uint32_t>& ids) {
    uint32_t n = 0;
    for (uint32_t id : ids) {
      if (data_.erase(id)) {
        lru_.remove(id);
        ++n;
      }
    }
    return n;
  }

  bool Contains(uint32_t id) const { return data_.count(id) > 0; }
  size_t size() const { return data_.size(); }
  uint64_t evictions() const { return evictions_; }

 private:
  void Touch(uint32_t id) {
    lru_.remove(id);
    lru_.push_front(id);
  }

  const uint64_t capacity_;
  std::list<uint32_t> lru_;
  std::map<uint32_t, std::string> data_;
  uint64_t evictions_ = 0;
};

// Runs `ops` seeded random operations over `num_keys` keys with batches of 1..max_batch keys,
// comparing every result with the model.
void RunAgainstModel(uint32_t seed, int ops, uint32_t num_keys, uint32_t capacity_blocks,
                     uint32_t max_batch) {
  const KvSpec spec = SmallSpec();
  auto store = MakeStore(capacity_blocks);
  ASSERT_NE(store, nullptr);
  auto ns = store->RegisterNamespace(spec);
  ASSERT_THAT(ns, IsOk());
  LruModel model(capacity_blocks);
  std::mt19937 rng(seed);
  auto uniform = [&rng](uint32_t lo, uint32_t hi) {
    return std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
  };
  uint32_t version = 0;
  int hits = 0;
  int evictions_seen = 0;
  for (int op = 0; op < ops; ++op) {
    std::vector<uint32_t> ids(uniform(1, max_batch));
    for (uint32_t& id : ids) id = uniform(0, num_keys - 1);
    std::vector<BlockKey> keys;
    for (uint32_t id : ids) keys.push_back(Key(id));
    const uint32_t kind = uniform(0, 9);
    SCOPED_TRACE(absl::StrCat("seed ", seed, " op ", op, " kind ", kind));
    if (kind < 4) {  // Insert, each block with fresh content.
      std::vector<std::string> bytes;
      std::vector<std::shared_ptr<StoredBlock>> blocks;
      for (uint32_t id : ids) {
        bytes.push_back(Content(spec, id, ++version));
        blocks.push_back(MakeBlock(spec, bytes.back()));
      }
      const LruModel::Result want = model.Insert(ids, bytes);
      auto got = store->Insert(*ns, keys, std::move(blocks));
      if (!want.ok) {
        ASSERT_THAT(got, StatusIs(absl::StatusCode::kResourceExhausted));
      } else {
        ASSERT_THAT(got, IsOk());
        ASSERT_EQ(got->stored, want.stored);
        ASSERT_EQ(got->already_present, want.already_present);
        ASSERT_EQ(got->evicted, want.evicted);
        ASSERT_EQ(got->evicted_bytes, want.evicted * kBlockBytes);
        evictions_seen += want.evicted;
      }
    } else if (kind < 8) {  // Get.
      const auto want = model.Get(ids);
      const std::vector<StoredBlockPtr> got = store->Get(*ns, keys);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(got[i] != nullptr, want[i].has_value()) << "key " << ids[i];
        if (got[i] == nullptr) continue;
        ++hits;
        ASSERT_EQ(BytesOf(*got[i]), *want[i]) << "key " << ids[i];
        ASSERT_THAT(got[i]->Verify(), IsOk());
      }
    } else {  // Delete.
      ASSERT_EQ(store->Delete(*ns, keys), model.Delete(ids));
    }
    const BlockStore::Stats stats = store->GetStats();
    ASSERT_LE(stats.stored_bytes, stats.capacity_bytes);
    ASSERT_EQ(stats.blocks, model.size());
    ASSERT_EQ(stats.stored_bytes, model.size() * kBlockBytes);
    ASSERT_EQ(stats.evictions, model.evictions());
  }
  // The full key space agrees at the end.
  std::vector<BlockKey> all;
  for (uint32_t id = 0; id < num_keys; ++id) all.push_back(Key(id));
  const std::vector<bool> present = store->Contains(*ns, all);
  for (uint32_t id = 0; id < num_keys; ++id) EXPECT_EQ(present[id], model.Contains(id)) << id;
  // The run exercised what it is meant to.
  EXPECT_GT(hits, ops / 20);
  EXPECT_GT(evictions_seen, ops / 20);
}

TEST(BlockStoreRandomTest, MatchesReferenceLruModel) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    RunAgainstModel(seed, /*ops=*/2000, /*num_keys=*/50, /*capacity_blocks=*/10, /*max_batch=*/3);
    if (HasFatalFailure()) return;
  }
}

// Batches larger than half the capacity: the case where a batch's stored keys used to be
// evicted and re-added past the capacity (regression for BatchWithPresentKeysNeverExceedsCapacity).
TEST(BlockStoreRandomTest, MatchesReferenceLruModelWithLargeBatches) {
  RunAgainstModel(/*seed=*/4, /*ops=*/2000, /*num_keys=*/50, /*capacity_blocks=*/10,
                  /*max_batch=*/14);
}

// 8 threads insert, get, check and delete random keys at once. Each key always gets the same
// content, so any hit can be checked byte for byte; the index and the byte accounting must
// agree at the end.
TEST(BlockStoreConcurrencyTest, ConsistentUnderConcurrentUse) {
  const KvSpec spec = SmallSpec();
  constexpr uint32_t kKeys = 64;
  constexpr uint64_t kCapacityBlocks = 16;
  auto store = MakeStore(kCapacityBlocks);
  ASSERT_NE(store, nullptr);
  auto ns = store->RegisterNamespace(spec);
  ASSERT_THAT(ns, IsOk());
  std::vector<std::string> content;
  for (uint32_t id = 0; id < kKeys; ++id) content.push_back(Content(spec, id));

  constexpr int kThreads = 8;
  constexpr int kOpsPerThread = 3000;
  std::vector<int> bad_hits(kThreads, 0);
  std::vector<int> hits(kThreads, 0);
  std::vector<int> failed_ops(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      auto uniform = [&rng](uint32_t lo, uint32_t hi) {
        return std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
      };
      for (int op = 0; op < kOpsPerThread; ++op) {
        std::vector<uint32_t> ids(uniform(1, 3));
        std::vector<BlockKey> keys;
        for (uint32_t& id : ids) {
          id = uniform(0, kKeys - 1);
          keys.push_back(Key(id));
        }
        const uint32_t kind = uniform(0, 9);
        if (kind < 4) {
          std::vector<std::shared_ptr<StoredBlock>> blocks;
          for (uint32_t id : ids) blocks.push_back(MakeBlock(spec, content[id]));
          if (!store->Insert(*ns, keys, std::move(blocks)).ok()) ++failed_ops[t];
        } else if (kind < 8) {
          const std::vector<StoredBlockPtr> got = store->Get(*ns, keys);
          for (size_t i = 0; i < got.size(); ++i) {
            if (got[i] == nullptr) continue;
            ++hits[t];
            if (BytesOf(*got[i]) != content[ids[i]] || !got[i]->Verify().ok()) ++bad_hits[t];
          }
        } else if (kind < 9) {
          store->Delete(*ns, keys);
        } else {
          store->Contains(*ns, keys);
          store->GetStats();
          if (!store->RegisterNamespace(spec).ok()) ++failed_ops[t];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();

  int total_hits = 0;
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(bad_hits[t], 0) << "thread " << t;
    EXPECT_EQ(failed_ops[t], 0) << "thread " << t;
    total_hits += hits[t];
  }
  EXPECT_GT(total_hits, 0);

  std::vector<BlockKey> all;
  for (uint32_t id = 0; id < kKeys; ++id) all.push_back(Key(id));
  const std::vector<bool> present = store->Contains(*ns, all);
  const uint64_t present_count = std::count(present.begin(), present.end(), true);
  const BlockStore::Stats stats = store->GetStats();
  EXPECT_EQ(stats.blocks, present_count);
  EXPECT_EQ(stats.stored_bytes, stats.blocks * kBlockBytes);
  EXPECT_EQ(stats.logical_bytes, stats.blocks * spec.BlockBytes());
  EXPECT_LE(stats.stored_bytes, stats.capacity_bytes);
  EXPECT_EQ(stats.namespaces, 1u);
  // Every present key still reads back exactly.
  const std::vector<StoredBlockPtr> got = store->Get(*ns, all);
  for (uint32_t id = 0; id < kKeys; ++id) {
    ASSERT_EQ(got[id] != nullptr, static_cast<bool>(present[id])) << id;
    if (got[id] != nullptr) EXPECT_EQ(BytesOf(*got[id]), content[id]) << id;
  }
}

}  // namespace
}  // namespace kvpool::server
