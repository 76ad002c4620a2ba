// Library round trips through a real kvpoold: byte-exact get, hit prefix after partial puts,
// delete, metrics, and 8 concurrent clients.
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "common/block_key.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;
using ::testing::ElementsAre;

KvSpec SmallSpec(const std::string& model, DType dtype = DType::kFp16) {
  return KvSpec{model, 3, 2, 16, dtype, 8};  // 3*2*8*2*16*2 = 3072-byte blocks.
}

std::vector<BlockKey> KeysFor(uint64_t seed, int blocks, uint32_t tpb) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> tokens(uint64_t(blocks) * tpb);
  for (uint32_t& t : tokens) t = rng() % 50000;
  return *ComputeBlockKeys(tokens, tpb);
}

std::string RandomBytes(uint64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

// These tests check transport and store byte for byte: blocks are stored raw.
const client::PutOptions kRaw{CodecParams{CodecId::kRaw}};

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

class RoundTripTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = RunningDaemon::Start();
    ASSERT_THAT(d, IsOk());
    daemon_ = std::move(*d);
    client_ = daemon_->NewClient();
  }
  void TearDown() override {
    if (daemon_) EXPECT_EQ(*daemon_->Stop(), 0) << daemon_->Log();
  }
  std::unique_ptr<RunningDaemon> daemon_;
  std::unique_ptr<client::Client> client_;
};

TEST_F(RoundTripTest, PutThenGetIsByteExactForBothDtypes) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    const KvSpec spec = SmallSpec(absl::StrCat("model-", DTypeName(dtype)), dtype);
    const auto keys = KeysFor(1, 5, spec.tokens_per_block);
    const std::string data = RandomBytes(keys.size() * spec.BlockBytes(), 2);
    auto put = client_->Put(spec, keys, Bytes(data), kRaw);
    ASSERT_THAT(put, IsOk());
    EXPECT_EQ(put->blocks_stored, 5u);
    auto got = client_->Get({spec.model_id, spec.tokens_per_block}, keys);
    ASSERT_THAT(got, IsOk());
    EXPECT_EQ(got->spec, spec);
    EXPECT_EQ(got->hit_prefix_blocks, 5u);
    EXPECT_TRUE(got->data == data) << "bytes differ";
  }
}

TEST_F(RoundTripTest, ClientDecodeAndServerDecodeGiveTheSameBytes) {
  const KvSpec spec = SmallSpec("decode-model");
  const auto keys = KeysFor(11, 3, spec.tokens_per_block);
  const std::string data = RandomBytes(keys.size() * spec.BlockBytes(), 12);
  ASSERT_THAT(client_->Put(spec, keys, Bytes(data), kRaw), IsOk());
  const client::Namespace ns{spec.model_id, spec.tokens_per_block};
  auto encoded = client_->Get(ns, keys);
  ASSERT_THAT(encoded, IsOk());
  client::GetOptions server_decode;
  server_decode.server_decode = true;
  auto decoded = client_->Get(ns, keys, server_decode);
  ASSERT_THAT(decoded, IsOk());
  EXPECT_TRUE(encoded->data == data);
  EXPECT_TRUE(decoded->data == data);
  // Encoded: every segment carries its header; decoded: canonical bytes only.
  EXPECT_EQ(encoded->wire_bytes,
            data.size() + keys.size() * spec.SegmentsPerBlock() * kSegmentHeaderBytes);
  EXPECT_EQ(decoded->wire_bytes, data.size());
}

TEST_F(RoundTripTest, LargeBlocksSpanManyChunks) {
  const KvSpec spec{"llama-ish", 32, 8, 128, DType::kFp16, 16};  // 2 MiB blocks.
  const auto keys = KeysFor(3, 3, spec.tokens_per_block);
  const std::string data = RandomBytes(keys.size() * spec.BlockBytes(), 4);
  ASSERT_THAT(client_->Put(spec, keys, Bytes(data), kRaw), IsOk());
  auto got = client_->Get({spec.model_id, spec.tokens_per_block}, keys);
  ASSERT_THAT(got, IsOk());
  EXPECT_TRUE(got->data == data);
  // Decoded by the daemon: each 2 MiB block spans several 1 MiB stream messages.
  client::GetOptions server_decode;
  server_decode.server_decode = true;
  auto decoded = client_->Get({spec.model_id, spec.tokens_per_block}, keys, server_decode);
  ASSERT_THAT(decoded, IsOk());
  EXPECT_TRUE(decoded->data == data);
}

