// EncodeSegment's contract across codecs: encoders that EncoderWritesEveryByte claims need no
// zeroed buffer do write every byte, encoded segments hold no more memory than their size,
// and HasNonFinite finds NaN and Inf anywhere.
#include "kernels/codec.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/kvpool_test_helpers.h"

namespace kvpool::kernels {
namespace {

using namespace kvpool_test;  // NOLINT: shapes and random segments.

std::vector<CodecParams> AllCodecs() {
  std::vector<CodecParams> all = {CodecParams{CodecId::kRaw},
                                  CodecParams{CodecId::kKivi, 2, 0, 32},
                                  CodecParams{CodecId::kKivi, 4, 0, 32},
                                  CodecParams{CodecId::kKivi, 8, 0, 16},
                                  CodecParams{CodecId::kPackKv, 8, 0, 16, 0.02f},
                                  Params(0.05f),
                                  Params(0.05f, 0, kFast),
                                  Params(0.2f, 0, kFast)};
  for (CodecParams& p : all) p = *NormalizeParams(p);
  return all;
}

// A payload written into a zeroed buffer and into one of garbage must be the same bytes.
TEST(EncodeSegment, EncodersClaimedToWriteEveryByteDo) {
  std::mt19937_64 rng(5);
  const uint32_t tokens[] = {1, 15, 16, 33, 130, 256};
  const uint32_t dims[] = {16, 24, 128};
  int checked = 0;
  for (const CodecParams& p : AllCodecs()) {
    if (!EncoderWritesEveryByte(p)) continue;
    const CodecOps& ops = GetCodecOps(p.codec);
    for (int n = 0; n < 60; ++n) {
      const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
      const SegmentKind kind = (n / 2) % 2 ? SegmentKind::kValue : SegmentKind::kKey;
      const SegmentShape s = Shape(tokens[rng() % 6], 1 + rng() % 8, dims[rng() % 3], dt, kind);
      const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 6), rng);
      if (HasNonFinite(dt, v)) continue;
      const uint64_t cap = ops.max_payload_bytes(s, p);
      for (bool ref : {true, false}) {
        auto encode = ref ? ops.encode_ref : ops.encode_cpu;
        std::vector<uint8_t> zeroed(cap, 0), garbage(cap, 0xa5);
        auto a = encode(s, p, v.data(), zeroed.data(), cap);
        auto b = encode(s, p, v.data(), garbage.data(), cap);
        if (!a.ok()) {  // Values the codec cannot represent: both refuse alike.
          EXPECT_EQ(a.status(), b.status());
          continue;
        }
        ASSERT_TRUE(b.ok()) << b.status();
        ASSERT_EQ(*a, *b);
        ASSERT_TRUE(std::equal(zeroed.begin(), zeroed.begin() + *a, garbage.begin()))
            << "codec " << int(p.codec) << " flags " << int(p.flags) << " path "
            << (ref ? "ref" : "cpu") << " segment " << n;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 400);
  EXPECT_TRUE(EncoderWritesEveryByte(Params(0.05f, 0, kFast)));  // The hot lossy path.
}

// The store accounts a segment by its size(); its string must not keep the codec's worst-case
// buffer (kvpool's is larger than the raw segment) behind it.
TEST(EncodeSegment, SegmentsHoldNoMoreMemoryThanTheirSize) {
  std::mt19937_64 rng(9);
  const SegmentShape s = Shape(256, 8, 128, DType::kFp16, SegmentKind::kValue);
  const std::vector<uint16_t> v = RandomSegment(s, 0, rng);
  for (const CodecParams& p : AllCodecs()) {
    for (Path path : {Path::kRef, Path::kCpu}) {
      auto e = EncodeSegment(p, s, v, path);
      ASSERT_TRUE(e.ok()) << e.status();
      EXPECT_LE(e->capacity(), e->size() + 64)
          << "codec " << int(p.codec) << " flags " << int(p.flags) << ": " << e->size()
          << " bytes in a buffer of " << e->capacity();
      EXPECT_EQ(Decode(*e, s, path).size(), v.size());
    }
  }
}

TEST(HasNonFinite, FindsNanAndInfAnywhere) {
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const uint16_t inf = dt == DType::kBf16 ? 0x7f80 : 0x7c00;
    const uint16_t largest = dt == DType::kBf16 ? 0x7f7f : 0x7bff;  // Finite.
    for (uint64_t size : {uint64_t{1}, uint64_t{17}, uint64_t{4096}, uint64_t{10000}}) {
      std::vector<uint16_t> v(size, largest);
      v[size / 2] |= 0x8000;  // Negative largest: still finite.
      EXPECT_FALSE(HasNonFinite(dt, v));
      for (uint64_t at : {uint64_t{0}, size / 3, size - 1}) {
        for (uint16_t bad : {inf, uint16_t(inf | 0x8000), uint16_t(inf | 1), uint16_t(0xffff)}) {
          std::vector<uint16_t> w = v;
          w[at] = bad;
          EXPECT_TRUE(HasNonFinite(dt, w)) << "size " << size << " at " << at << " " << bad;
        }
      }
    }
    EXPECT_FALSE(HasNonFinite(dt, {}));
  }
}

}  // namespace
}  // namespace kvpool::kernels
