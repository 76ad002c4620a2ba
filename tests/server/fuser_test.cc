// Tests for server/store/fuser.h with the content-addressed BlockStore: every block read back
// with fusion on is within the budget of what was put (thousands of blocks, related and
// unrelated), identical segments are stored once, unrelated blocks share nothing, and a seeded
// random mix of puts, gets, deletes and evictions keeps the store consistent with a model.
#include "server/store/fuser.h"

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/synthetic.h"
#include "common/block_key.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/device.h"
#include "kernels/fusion.h"
#include "tests/util/status_matchers.h"

namespace kvpool::server {
namespace {

using ::kvpool::testing::IsOk;

// 6 layers (fusion skips 0, 1, 4, 5 by default), 2 heads of 16, 16 tokens: 512-element segments.
KvSpec Spec() {
  KvSpec spec;
  spec.model_id = "fusion-test";
  spec.num_layers = 6;
  spec.num_kv_heads = 2;
  spec.head_dim = 16;
  spec.tokens_per_block = 16;
  spec.dtype = DType::kFp16;
  return spec;
}

client::CorpusOptions Corpus(const KvSpec& spec, uint32_t blocks, uint32_t families,
                             float variation, uint64_t seed) {
  client::CorpusOptions o;
  o.shape = client::SyntheticShape(spec);
  o.blocks = blocks;
  o.families = families;
  o.variation = variation;
  o.seed = seed;
  return o;
}

BlockKey Key(uint32_t i) { return ChainBlockKey(RootBlockKey(), absl::MakeConstSpan(&i, 1)); }

absl::Span<const uint16_t> Elements(const std::string& block) {
  return {reinterpret_cast<const uint16_t*>(block.data()), block.size() / 2};
}

// What a reader gets for segment s of `block`: decoded, then scaled.
std::vector<uint16_t> ReadSegment(const KvSpec& spec, const StoredBlock& block, size_t s) {
  const SegmentShape shape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim, spec.dtype,
                           s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue};
  std::vector<uint16_t> out(shape.Elements());
  EXPECT_THAT(kernels::DecodeSegment(block.segment(s), absl::MakeSpan(out), kernels::Path::kCpu,
                                     &shape),
              IsOk());
  kernels::ScaleElements(spec.dtype, absl::MakeSpan(out), block.scale(s), kernels::Path::kCpu);
  return out;
}

double RelError(absl::Span<const uint16_t> got, absl::Span<const uint16_t> want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double a = Fp16ToFloat(got[i]), b = Fp16ToFloat(want[i]);
    err += (a - b) * (a - b);
    ref += b * b;
  }
  return ref > 0 ? std::sqrt(err / ref) : (err > 0 ? INFINITY : 0);
}

struct Check {
  int violations = 0;
  int fused = 0;
  int segments = 0;
  double worst_fused = 0;
};

// Reads every key back and compares each segment with what was put: fused segments within
// `budget`, own segments within `own_budget` (0: byte-exact).
Check ReadBack(const KvSpec& spec, BlockStore* store, NamespaceId ns,
               const std::vector<std::string>& blocks, double budget, double own_budget) {
  Check c;
  const uint64_t n = uint64_t{spec.tokens_per_block} * spec.num_kv_heads * spec.head_dim;
  for (uint32_t b = 0; b < blocks.size(); ++b) {
    const BlockKey key = Key(b);
    StoredBlockPtr got = store->Get(ns, {&key, 1})[0];
    if (got == nullptr) continue;
    EXPECT_THAT(got->Verify(), IsOk());
    for (size_t s = 0; s < got->num_segments(); ++s) {
      const std::vector<uint16_t> read = ReadSegment(spec, *got, s);
      const double e = RelError(read, Elements(blocks[b]).subspan(s * n, n));
      ++c.segments;
      const bool fused = got->refs()[s].fused;
      if (fused) {
        ++c.fused;
        c.worst_fused = std::max(c.worst_fused, e);
      }
      if (e > (fused ? budget : own_budget) * (1 + 1e-9)) {
        ++c.violations;
        ADD_FAILURE() << "block " << b << " segment " << s << (fused ? " fused" : " own")
                      << " error " << e;
      }
    }
  }
  return c;
}

