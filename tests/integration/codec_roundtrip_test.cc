// Every codec through a real kvpoold: put synthetic KV with the codec, get it back decoded by
// the client and by the daemon (identical bytes), within the codec's error bound, and the
// per-codec stats and metrics show the compression.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/layout.h"
#include "client/synthetic.h"
#include "common/block_key.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;

struct Case {
  CodecParams codec;
  double max_rel_l2;  // Bound on the whole put's relative L2 error.
};

// Relative L2 error of decoded fp16 blocks against the originals.
double RelL2(const std::string& a, const std::string& b) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(a.data());
  const uint16_t* y = reinterpret_cast<const uint16_t*>(b.data());
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size() / 2; ++i) {
    const double d = double(Fp16ToFloat(y[i])) - Fp16ToFloat(x[i]);
    err += d * d;
    ref += double(Fp16ToFloat(x[i])) * Fp16ToFloat(x[i]);
  }
  return std::sqrt(err / ref);
}

// `spec`'s 4 blocks of 32 tokens of synthetic KV (structured; 128 tokens from token id
// `first_token` on) put with `codec`: the blocks as put, and their keys.
struct PutBlocks {
  std::string blocks;
  std::vector<BlockKey> keys;
};
PutBlocks PutSynthetic(client::Client& client, const KvSpec& spec, const CodecParams& codec,
                       uint32_t first_token) {
  client::SyntheticOptions g;
  g.num_layers = spec.num_layers;
  g.num_kv_heads = spec.num_kv_heads;
  g.head_dim = spec.head_dim;
  g.tokens = 128;
  const std::string sequence = client::SyntheticKv(g);
  PutBlocks p;
  p.blocks.assign(4 * spec.BlockBytes(), '\0');
  client::SequenceToBlocks(
      spec, {reinterpret_cast<const uint8_t*>(sequence.data()), sequence.size()}, g.tokens, 4,
      {reinterpret_cast<uint8_t*>(p.blocks.data()), p.blocks.size()});
  std::vector<uint32_t> tokens(128);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i + first_token);
  p.keys = *ComputeBlockKeys(tokens, 32);
  client::PutOptions put;
  put.codec = codec;
  EXPECT_THAT(client.Put(spec, p.keys,
                         {reinterpret_cast<const uint8_t*>(p.blocks.data()), p.blocks.size()}, put),
              IsOk());
  return p;
}

// A daemon started with `yaml` as its config file (read at start only).
absl::StatusOr<std::unique_ptr<RunningDaemon>> StartWithConfig(const std::string& yaml) {
  testing::TempDir dir;
  KVPOOL_RETURN_IF_ERROR(WriteStringToFile(dir.path() + "/c.yaml", yaml));
  return RunningDaemon::Start({"--config=" + dir.path() + "/c.yaml"});
}

// kvpool_codec_plan_segments_total{outcome} in a /metrics page.
double PlanSegments(const std::string& metrics, const char* outcome) {
  return testing::MetricValue(
      metrics, absl::StrCat("kvpool_codec_plan_segments_total{outcome=\"", outcome, "\"}"));
}

