// The kvpool codec's entropy streams (payload mode 3; kernels/kvpool_entropy.h): round trips
// of any code matrix, the AVX-512 and interleaved decoders against the lane-by-lane definition
// on intact and corrupt streams, and the encoder's exact reciprocal quotients.
#include "kernels/kvpool_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool_format.h"

namespace kvpool::kernels {
namespace {

using namespace kvpool::internal;  // NOLINT: the format's own helpers.

// A [rows][cols] matrix of zigzag codes: column c Gaussian with sigma 2^(k / 10 + log2_min),
// k = rng() % steps, each value passed through `extreme` (which may replace it) and rounded
// and clamped to +-16383.
template <typename Extreme>
std::vector<uint16_t> RandomCodes(std::mt19937_64& rng, uint32_t rows, uint32_t cols,
                                  uint32_t steps, double log2_min, Extreme extreme) {
  std::vector<uint16_t> zz(uint64_t{rows} * cols);
  std::vector<double> sigma(cols);
  for (double& sg : sigma) sg = std::exp2(double(rng() % steps) / 10.0 + log2_min);
  for (uint32_t t = 0; t < rows; ++t)
    for (uint32_t c = 0; c < cols; ++c) {
      const double x = extreme(std::normal_distribution<double>(0, sigma[c])(rng));
      const int32_t q = int32_t(std::max(-16383.0, std::min(16383.0, std::nearbyint(x))));
      zz[uint64_t{t} * cols + c] = uint16_t(ZigZag(q));
    }
  return zz;
}

// The entropy stream alone: any matrix of valid zigzag codes comes back exactly, whatever its
// shape and magnitudes (escapes, shifts, odd column counts, one row), and the parser consumes
// exactly the stream.
TEST(KvpoolCodec, EntropyStreamsRoundTrip) {
  std::mt19937_64 rng(23);
  for (int n = 0; n < 300; ++n) {
    const uint32_t rows = 1 + rng() % 40, cols = 1 + rng() % 70;
    const std::vector<uint16_t> zz =  // sigma 0.25 .. 16000; extremes in every 5th matrix
        RandomCodes(rng, rows, cols, 160, -2.0, [&](double x) {
          return n % 5 == 0 && rng() % 50 == 0 ? (rng() & 1 ? 1 : -1) * 16383.0 : x;
        });
    std::vector<uint8_t> bytes = {0xab};  // The stream starts after other payload bytes.
    AppendStream(zz.data(), rows, cols, &bytes);
    ASSERT_LE(bytes.size() - 1, StreamBound(rows, cols));
    uint64_t pos = 1;
    Stream st;
    ASSERT_TRUE(ParseStream(bytes.data(), bytes.size(), rows, cols, &pos, &st).ok()) << n;
    EXPECT_EQ(pos, bytes.size());
    std::vector<int32_t> out(uint64_t{rows} * cols + 3, 77);
    ASSERT_TRUE(DecodeStream(st, out.data(), cols).ok()) << n;
    for (uint64_t i = 0; i < zz.size(); ++i) ASSERT_EQ(out[i], UnZigZag(zz[i])) << n << " " << i;
    EXPECT_EQ(out[zz.size()], 77);  // Nothing written beyond the matrix.
  }
}

// DecodeStream (16 lanes at a time on AVX-512 where the CPU has it; else, and the rest, 4 at a
// time) against DecodeLane, the definition, lane by lane: wide streams (a residual's H x D
// columns) and narrow ones (coefficients, side information; the last lane partial) with escapes
// and shifted columns give the same codes, and corrupt lane words or lengths fail
// exactly when a lane fails there; DecodeLanesAvx512 names the first failing lane of its 16,
// 32 or 64.
TEST(KvpoolCodec, EntropyStreamsDecodeAsLaneByLane) {
  std::mt19937_64 rng(31);
  int corrupt_runs = 0, failed = 0;
  for (int n = 0; n < 160; ++n) {
    // A quarter narrow (1 to 5 lanes: a coefficient or side stream), the rest wide.
    const uint32_t rows = 1 + rng() % 48, cols = n % 8 >= 6 ? 1 + rng() % 80 : 256 + rng() % 1100;
    std::vector<uint16_t> zz =  // sigma 0.125 .. 2000; escapes anywhere
        RandomCodes(rng, rows, cols, 140, -3.0, [&](double x) {
          return rng() % 200 == 0 ? (rng() & 1 ? 1 : -1) * double(rng() % 16384) : x;
        });
    std::vector<uint8_t> bytes = {0xab};
    AppendStream(zz.data(), rows, cols, &bytes);
    uint64_t pos = 1;
    Stream st;
    ASSERT_TRUE(ParseStream(bytes.data(), bytes.size(), rows, cols, &pos, &st).ok()) << n;
    const uint64_t data_at = uint64_t(st.data - bytes.data());
    const bool corrupt = n % 2 == 1;
    if (corrupt) {  // Flip a few words, or move bytes between two lanes' lengths.
      ++corrupt_runs;
      if ((rng() % 2 == 0 || st.lanes < 2) && bytes.size() > data_at) {
        for (int k = 0; k < 3; ++k)
          bytes[data_at + rng() % (bytes.size() - data_at)] ^= 1 << (rng() % 8);
      } else {
        const uint32_t a = uint32_t(rng() % st.lanes),
                       b = (a + 1 + uint32_t(rng() % (st.lanes - 1))) % st.lanes;
        uint8_t* ea =
            bytes.data() + (st.lane_dir - bytes.data()) + uint64_t{a} * kLaneEntryBytes + 4;
        uint8_t* eb =
            bytes.data() + (st.lane_dir - bytes.data()) + uint64_t{b} * kLaneEntryBytes + 4;
        const uint32_t la = LoadU32(ea), lb = LoadU32(eb), move = std::min<uint32_t>(la, 2);
        for (int i = 0; i < 4; ++i) {
          ea[i] = uint8_t((la - move) >> (8 * i));
          eb[i] = uint8_t((lb + move) >> (8 * i));
        }
      }
      pos = 1;
      ASSERT_TRUE(ParseStream(bytes.data(), bytes.size(), rows, cols, &pos, &st).ok()) << n;
    }
    std::vector<DecodeTable> tables(st.tables);
    for (uint32_t k = 0; k < st.tables; ++k) BuildTable(st, k, &tables[k]);
    std::vector<int32_t> want(uint64_t{rows} * cols, 0);
    int64_t first_bad = -1;
    for (uint32_t l = 0; l < st.lanes; ++l) {
      const uint8_t* e = st.lane_dir + uint64_t{l} * kLaneEntryBytes;
      const bool ok = DecodeLane(tables.data(), st.column_tables, rows, cols, l, LoadU32(e),
                                 st.data + LaneOffset(st, l), LoadU32(e + 4), want.data(), cols);
      if (!ok && first_bad < 0) first_bad = l;
    }
    std::vector<int32_t> got(uint64_t{rows} * cols + 5, 77);
    const absl::Status s = DecodeStream(st, got.data(), cols);
    ASSERT_EQ(s.ok(), first_bad < 0) << n << " " << s;
    failed += !s.ok();
    if (!corrupt) ASSERT_TRUE(s.ok()) << n << " " << s;
    if (s.ok()) {
      for (uint64_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << n << " " << i;
    }
    EXPECT_EQ(got[want.size()], 77);
    if (!CpuHasAvx512()) continue;
    const uint32_t groups = 1u << (n / 2 % 3);  // 1, 2, 4
    for (uint32_t l0 = 0; l0 + 16 * groups <= cols / kLaneCols; l0 += 16 * groups) {
      std::vector<int32_t> wide(uint64_t{rows} * cols, 0);
      const int64_t bad =
          DecodeLanesAvx512(st, tables.data(), l0, groups, LaneOffset(st, l0), wide.data(), cols);
      int64_t want_bad = -1;
      for (uint32_t i = 0; i < 16 * groups && want_bad < 0; ++i) {
        const uint8_t* e = st.lane_dir + uint64_t{l0 + i} * kLaneEntryBytes;
        std::vector<int32_t> scratch(uint64_t{rows} * cols);
        if (!DecodeLane(tables.data(), st.column_tables, rows, cols, l0 + i, LoadU32(e),
                        st.data + LaneOffset(st, l0 + i), LoadU32(e + 4), scratch.data(), cols)) {
          want_bad = i;
        }
      }
      ASSERT_EQ(bad, want_bad) << n << " lanes from " << l0;
      if (bad >= 0) continue;
      for (uint32_t t = 0; t < rows; ++t)
        for (uint32_t c = l0 * kLaneCols; c < (l0 + 16 * groups) * kLaneCols; ++c) {
          ASSERT_EQ(wide[uint64_t{t} * cols + c], want[uint64_t{t} * cols + c]) << n;
        }
    }
  }
  EXPECT_GT(failed, corrupt_runs / 2);  // The corruptions mostly break a lane.
}

// The entropy encoder divides by multiplying: exact for every frequency a table can hold, at
// the quotients' edges (multiples of freq and one below) up to the largest state, and at random.
TEST(KvpoolCodec, EntropyEncoderQuotientsAreExact) {
  std::mt19937_64 rng(29);
  for (uint32_t f = 1; f <= kProbScale; ++f) {
    const uint64_t m = RansReciprocal(f);
    auto check = [&](uint64_t x) {
      if (x > 0xffffffffu) return;
      ASSERT_EQ(RansQuotient(uint32_t(x), m), uint32_t(x) / f) << x << " / " << f;
    };
    const uint64_t top = 0xffffffffull / f;
    for (uint64_t k : {uint64_t{1}, uint64_t{2}, uint64_t{3}, top / 2, top - 1, top, top + 1}) {
      check(k * f - 1);
      check(k * f);
    }
    check(0);
    check(0xffffffffu);
    for (int i = 0; i < 64; ++i) check(uint32_t(rng()));
  }
}

}  // namespace
}  // namespace kvpool::kernels