// Blocks from corpora of many degrees of sharing, interleaved: close families, families at
// and beyond the budget, and unrelated blocks.
std::vector<std::string> MixedCorpus(const KvSpec& spec, uint32_t per_corpus, uint64_t seed) {
  std::vector<std::vector<std::string>> corpora;
  const float variations[] = {0.005f, 0.02f, 0.04f, 0.05f, 0.06f, 0.1f, 0.3f};
  for (size_t v = 0; v < std::size(variations); ++v) {
    corpora.push_back(
        client::SyntheticCorpus(Corpus(spec, per_corpus, per_corpus / 8, variations[v], seed + v)));
  }
  corpora.push_back(client::SyntheticCorpus(Corpus(spec, per_corpus, per_corpus, 0, seed + 99)));
  std::vector<std::string> out;
  for (uint32_t i = 0; i < per_corpus; ++i) {
    for (auto& c : corpora) out.push_back(std::move(c[i]));
  }
  return out;
}

struct Ingested {
  std::unique_ptr<BlockStore> store;
  NamespaceId ns = 0;
};

Ingested Ingest(const EncodeContext& c, const std::vector<std::string>& blocks, size_t batch) {
  Ingested out;
  out.store = *BlockStore::Create({uint64_t{1} << 32});
  out.ns = *out.store->RegisterNamespace(c.spec);
  for (size_t first = 0; first < blocks.size(); first += batch) {
    const size_t n = std::min(batch, blocks.size() - first);
    std::vector<BlockKey> keys;
    std::vector<absl::Span<const uint16_t>> views;
    for (size_t i = first; i < first + n; ++i) {
      keys.push_back(Key(static_cast<uint32_t>(i)));
      views.push_back(Elements(blocks[i]));
    }
    std::vector<std::shared_ptr<StoredBlock>> encoded;
    if (c.fusion.mode == FusionOptions::Mode::kBatch) {
      auto e = EncodeBatch(c, views);
      EXPECT_THAT(e, IsOk());
      encoded = std::move(*e);
    } else {
      for (auto v : views) {
        auto e = EncodeBlock(c, out.store.get(), out.ns, v);
        EXPECT_THAT(e, IsOk());
        encoded.push_back(std::move(*e));
      }
    }
    EXPECT_THAT(out.store->Insert(out.ns, keys, std::move(encoded)), IsOk());
  }
  EXPECT_THAT(out.store->CheckInvariants(), IsOk());
  return out;
}

EncodeContext Context(FusionOptions::Mode mode, CodecParams codec = {CodecId::kRaw}) {
  EncodeContext c;
  c.spec = Spec();
  c.codec = *kernels::NormalizeParams(codec);
  c.fusion.mode = mode;
  c.fusion.threshold = 0.9;
  c.fusion.budget = 0.05;
  return c;
}

TEST(FuserTest, OnlineFusionStaysWithinBudgetOverThousandsOfBlocks) {
  const EncodeContext c = Context(FusionOptions::Mode::kOnline);
  const std::vector<std::string> blocks = MixedCorpus(c.spec, 320, 1);  // 2560 blocks.
  Ingested in = Ingest(c, blocks, 1);
  const Check check = ReadBack(c.spec, in.store.get(), in.ns, blocks, c.fusion.budget, 0);
  EXPECT_EQ(check.violations, 0);
  EXPECT_GT(check.fused, check.segments / 20);  // Fusion did happen (2 of 6 layers may fuse).
  EXPECT_LE(check.worst_fused, c.fusion.budget);
  const BlockStore::Stats s = in.store->GetStats();
  EXPECT_EQ(s.fused_refs, static_cast<uint64_t>(check.fused));
  EXPECT_LT(s.stored_bytes, s.logical_bytes);
}

TEST(FuserTest, BatchFusionStaysWithinBudgetOverThousandsOfBlocks) {
  const EncodeContext c = Context(FusionOptions::Mode::kBatch);
  const std::vector<std::string> blocks = MixedCorpus(c.spec, 256, 2);  // 2048 blocks.
  Ingested in = Ingest(c, blocks, 32);
  const Check check = ReadBack(c.spec, in.store.get(), in.ns, blocks, c.fusion.budget, 0);
  EXPECT_EQ(check.violations, 0);
  EXPECT_GT(check.fused, 0);
}

TEST(FuserTest, FusionOnTopOfALossyCodecStaysWithinBudget) {
  CodecParams kvpool{CodecId::kKvpool};
  kvpool.budget = 0.02f;
  for (auto mode : {FusionOptions::Mode::kOnline, FusionOptions::Mode::kBatch}) {
    const EncodeContext c = Context(mode, kvpool);
    const std::vector<std::string> blocks = MixedCorpus(c.spec, 40, 3);
    Ingested in = Ingest(c, blocks, 16);
    // Own segments keep the codec's bound; fused ones the fusion budget, codec error included.
    const Check check = ReadBack(c.spec, in.store.get(), in.ns, blocks, c.fusion.budget, 0.02);
    EXPECT_EQ(check.violations, 0);
    EXPECT_GT(check.fused, 0);
  }
}