TEST(CodecRoundTripTest, EveryCodecThroughTheDaemon) {
  // One encode thread: a put's blocks are coded in order, so that plan reuse counts below do
  // not depend on how many blocks run at once.
  auto daemon = StartWithConfig("encode_threads: 1\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = (*daemon)->NewClient();
  // 4 layers, 4 KV heads of 64, 32-token blocks, 4 blocks: structured synthetic KV.
  const std::vector<Case> cases = {
      {CodecParams{CodecId::kRaw}, 0.0},
      {CodecParams{CodecId::kKivi, 8, 0, 32}, 0.01},
      {CodecParams{CodecId::kKivi, 4, 0, 32}, 0.12},
      {CodecParams{CodecId::kKivi, 2, 0, 32}, 0.6},
      {CodecParams{CodecId::kPackKv, 8, 0, 16, 0.02f}, 0.02},
      {CodecParams{CodecId::kKvpool, 0, 0, 0, 0.01f}, 0.01},
      {CodecParams{CodecId::kKvpool, 0, 0, 0, 0.1f}, 0.1},
  };
  for (size_t c = 0; c < cases.size(); ++c) {
    SCOPED_TRACE(absl::StrCat("case ", c, " codec ", CodecName(cases[c].codec.codec)));
    const KvSpec spec{absl::StrCat("codec-model-", c), 4, 4, 64, DType::kFp16, 32};
    const PutBlocks p = PutSynthetic(*client, spec, cases[c].codec, uint32_t(1000 * c));
    const std::string& blocks = p.blocks;
    const std::vector<BlockKey>& keys = p.keys;
    const client::Namespace ns{spec.model_id, 32};
    auto here = client->Get(ns, keys);
    ASSERT_THAT(here, IsOk());
    client::GetOptions server;
    server.server_decode = true;
    auto there = client->Get(ns, keys, server);
    ASSERT_THAT(there, IsOk());
    EXPECT_TRUE(here->data == there->data) << "client and daemon decode differently";
    ASSERT_EQ(here->data.size(), blocks.size());
    const double err = RelL2(blocks, here->data);
    if (cases[c].max_rel_l2 == 0) {
      EXPECT_TRUE(here->data == blocks);
    } else {
      EXPECT_LE(err, cases[c].max_rel_l2);
      // Compressed on the wire: fewer bytes than the decoded blocks.
      EXPECT_LT(here->wire_bytes, blocks.size());
    }
  }
  auto stats = client->Stats();
  ASSERT_THAT(stats, IsOk());
  ASSERT_EQ(stats->codecs.size(), 4u);
  for (const client::CodecUsage& u : stats->codecs) {
    SCOPED_TRACE(u.codec);
    if (u.codec == "raw") {
      EXPECT_GT(u.stored_bytes, u.logical_bytes);  // Headers.
    } else {
      EXPECT_LT(u.stored_bytes, u.logical_bytes);
    }
  }
  EXPECT_LT(stats->stored_bytes, stats->logical_bytes);
  auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
  ASSERT_THAT(metrics, IsOk());
  EXPECT_GT(testing::MetricValue(*metrics, "kvpool_compression_ratio{codec=\"kivi\"}"), 2.0);
  // The two kvpool puts (two budgets: two plan sets): 4 blocks of 8 segments each, through
  // plan caches per layer and kind (plan_reuse 32): each of the 16 streams planned its first
  // segment and reused that plan for the other three, or replaced it where it missed.
  EXPECT_EQ(PlanSegments(*metrics, "planned"), 16.0);
  EXPECT_EQ(PlanSegments(*metrics, "reused") + PlanSegments(*metrics, "replaced"), 48.0);
  EXPECT_GT(PlanSegments(*metrics, "reused"), 0.0);
  EXPECT_EQ(*(*daemon)->Stop(), 0);
}

// Puts of one model with two budgets keep a plan set each: a put with the first budget after
// one with the second takes its streams' plans again instead of planning afresh.
TEST(CodecRoundTripTest, PlanSetsAreKeptPerBudget) {
  auto daemon = StartWithConfig("encode_threads: 1\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = (*daemon)->NewClient();
  const KvSpec spec{"budgets-model", 2, 4, 64, DType::kFp16, 32};
  const CodecParams fine{CodecId::kKvpool, 0, 0, 0, 0.02f}, coarse{CodecId::kKvpool, 0, 0, 0, 0.1f};
  PutSynthetic(*client, spec, fine, 0);
  PutSynthetic(*client, spec, coarse, 1000);
  PutSynthetic(*client, spec, fine, 2000);
  auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
  ASSERT_THAT(metrics, IsOk());
  // 3 puts of 4 blocks x 4 segments; two sets of 4 streams, each planned once.
  EXPECT_EQ(PlanSegments(*metrics, "planned"), 8.0);
  EXPECT_EQ(PlanSegments(*metrics, "reused") + PlanSegments(*metrics, "replaced"), 40.0);
  // The 8 plans held: at least their means as floats and as fp16 (4 heads of 64), at most
  // 256 KiB each.
  const double plan_bytes = testing::MetricValue(*metrics, "kvpool_codec_plan_cache_bytes");
  EXPECT_GE(plan_bytes, 8.0 * 4 * 64 * 6);
  EXPECT_LE(plan_bytes, 8.0 * 256 * 1024);
  EXPECT_EQ(*(*daemon)->Stop(), 0);
}

// plan_reuse: 1 in the config: every kvpool segment plans afresh, within its budget.
TEST(CodecRoundTripTest, PlanReuseOnePlansEverySegment) {
  auto daemon = StartWithConfig("plan_reuse: 1\nencode_threads: 1\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = (*daemon)->NewClient();
  const KvSpec spec{"plans-model", 2, 4, 64, DType::kFp16, 32};
  const PutBlocks p = PutSynthetic(*client, spec, CodecParams{CodecId::kKvpool, 0, 0, 0, 0.05f}, 7);
  auto got = client->Get(client::Namespace{spec.model_id, 32}, p.keys);
  ASSERT_THAT(got, IsOk());
  EXPECT_LE(RelL2(p.blocks, got->data), 0.05);
  auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
  ASSERT_THAT(metrics, IsOk());
  // No plan caches at all: no segment counted by any outcome.
  for (const char* outcome : {"planned", "reused", "replaced"}) {
    EXPECT_EQ(PlanSegments(*metrics, outcome), 0.0) << outcome;
  }
  EXPECT_EQ(testing::MetricValue(*metrics, "kvpool_codec_plan_cache_bytes"), 0.0);
  EXPECT_EQ(*(*daemon)->Stop(), 0);
}

}  // namespace
}  // namespace kvpool
