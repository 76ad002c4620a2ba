// Tests for common/checksum.h: Checksum64 and Digest128 give the values of Debian's libxxhash
// (the definition) for every size across XXH3's size classes and at every alignment, whichever
// build (SSE2 library or AVX2) the CPU runs.
#include "common/checksum.h"

#include <xxhash.h>

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvpool {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> b(n);
  for (uint8_t& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

void ExpectLibraryValues(const uint8_t* p, size_t n) {
  EXPECT_EQ(Checksum64(p, n), XXH3_64bits(p, n)) << "size " << n;
  const XXH128_hash_t h = XXH3_128bits(p, n);
  const std::array<uint64_t, 2> d = Digest128(p, n);
  EXPECT_EQ(d[0], h.low64) << "size " << n;
  EXPECT_EQ(d[1], h.high64) << "size " << n;
}

TEST(Checksum, MatchesTheLibraryAtEverySizeUpToFourBlocks) {
  // XXH3 has paths for 0, 1-3, 4-8, 9-16, 17-128, 129-240 bytes and for longer inputs in
  // 64-byte stripes and 1024-byte blocks with a partial last stripe.
  const std::vector<uint8_t> b = RandomBytes(4 * 1024 + 64, 1);
  for (size_t n = 0; n <= b.size(); ++n) ExpectLibraryValues(b.data(), n);
}

TEST(Checksum, MatchesTheLibraryAtEveryAlignmentAndForLargeInputs) {
  const std::vector<uint8_t> b = RandomBytes((size_t{3} << 20) + 100, 2);
  for (size_t offset = 0; offset < 64; ++offset) {
    for (size_t n : {size_t{1000}, size_t{4096}, size_t{65537}, (size_t{3} << 20) + 35}) {
      ExpectLibraryValues(b.data() + offset, n);
    }
  }
}

TEST(Checksum, ChangesWithAnyFlippedBit) {
  std::vector<uint8_t> b = RandomBytes(2000, 3);
  const uint64_t c = Checksum64(b.data(), b.size());
  const std::array<uint64_t, 2> d = Digest128(b.data(), b.size());
  for (size_t i = 0; i < b.size(); i += 37) {
    b[i] ^= 0x10;
    EXPECT_NE(Checksum64(b.data(), b.size()), c) << "byte " << i;
    EXPECT_NE(Digest128(b.data(), b.size()), d) << "byte " << i;
    b[i] ^= 0x10;
  }
}

TEST(Checksum, SaysWhichBuildRuns) {
#if defined(__x86_64__)
  EXPECT_EQ(internal::ChecksumUsesAvx2(), __builtin_cpu_supports("avx2") != 0);
#else
  EXPECT_FALSE(internal::ChecksumUsesAvx2());
#endif
}

}  // namespace
}  // namespace kvpool