// The put path hands each value segment its layer's keys, so the kvpool codec weights the
// value's tokens by them (a class map in the payload): the stored bytes are exactly
// EncodeSegment's with those keys.
TEST(FuserTest, ValueSegmentsAreEncodedWithTheirKeys) {
  CodecParams kvpool{CodecId::kKvpool};
  kvpool.budget = 0.05f;
  const EncodeContext c = Context(FusionOptions::Mode::kOff, kvpool);
  const std::vector<std::string> blocks = client::SyntheticCorpus(Corpus(c.spec, 4, 4, 0, 7));
  Ingested in = Ingest(c, blocks, 1);
  const uint64_t n = uint64_t{c.spec.tokens_per_block} * c.spec.num_kv_heads * c.spec.head_dim;
  const SegmentShape shape{c.spec.tokens_per_block, c.spec.num_kv_heads, c.spec.head_dim,
                           c.spec.dtype, SegmentKind::kValue};
  int weighted = 0;
  for (uint32_t b = 0; b < blocks.size(); ++b) {
    const BlockKey key = Key(b);
    StoredBlockPtr got = in.store->Get(in.ns, {&key, 1})[0];
    ASSERT_NE(got, nullptr);
    for (size_t s = 1; s < got->num_segments(); s += 2) {
      const absl::Span<const uint16_t> block = Elements(blocks[b]);
      auto want = kernels::EncodeSegment(c.codec, shape, block.subspan(s * n, n), c.path,
                                         block.subspan((s - 1) * n, n));
      ASSERT_THAT(want, IsOk());
      EXPECT_EQ(got->segment(s), *want) << "block " << b << " segment " << s;
      // The keys moved bits between tokens: the value differs from one encoded without them.
      auto alone = kernels::EncodeSegment(c.codec, shape, block.subspan(s * n, n), c.path);
      ASSERT_THAT(alone, IsOk());
      weighted += got->segment(s) != *alone;
    }
  }
  EXPECT_GT(weighted, 0);
}

// With the model's plan caches in the context, segment s of every block is coded through
// stream s's cache: the stored bytes are those of each segment encoded in put order through a
// PlanCache of its own per segment index, and every block after the first took its stream's
// plan (whether it kept it or replaced it: these 16-token segments often miss).
TEST(FuserTest, PutsCodeEachSegmentThroughItsStreamsPlanCache) {
  CodecParams kvpool{CodecId::kKvpool};
  kvpool.budget = 0.05f;
  EncodeContext c = Context(FusionOptions::Mode::kOff, kvpool);
  const uint64_t S = c.spec.SegmentsPerBlock();
  c.plans = std::make_shared<kernels::BlockPlans>(S, 32);
  EXPECT_EQ(c.plans->For(S), nullptr);
  const std::vector<std::string> blocks = client::SyntheticCorpus(Corpus(c.spec, 4, 4, 0, 7));
  Ingested in = Ingest(c, blocks, 1);
  const kernels::BlockPlans streams(S, 32);
  const uint64_t n = uint64_t{c.spec.tokens_per_block} * c.spec.num_kv_heads * c.spec.head_dim;
  for (uint32_t b = 0; b < blocks.size(); ++b) {
    const BlockKey key = Key(b);
    StoredBlockPtr got = in.store->Get(in.ns, {&key, 1})[0];
    ASSERT_NE(got, nullptr);
    const absl::Span<const uint16_t> block = Elements(blocks[b]);
    std::string keys_segment;
    for (uint64_t s = 0; s < S; ++s) {
      const bool value = s % 2 == 1;
      const SegmentShape shape{c.spec.tokens_per_block, c.spec.num_kv_heads, c.spec.head_dim,
                               c.spec.dtype, value ? SegmentKind::kValue : SegmentKind::kKey};
      auto want = kernels::EncodeSegment(
          c.codec, shape, block.subspan(s * n, n), c.path,
          value ? block.subspan((s - 1) * n, n) : absl::Span<const uint16_t>(),
          value ? absl::string_view(keys_segment) : absl::string_view(), streams.For(s));
      ASSERT_THAT(want, IsOk());
      EXPECT_EQ(got->segment(s), *want) << "block " << b << " segment " << s;
      if (!value) keys_segment = *want;
    }
  }
  for (uint64_t s = 0; s < S; ++s) {
    const kernels::PlanCache* cache = c.plans->For(s);
    EXPECT_EQ(cache->planned(), 1u) << s;
    EXPECT_EQ(cache->reused() + cache->replaced(), blocks.size() - 1) << s;
  }
}

