// Fusion through a real kvpoold: puts of blocks that share content with --fusion online and
// batch come back within the fusion budget (client decode, daemon decode, and a client that does
// not apply scales), stats and /metrics show the fused segments and the fusion ratio, and
// deleting the representative's block leaves its members readable.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/synthetic.h"
#include "common/block_key.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;

// 6 layers (layers 2 and 3 fuse), 2 heads of 32, 16-token blocks.
const KvSpec kSpec{"fusion-model", 6, 2, 32, DType::kFp16, 16};

std::vector<std::string> Corpus(uint32_t blocks, uint32_t families, float variation) {
  client::CorpusOptions o;
  o.shape = client::SyntheticShape(kSpec);
  o.blocks = blocks;
  o.families = families;
  o.variation = variation;
  return client::SyntheticCorpus(o);
}

std::vector<BlockKey> Keys(uint32_t n, uint32_t salt) {
  std::vector<BlockKey> keys;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t t[2] = {salt, i};
    keys.push_back(ChainBlockKey(RootBlockKey(), absl::MakeConstSpan(t, 2)));
  }
  return keys;
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Largest relative L2 error over the segments of one block.
double WorstSegmentError(const std::string& got, const std::string& want) {
  const uint64_t per_segment = kSpec.BlockBytes() / 2 / kSpec.SegmentsPerBlock();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(want.data());
  const uint16_t* y = reinterpret_cast<const uint16_t*>(got.data());
  double worst = 0;
  for (uint64_t s = 0; s < kSpec.SegmentsPerBlock(); ++s) {
    double err = 0, ref = 0;
    for (uint64_t i = s * per_segment; i < (s + 1) * per_segment; ++i) {
      const double d = double(Fp16ToFloat(y[i])) - Fp16ToFloat(x[i]);
      err += d * d;
      ref += double(Fp16ToFloat(x[i])) * Fp16ToFloat(x[i]);
    }
    worst = std::max(worst, std::sqrt(err / ref));
  }
  return worst;
}

// Reads one block with the raw gRPC stub, without accept_segment_scales: the daemon must send
// decoded bytes.
std::string GetWithoutScales(const std::string& address, const BlockKey& key, bool* encoded) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::KvPool::NewStub(channel);
  v1::GetRequest request;
  request.mutable_ns()->set_model_id(kSpec.model_id);
  request.mutable_ns()->set_tokens_per_block(kSpec.tokens_per_block);
  request.add_keys(std::string(reinterpret_cast<const char*>(key.bytes.data()), key.bytes.size()));
  grpc::ClientContext context;
  auto reader = stub->Get(&context, request);
  v1::GetResponse message;
  std::string data;
  while (reader->Read(&message)) {
    if (message.has_header()) *encoded = message.header().encoded();
    else data += message.data();
  }
  EXPECT_TRUE(reader->Finish().ok());
  return data;
}

class FusionDaemonTest : public ::testing::TestWithParam<const char*> {};

TEST_P(FusionDaemonTest, SharedBlocksComeBackWithinBudget) {
  constexpr double kBudget = 0.05;
  auto daemon = RunningDaemon::Start({absl::StrCat("--fusion=", GetParam()),
                                      "--fusion-threshold=0.9", "--fusion-budget=0.05"});
  ASSERT_THAT(daemon, IsOk());
  auto client = (*daemon)->NewClient();
  const client::PutOptions raw{CodecParams{CodecId::kRaw}};
  // 4 puts of 8 blocks: 4 families of 8 close members, spread over the puts.
  const std::vector<std::string> blocks = Corpus(32, 4, 0.01f);
  const std::vector<BlockKey> keys = Keys(32, 1);
  for (uint32_t p = 0; p < 4; ++p) {
    std::string data;
    std::vector<BlockKey> put_keys;
    for (uint32_t i = p; i < 32; i += 4) {  // One block of each family... per put, twice.
      data += blocks[i];
      put_keys.push_back(keys[i]);
    }
    ASSERT_THAT(client->Put(kSpec, put_keys, Bytes(data), raw), IsOk());
  }
  auto stats = client->Stats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->blocks, 32u);
  EXPECT_GT(stats->fused_segments, 0u);
  EXPECT_LT(stats->segments, stats->segment_refs);
  EXPECT_LT(stats->stored_bytes, stats->logical_bytes);
  const client::Namespace ns{kSpec.model_id, kSpec.tokens_per_block};
  for (bool server_decode : {false, true}) {
    client::GetOptions options;
    options.server_decode = server_decode;
    auto got = client->Get(ns, keys, options);
    ASSERT_THAT(got, IsOk());
    ASSERT_EQ(got->data.size(), 32 * kSpec.BlockBytes());
    for (uint32_t i = 0; i < 32; ++i) {
      EXPECT_LE(WorstSegmentError(got->data.substr(i * kSpec.BlockBytes(), kSpec.BlockBytes()),
                                  blocks[i]),
                kBudget * (1 + 1e-9))
          << "block " << i << " server_decode " << server_decode;
    }
  }
  // A client that does not apply scales gets fused blocks decoded by the daemon (the same
  // values); blocks of its own segments still come encoded, which it can decode.
  int checked = 0;
  for (uint32_t i = 0; i < 32; ++i) {
    bool encoded = true;
    const std::string data = GetWithoutScales((*daemon)->grpc_address(), keys[i], &encoded);
    if (encoded) continue;
    ASSERT_EQ(data.size(), kSpec.BlockBytes());
    EXPECT_LE(WorstSegmentError(data, blocks[i]), kBudget * (1 + 1e-9));
    ++checked;
  }
  EXPECT_GT(checked, 0);  // Fused blocks were decoded by the daemon.
  auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
  ASSERT_THAT(metrics, IsOk());
  EXPECT_GT(testing::MetricValue(*metrics, "kvpool_fused_segments"), 0);
  EXPECT_GT(testing::MetricValue(*metrics, "kvpool_fusion_ratio"), 1.0);
  // Deleting every family's first blocks keeps the others readable.
  ASSERT_THAT(client->Delete(ns, {keys.data(), 8}), IsOk());
  auto rest = client->Get(ns, {keys.data() + 8, 24});
  ASSERT_THAT(rest, IsOk());
  for (uint32_t i = 8; i < 32; ++i) {
    EXPECT_LE(WorstSegmentError(rest->data.substr((i - 8) * kSpec.BlockBytes(), kSpec.BlockBytes()),
                                blocks[i]),
              kBudget * (1 + 1e-9));
  }
  EXPECT_EQ(*(*daemon)->Stop(), 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, FusionDaemonTest, ::testing::Values("online", "batch"));

TEST(FusionFlagsTest, BadFusionFlagsAreRefused) {
  EXPECT_FALSE(RunningDaemon::Start({"--fusion=sometimes"}).ok());
  EXPECT_FALSE(RunningDaemon::Start({"--fusion-budget=2"}).ok());
  EXPECT_FALSE(RunningDaemon::Start({"--fusion-threshold=abc"}).ok());
}

}  // namespace
}  // namespace kvpool
