// Eviction under a small --host-memory: the least recently used blocks go first, what was
// acknowledged stays readable until evicted, evictions are counted in stats and /metrics, and
// a put larger than the whole tier is refused without evicting anything.
#include <algorithm>
#include <cstring>
#include <random>

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
using ::kvpool::testing::StatusIs;


const KvSpec kSpec{"evict-model", 16, 8, 128, DType::kFp16, 16};  // 16*2*16*8*128*2 = 1 MiB.

std::vector<BlockKey> Keys(int n) {
  std::vector<uint32_t> tokens(uint64_t(n) * kSpec.tokens_per_block);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i * 7 + 3);
  return *ComputeBlockKeys(tokens, kSpec.tokens_per_block);
}

// Block i: every segment holds its own byte value, so no two segments anywhere are equal (the
// store keeps equal segments once).
std::string Block(int i) {
  std::string block(kSpec.BlockBytes(), '\0');
  const uint64_t per_segment = kSpec.BlockBytes() / kSpec.SegmentsPerBlock();
  for (uint64_t s = 0; s < kSpec.SegmentsPerBlock(); ++s) {
    const uint16_t value = static_cast<uint16_t>(i * 32 + s + 1);
    for (uint64_t b = 0; b < per_segment; b += 2) std::memcpy(&block[s * per_segment + b], &value, 2);
  }
  return block;
}

const client::PutOptions kRaw{CodecParams{CodecId::kRaw}};
// A block as stored: 1 MiB plus 32 raw segment headers of 64 bytes.
constexpr uint64_t kStored = (1 << 20) + 32 * kSegmentHeaderBytes;

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(EvictionTest, SmallHostMemoryEvictsLeastRecentlyUsed) {
  ASSERT_EQ(kSpec.BlockBytes(), uint64_t{1} << 20);
  auto daemon = RunningDaemon::Start({absl::StrCat("--host-memory=", 8 * kStored)});
  ASSERT_THAT(daemon, IsOk());
  auto client = (*daemon)->NewClient();
  const client::Namespace ns{kSpec.model_id, kSpec.tokens_per_block};
  const auto keys = Keys(12);
  for (int i = 0; i < 8; ++i) {
    ASSERT_THAT(client->Put(kSpec, {&keys[i], 1}, Bytes(Block(i)), kRaw), IsOk());
  }
  EXPECT_EQ(client->Stats()->evictions, 0u);
  // Touch block 0 so that block 1 is now the least recently used.
  ASSERT_THAT(client->Get(ns, {&keys[0], 1}), IsOk());
  auto put = client->Put(kSpec, {&keys[8], 1}, Bytes(Block(8)), kRaw);
  ASSERT_THAT(put, IsOk());
  EXPECT_EQ(put->blocks_evicted, 1u);
  auto present = client->Lookup(ns, {keys.data(), 9});
  ASSERT_THAT(present, IsOk());
  EXPECT_TRUE(present->present[0]);
  EXPECT_FALSE(present->present[1]);
  for (int i = 2; i <= 8; ++i) EXPECT_TRUE(present->present[i]) << i;
  // Three more blocks evict 2, 3, 4.
  for (int i = 9; i < 12; ++i) {
    ASSERT_THAT(client->Put(kSpec, {&keys[i], 1}, Bytes(Block(i)), kRaw), IsOk());
  }
  auto stats = client->Stats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->blocks, 8u);
  EXPECT_EQ(stats->evictions, 4u);
  EXPECT_LE(stats->stored_bytes, stats->capacity_bytes);
  EXPECT_EQ(stats->capacity_bytes, 8 * kStored);
  // What is still there reads back exactly.
  for (int i : {0, 5, 11}) {
    auto got = client->Get(ns, {&keys[i], 1});
    ASSERT_THAT(got, IsOk());
    EXPECT_TRUE(got->data == Block(i)) << i;
  }
  auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
  ASSERT_THAT(metrics, IsOk());
  EXPECT_EQ(testing::MetricValue(*metrics, "kvpool_evictions_total"), 4);
  EXPECT_EQ(testing::MetricValue(*metrics, "kvpool_evicted_bytes_total"), 4.0 * kStored);
  // A put larger than the whole tier: RESOURCE_EXHAUSTED, nothing evicted or stored.
  std::vector<uint32_t> tokens(9 * 16);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = 90000 + i;
  const std::vector<BlockKey> nine = *ComputeBlockKeys(tokens, 16);
  std::string nine_blocks;  // Distinct segments: equal ones would be stored once and fit.
  for (int i = 0; i < 9; ++i) nine_blocks += Block(100 + i);
  EXPECT_THAT(client->Put(kSpec, nine, Bytes(nine_blocks), kRaw),
              StatusIs(absl::StatusCode::kResourceExhausted));
  auto after = client->Stats();
  EXPECT_EQ(after->blocks, 8u);
  EXPECT_EQ(after->evictions, 4u);
  EXPECT_EQ(*(*daemon)->Stop(), 0);
}

}  // namespace
}  // namespace kvpool