// Which segments of every block are fused, as a string per block (for comparing two runs).
std::vector<std::string> FusedPattern(BlockStore* store, NamespaceId ns, size_t blocks) {
  std::vector<std::string> out;
  for (uint32_t b = 0; b < blocks; ++b) {
    const BlockKey key = Key(b);
    StoredBlockPtr got = store->Get(ns, {&key, 1})[0];
    std::string pattern;
    for (size_t s = 0; got != nullptr && s < got->num_segments(); ++s) {
      pattern += got->refs()[s].fused ? 'f' : '.';
    }
    out.push_back(pattern);
  }
  return out;
}

// With `device` set, the fuser runs sketches, checks and encodes on the GPU; without one (or
// when the GPU's self-check fails) it falls back to the host and decides exactly as the host.
TEST(FuserTest, DeviceContextDecidesAsTheHost) {
  for (auto mode : {FusionOptions::Mode::kOnline, FusionOptions::Mode::kBatch}) {
    CodecParams kvpool{CodecId::kKvpool};
    kvpool.budget = 0.02f;
    const EncodeContext host = Context(mode, kvpool);
    EncodeContext device = host;
    device.device = true;
    // Families well inside or well outside the threshold, so that rounding differences between
    // paths cannot flip a decision.
    std::vector<std::string> blocks = client::SyntheticCorpus(Corpus(host.spec, 48, 6, 0.01f, 21));
    for (auto& b : client::SyntheticCorpus(Corpus(host.spec, 16, 16, 0, 22))) blocks.push_back(b);
    Ingested a = Ingest(host, blocks, 4), b = Ingest(device, blocks, 4);
    EXPECT_EQ(FusedPattern(a.store.get(), a.ns, blocks.size()),
              FusedPattern(b.store.get(), b.ns, blocks.size()));
    const Check check = ReadBack(host.spec, b.store.get(), b.ns, blocks, host.fusion.budget, 0.02);
    EXPECT_EQ(check.violations, 0);
    EXPECT_GT(check.fused, 0);
  }
}

// gpu_encode: auto keeps kvpool's default and entropy profiles off the GPU (the entropy
// profile's GPU payload is mode 1; the default profile's is the host's mode 4 but untimed and
// without plan caches: codec.h); always sends every codec with a CUDA encoder there, the
// default profile where its encoder passed its self-check.
TEST(FuserTest, DeviceEncodeWantedOnlyWhereTheGpuKeepsTheProfile) {
  struct Case {
    CodecId codec;
    uint8_t flags;
    bool keeps;
  };
  const Case cases[] = {
      {CodecId::kRaw, 0, true},     {CodecId::kKivi, 0, true},
      {CodecId::kPackKv, 0, true},  {CodecId::kKvpool, kKvpoolFastProfile, true},
      {CodecId::kKvpool, 0, false}, {CodecId::kKvpool, kKvpoolEntropyProfile, false}};
  for (const Case& k : cases) {
    CodecParams p{k.codec};
    p.flags = k.flags;
    EXPECT_EQ(kernels::CudaEncoderKeepsProfile(p), k.keeps) << int(k.codec) << " " << int(k.flags);
    const bool built = kernels::GetCodecOps(k.codec).encode_cuda != nullptr;  // This build.
    EncodeContext c = Context(FusionOptions::Mode::kOff, p);
    for (bool has_kernel : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << int(k.codec) << " " << int(k.flags) << " " << has_kernel);
      c.device = false;
      c.device_any_profile = false;
      EXPECT_FALSE(DeviceEncodeWanted(c, has_kernel));  // No device in the context.
      EXPECT_FALSE(DeviceEncodeWanted(c));
      c.device = true;
      EXPECT_EQ(DeviceEncodeWanted(c, has_kernel), has_kernel && k.keeps);
      EXPECT_EQ(DeviceEncodeWanted(c), built && k.keeps);
      c.device_any_profile = true;
      // The default profile's GPU encoder only where its own self-check passed (never here
      // without a device).
      const bool usable = !IsKvpoolRowsMode(p) || kernels::SelfCheckCudaRowsEncoder().ok();
      EXPECT_EQ(DeviceEncodeWanted(c, has_kernel), has_kernel && usable);
      EXPECT_EQ(DeviceEncodeWanted(c), built && usable);
    }
  }
}