TEST_F(RoundTripTest, HitPrefixAfterPartialPuts) {
  const KvSpec spec = SmallSpec("prefix-model");
  const client::Namespace ns{spec.model_id, spec.tokens_per_block};
  const auto keys = KeysFor(5, 6, spec.tokens_per_block);
  const uint64_t bb = spec.BlockBytes();
  const std::string data = RandomBytes(keys.size() * bb, 6);
  auto lookup = client_->Lookup(ns, keys);
  ASSERT_THAT(lookup, IsOk());
  EXPECT_EQ(lookup->hit_prefix_blocks, 0u);
  // Blocks 0..1 and 3 are put: the prefix is 2 even though block 3 is present.
  ASSERT_THAT(client_->Put(spec, {keys.data(), 2}, Bytes(data.substr(0, 2 * bb)), kRaw), IsOk());
  ASSERT_THAT(client_->Put(spec, {keys.data() + 3, 1}, Bytes(data.substr(3 * bb, bb)), kRaw), IsOk());
  lookup = client_->Lookup(ns, keys);
  ASSERT_THAT(lookup, IsOk());
  EXPECT_EQ(lookup->hit_prefix_blocks, 2u);
  EXPECT_THAT(lookup->present, ElementsAre(true, true, false, true, false, false));
  auto got = client_->Get(ns, keys);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->hit_prefix_blocks, 2u);
  EXPECT_TRUE(got->data == data.substr(0, 2 * bb) + data.substr(3 * bb, bb));
  // Filling the gap extends the prefix to 4.
  ASSERT_THAT(client_->Put(spec, {keys.data() + 2, 1}, Bytes(data.substr(2 * bb, bb)), kRaw), IsOk());
  EXPECT_EQ(client_->Lookup(ns, keys)->hit_prefix_blocks, 4u);
  // Re-putting is idempotent and reported as already present.
  auto again = client_->Put(spec, {keys.data(), 4}, Bytes(data.substr(0, 4 * bb)), kRaw);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->blocks_already_present, 4u);
  EXPECT_EQ(again->blocks_stored, 0u);
  // Deleting block 1 cuts the prefix to 1.
  EXPECT_EQ(*client_->Delete(ns, {keys.data() + 1, 1}), 1u);
  EXPECT_EQ(client_->Lookup(ns, keys)->hit_prefix_blocks, 1u);
  // An unknown model is all misses, not an error.
  auto other = client_->Lookup({"never-put", spec.tokens_per_block}, keys);
  ASSERT_THAT(other, IsOk());
  EXPECT_EQ(other->hit_prefix_blocks, 0u);
}

TEST_F(RoundTripTest, StatsAndMetricsCountWhatHappened) {
  const KvSpec spec = SmallSpec("stats-model");
  const auto keys = KeysFor(7, 4, spec.tokens_per_block);
  ASSERT_THAT(client_->Put(spec, keys, Bytes(RandomBytes(4 * spec.BlockBytes(), 8)), kRaw), IsOk());
  ASSERT_THAT(client_->Lookup({spec.model_id, spec.tokens_per_block}, keys), IsOk());
  ASSERT_THAT(client_->Get({spec.model_id, spec.tokens_per_block}, keys), IsOk());
  auto stats = client_->Stats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->blocks, 4u);
  EXPECT_EQ(stats->logical_bytes, 4 * spec.BlockBytes());
  EXPECT_EQ(stats->lookup_hits, 4u);
  auto text = testing::HttpGet(daemon_->metrics_address(), "/metrics");
  ASSERT_THAT(text, IsOk());
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_lookups_total{result=\"hit\"}"), 4);
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_put_blocks_total"), 4);
  // Get sends the encoded segments (raw here: payload plus a 64-byte header each).
  const double stored = 4.0 * (spec.BlockBytes() + spec.SegmentsPerBlock() * kSegmentHeaderBytes);
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_get_bytes_total"), stored);
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_blocks"), 4);
  // Stored: 4 blocks of 6 raw segments, each with a 64-byte header.
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_stored_bytes"), stored);
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_logical_bytes"), 4.0 * spec.BlockBytes());
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_codec_segments{codec=\"raw\"}"), 24);
  EXPECT_EQ(testing::MetricValue(*text, "kvpool_capacity_bytes"), double(uint64_t{1} << 30));
  EXPECT_EQ(testing::MetricValue(
                *text, "kvpool_request_duration_seconds_count{method=\"Put\"}"), 1);
  EXPECT_EQ(testing::MetricValue(
                *text, "kvpool_requests_total{code=\"OK\",method=\"Lookup\"}"), 1);
}

TEST_F(RoundTripTest, EightConcurrentClientsPutAndGetWithoutError) {
  constexpr int kClients = 8;
  constexpr int kRounds = 20;
  const KvSpec spec = SmallSpec("concurrent-model");
  std::vector<std::thread> threads;
  std::vector<std::string> failures(kClients);
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto client = daemon_->NewClient();
      const client::Namespace ns{spec.model_id, spec.tokens_per_block};
      // Clients 0..3 share one prefix (concurrent puts of the same keys), 4..7 have their own.
      for (int r = 0; r < kRounds; ++r) {
        const uint64_t seed = c < 4 ? 1000 + r : 2000 + 100 * c + r;
        const auto keys = KeysFor(seed, 4, spec.tokens_per_block);
        const std::string data = RandomBytes(4 * spec.BlockBytes(), seed);
        auto put = client->Put(spec, keys, Bytes(data), kRaw);
        if (!put.ok()) {
          failures[c] = put.status().ToString();
          return;
        }
        auto got = client->Get(ns, keys);
        if (!got.ok() || got->data != data) {
          failures[c] = got.ok() ? "bytes differ" : got.status().ToString();
          return;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int c = 0; c < kClients; ++c) EXPECT_EQ(failures[c], "") << "client " << c;
  auto stats = client_->Stats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->blocks, uint64_t{4} * (kRounds + 4 * kRounds));
}

}  // namespace
}  // namespace kvpool