TEST(FuserTest, CudaFusionKernelsPassTheirSelfCheck) {
  if (kernels::DeviceCount() == 0) GTEST_SKIP() << kernels::DescribeDevices();
  EXPECT_TRUE(DeviceFusionUsable());
}

TEST(FuserTest, UnrelatedBlocksShareNothing) {
  for (auto mode : {FusionOptions::Mode::kOnline, FusionOptions::Mode::kBatch}) {
    const EncodeContext c = Context(mode);
    const std::vector<std::string> blocks =
        client::SyntheticCorpus(Corpus(c.spec, 200, 200, 0, 11));
    Ingested in = Ingest(c, blocks, 20);
    const BlockStore::Stats s = in.store->GetStats();
    EXPECT_EQ(s.fused_refs, 0u);
    EXPECT_EQ(s.segments, s.segment_refs);
  }
}

TEST(FuserTest, SkippedLayersAreNeverFused) {
  EncodeContext c = Context(FusionOptions::Mode::kOnline);
  c.fusion.skip_layers = {0, 2, -1};
  const std::vector<std::string> blocks = client::SyntheticCorpus(Corpus(c.spec, 40, 2, 0.01f, 5));
  Ingested in = Ingest(c, blocks, 1);
  for (uint32_t b = 0; b < blocks.size(); ++b) {
    const BlockKey key = Key(b);
    StoredBlockPtr got = in.store->Get(in.ns, {&key, 1})[0];
    ASSERT_NE(got, nullptr);
    for (uint32_t layer : {0u, 2u, 5u}) {
      EXPECT_FALSE(got->refs()[2 * layer].fused) << "block " << b << " layer " << layer;
      EXPECT_FALSE(got->refs()[2 * layer + 1].fused);
    }
  }
  EXPECT_GT(in.store->GetStats().fused_refs, 0u);
}

TEST(FuserTest, IdenticalSegmentsAreStoredOnce) {
  const EncodeContext c = Context(FusionOptions::Mode::kOff);
  const std::vector<std::string> one = client::SyntheticCorpus(Corpus(c.spec, 1, 1, 0, 3));
  const std::vector<std::string> blocks = {one[0], one[0], one[0]};  // Three keys, one content.
  Ingested in = Ingest(c, blocks, 3);
  const BlockStore::Stats s = in.store->GetStats();
  EXPECT_EQ(s.blocks, 3u);
  EXPECT_EQ(s.segments, c.spec.SegmentsPerBlock());
  EXPECT_EQ(s.segment_refs, 3 * c.spec.SegmentsPerBlock());
  EXPECT_EQ(s.fused_refs, 0u);
  EXPECT_EQ(s.logical_bytes, 3 * c.spec.BlockBytes());
  // Deleting two keys keeps the content for the third.
  const BlockKey k0 = Key(0), k1 = Key(1), k2 = Key(2);
  EXPECT_EQ(in.store->Delete(in.ns, {&k0, 1}), 1u);
  EXPECT_EQ(in.store->Delete(in.ns, {&k1, 1}), 1u);
  EXPECT_EQ(in.store->GetStats().segments, c.spec.SegmentsPerBlock());
  const Check check = ReadBack(c.spec, in.store.get(), in.ns, blocks, 0, 0);
  EXPECT_EQ(check.violations, 0);
  EXPECT_EQ(check.segments, static_cast<int>(c.spec.SegmentsPerBlock()));
  EXPECT_EQ(in.store->Delete(in.ns, {&k2, 1}), 1u);
  EXPECT_EQ(in.store->GetStats().segments, 0u);
  EXPECT_EQ(in.store->GetStats().stored_bytes, 0u);
  EXPECT_THAT(in.store->CheckInvariants(), IsOk());
}

TEST(FuserTest, MembersOutliveTheirRepresentativesBlock) {
  const EncodeContext c = Context(FusionOptions::Mode::kOnline);
  const std::vector<std::string> blocks = client::SyntheticCorpus(Corpus(c.spec, 6, 1, 0.01f, 8));
  Ingested in = Ingest(c, blocks, 1);
  ASSERT_GT(in.store->GetStats().fused_refs, 0u);
  const BlockKey first = Key(0);  // The representative's own block.
  EXPECT_EQ(in.store->Delete(in.ns, {&first, 1}), 1u);
  EXPECT_THAT(in.store->CheckInvariants(), IsOk());
  EXPECT_GT(in.store->GetStats().representatives, 0u);  // Still referenced by members.
  const Check check = ReadBack(c.spec, in.store.get(), in.ns, blocks, c.fusion.budget, 0);
  EXPECT_EQ(check.violations, 0);
  EXPECT_EQ(check.segments, static_cast<int>(5 * c.spec.SegmentsPerBlock()));
  for (uint32_t b = 1; b < blocks.size(); ++b) {
    const BlockKey key = Key(b);
    in.store->Delete(in.ns, {&key, 1});
  }
  const BlockStore::Stats s = in.store->GetStats();
  EXPECT_EQ(s.segments, 0u);
  EXPECT_EQ(s.representatives, 0u);
  EXPECT_EQ(s.stored_bytes, 0u);
  EXPECT_THAT(in.store->CheckInvariants(), IsOk());
}

// Seeded random puts (online fusion, fresh content per put), gets, deletes and evictions under a
// small capacity, against a model of what each key was last put with. Every hit must be within
// the budget of the model's bytes; deleted keys must miss; the accounting must match a recount.
TEST(FuserTest, RandomLifecycleMatchesModel) {
  const EncodeContext c = Context(FusionOptions::Mode::kOnline);
  const std::vector<std::string> pool = MixedCorpus(c.spec, 40, 21);  // 320 contents.
  const uint64_t block_stored = c.spec.SegmentsPerBlock() * (kSegmentHeaderBytes + 1024);
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    auto store = *BlockStore::Create({24 * block_stored});
    const NamespaceId ns = *store->RegisterNamespace(c.spec);
    std::mt19937 rng(seed);
    std::map<uint32_t, const std::string*> model;  // Key id -> content last put (if not deleted).
    uint64_t evictions = 0;
    int hits = 0;
    for (int op = 0; op < 1500; ++op) {
      const uint32_t id = rng() % 60;
      const BlockKey key = Key(id);
      const int kind = rng() % 10;
      if (kind < 5) {
        if (model.count(id) && store->Contains(ns, {&key, 1})[0]) continue;  // Equal key, equal content.
        const std::string& content = pool[rng() % pool.size()];
        auto block = EncodeBlock(c, store.get(), ns, Elements(content));
        ASSERT_THAT(block, IsOk());
        auto r = store->Insert(ns, {&key, 1}, {*block});
        ASSERT_THAT(r, IsOk());
        evictions += r->evicted;
        model[id] = &content;
      } else if (kind < 8) {
        StoredBlockPtr got = store->Get(ns, {&key, 1})[0];
        if (got == nullptr) continue;  // Evicted (or never put).
        ASSERT_TRUE(model.count(id)) << "a deleted key hit";
        ++hits;
        const uint64_t n = got->logical_bytes() / 2 / got->num_segments();
        for (size_t s = 0; s < got->num_segments(); ++s) {
          const double e = RelError(ReadSegment(c.spec, *got, s),
                                    Elements(*model[id]).subspan(s * n, n));
          ASSERT_LE(e, got->refs()[s].fused ? c.fusion.budget * (1 + 1e-9) : 0.0)
              << "op " << op << " key " << id << " segment " << s;
        }
      } else {
        store->Delete(ns, {&key, 1});
        model.erase(id);
      }
      ASSERT_THAT(store->CheckInvariants(), IsOk()) << "op " << op;
    }
    EXPECT_GT(evictions, 0u);
    EXPECT_GT(hits, 100);
    EXPECT_GT(store->GetStats().fused_refs, 0u);
  }
}

TEST(FuserTest, OptionsAndModes) {
  EXPECT_THAT(ParseFusionMode("online"), IsOk());
  EXPECT_FALSE(ParseFusionMode("sometimes").ok());
  EXPECT_EQ(FusionModeName(FusionOptions::Mode::kBatch), "batch");
  FusionOptions f;
  EXPECT_TRUE(f.Skips(0, 32));
  EXPECT_TRUE(f.Skips(31, 32));
  EXPECT_TRUE(f.Skips(30, 32));
  EXPECT_FALSE(f.Skips(2, 32));
  f.budget = 0;
  EXPECT_FALSE(ValidateFusionOptions(f).ok());
  f.budget = 0.1;
  f.threshold = 1.5;
  EXPECT_FALSE(ValidateFusionOptions(f).ok());
}

}  // namespace
}  // namespace kvpool::server
