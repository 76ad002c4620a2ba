// Tests for common/half.h: exact fp16/bf16 values, round-to-nearest-even at every tie, and
// exhaustive round trips of all 65536 bit patterns.
#include "common/half.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace kvpool {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

bool IsFp16NaN(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }
bool IsBf16NaN(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu) != 0; }

// The float just above / below `f` (towards +inf / -inf).
float Up(float f) { return std::nextafter(f, kInf); }
float Down(float f) { return std::nextafter(f, -kInf); }

TEST(HalfTest, Fp16ExactValues) {
  EXPECT_EQ(FloatToFp16(0.0f), 0x0000);
  EXPECT_EQ(FloatToFp16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToFp16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToFp16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToFp16(0.5f), 0x3800);
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7bff);  // Largest finite fp16.
  EXPECT_EQ(FloatToFp16(-65504.0f), 0xfbff);
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -14)), 0x0400);  // Smallest normal.
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -24)), 0x0001);  // Smallest subnormal.
  EXPECT_EQ(FloatToFp16(-std::ldexp(1.0f, -24)), 0x8001);
  EXPECT_EQ(FloatToFp16(std::ldexp(1023.0f, -24)), 0x03ff);  // Largest subnormal.
  EXPECT_EQ(FloatToFp16(kInf), 0x7c00);
  EXPECT_EQ(FloatToFp16(-kInf), 0xfc00);
}

TEST(HalfTest, Fp16ToFloatExactValues) {
  EXPECT_EQ(Fp16ToFloat(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(Fp16ToFloat(0x0000)));
  EXPECT_EQ(Fp16ToFloat(0x8000), 0.0f);
  EXPECT_TRUE(std::signbit(Fp16ToFloat(0x8000)));
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(Fp16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(Fp16ToFloat(0x0200), std::ldexp(1.0f, -15));
  EXPECT_EQ(Fp16ToFloat(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(Fp16ToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(Fp16ToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(Fp16ToFloat(0x7c00), kInf);
  EXPECT_EQ(Fp16ToFloat(0xfc00), -kInf);
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7c01)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0xffff)));
}

TEST(HalfTest, Fp16NaNStaysNaN) {
  const float quiet = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(IsFp16NaN(FloatToFp16(quiet)));
  EXPECT_TRUE(IsFp16NaN(FloatToFp16(-quiet)));
  // NaNs whose payload lives only in the low 13 bits must not turn into infinity.
  EXPECT_TRUE(IsFp16NaN(FloatToFp16(BitsToFloat(0x7f800001u))));
  EXPECT_TRUE(IsFp16NaN(FloatToFp16(BitsToFloat(0xff800001u))));
  EXPECT_TRUE(IsFp16NaN(FloatToFp16(BitsToFloat(0x7fffffffu))));
}

TEST(HalfTest, Fp16Overflow) {
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);  // Halfway to 2^16: ties to even (inf).
  EXPECT_EQ(FloatToFp16(-65520.0f), 0xfc00);
  EXPECT_EQ(FloatToFp16(Down(65520.0f)), 0x7bff);
  EXPECT_EQ(FloatToFp16(65536.0f), 0x7c00);
  EXPECT_EQ(FloatToFp16(1e10f), 0x7c00);
  EXPECT_EQ(FloatToFp16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(FloatToFp16(-std::numeric_limits<float>::max()), 0xfc00);
}

TEST(HalfTest, Fp16Underflow) {
  const float tiny = std::ldexp(1.0f, -25);  // Halfway between 0 and 2^-24: ties to 0.
  EXPECT_EQ(FloatToFp16(tiny), 0x0000);
  EXPECT_EQ(FloatToFp16(-tiny), 0x8000);
  EXPECT_EQ(FloatToFp16(Up(tiny)), 0x0001);
  EXPECT_EQ(FloatToFp16(Down(tiny)), 0x0000);
  EXPECT_EQ(FloatToFp16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(FloatToFp16(std::numeric_limits<float>::min()), 0x0000);
  EXPECT_EQ(FloatToFp16(-std::numeric_limits<float>::denorm_min()), 0x8000);
}

TEST(HalfTest, Fp16TiesToEven) {
  // 1 + 2^-11 lies halfway between 0x3c00 (even) and 0x3c01.
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3 * 2^-11 lies halfway between 0x3c01 and 0x3c02 (even).
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(3.0f, -11)), 0x3c02);
  EXPECT_EQ(FloatToFp16(Up(1.0f + std::ldexp(1.0f, -11))), 0x3c01);
  EXPECT_EQ(FloatToFp16(Down(1.0f + std::ldexp(3.0f, -11))), 0x3c01);
  // Subnormals: 3 * 2^-25 lies halfway between 0x0001 and 0x0002 (even).
  EXPECT_EQ(FloatToFp16(std::ldexp(3.0f, -25)), 0x0002);
  // 1023.5 * 2^-24 lies halfway between the largest subnormal and the smallest normal (even).
  EXPECT_EQ(FloatToFp16(std::ldexp(2047.0f, -25)), 0x0400);
  // 2048 + 1 lies halfway between 2048 (0x6800) and 2050 (0x6801).
  EXPECT_EQ(FloatToFp16(2049.0f), 0x6800);
  EXPECT_EQ(FloatToFp16(2051.0f), 0x6802);
}

// Every tie between two adjacent finite fp16 values, both signs: the midpoint goes to the even
// pattern, and the floats just beside it go to the nearer neighbour.
TEST(HalfTest, Fp16EveryMidpointRoundsToEven) {
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float lo = Fp16ToFloat(static_cast<uint16_t>(h));
    const float hi = h + 1 == 0x7c00 ? 65536.0f : Fp16ToFloat(static_cast<uint16_t>(h + 1));
    const float mid = (lo + hi) / 2;  // Exact: fp16 values need 11 significant bits, float has 24.
    const uint16_t even = static_cast<uint16_t>((h & 1) == 0 ? h : h + 1);
    for (uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(FloatToFp16(s * mid), sign | even) << "h=" << h << " sign=" << sign;
      ASSERT_EQ(FloatToFp16(s * Down(mid)), sign | h) << "h=" << h << " sign=" << sign;
      ASSERT_EQ(FloatToFp16(s * Up(mid)), sign | (h + 1)) << "h=" << h << " sign=" << sign;
    }
  }
}

// The conversion returns the nearest fp16 for seeded random finite floats in the fp16 range.
TEST(HalfTest, Fp16RandomFloatsRoundToNearest) {
  std::mt19937 rng(20240601);
  std::uniform_real_distribution<float> exp_dist(-26.0f, 16.0f);
  std::uniform_real_distribution<float> mant_dist(1.0f, 2.0f);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::ldexp(mant_dist(rng), static_cast<int>(std::floor(exp_dist(rng))));
    const uint16_t h = FloatToFp16(f);
    if (h == 0x7c00) {
      ASSERT_GE(f, 65520.0f) << f;
      continue;
    }
    const double err = std::fabs(static_cast<double>(Fp16ToFloat(h)) - f);
    if (h > 0) {
      ASSERT_LE(err, std::fabs(static_cast<double>(Fp16ToFloat(h - 1)) - f)) << f;
    }
    if (h < 0x7bff) {
      ASSERT_LE(err, std::fabs(static_cast<double>(Fp16ToFloat(h + 1)) - f)) << f;
    }
    ASSERT_EQ(FloatToFp16(-f), 0x8000 | h) << f;
  }
}

TEST(HalfTest, Fp16RoundTripsAllBitPatterns) {
  for (uint32_t i = 0; i <= 0xffff; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Fp16ToFloat(h);
    if (IsFp16NaN(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << i;
      ASSERT_TRUE(IsFp16NaN(FloatToFp16(f))) << std::hex << i;
    } else {
      ASSERT_EQ(FloatToFp16(f), h) << std::hex << i;
    }
  }
}

TEST(HalfTest, Fp16ToFloatIsMonotonic) {
  // Positive finite patterns in order are increasing floats (catches subnormal mistakes).
  float prev = Fp16ToFloat(0);
  for (uint32_t h = 1; h <= 0x7c00; ++h) {
    const float f = Fp16ToFloat(static_cast<uint16_t>(h));
    ASSERT_GT(f, prev) << std::hex << h;
    prev = f;
  }
}

TEST(HalfTest, Bf16ExactValues) {
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBf16(kInf), 0x7f80);
  EXPECT_EQ(FloatToBf16(-kInf), 0xff80);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x7f7f0000u)), 0x7f7f);           // Largest finite bf16.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // Rounds to inf.
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(Bf16ToFloat(0x7f80), kInf);
  EXPECT_EQ(Bf16ToFloat(0x0001), BitsToFloat(0x00010000u));
  EXPECT_TRUE(std::signbit(Bf16ToFloat(0x8000)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7fc0)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7f81)));
}

TEST(HalfTest, Bf16NaNStaysNaN) {
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(std::numeric_limits<float>::quiet_NaN())));
  // Payload only in the low 16 bits: plain truncation would give infinity.
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(BitsToFloat(0x7f800001u))));
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(BitsToFloat(0xff800001u))));
  // All-ones payload: rounding up must not carry into the sign.
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x7fffffffu)) & 0x8000, 0);
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(BitsToFloat(0x7fffffffu))));
}

TEST(HalfTest, Bf16TiesToEven) {
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808000u)), 0x3f80);  // 1 + 2^-8: to even 0x3f80.
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f818000u)), 0x3f82);  // To even 0x3f82.
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00008000u)), 0x0000);  // Float subnormals too.
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00018000u)), 0x0002);
}

TEST(HalfTest, Bf16EveryMidpointRoundsToEven) {
  for (uint32_t h = 0; h < 0x7f80; ++h) {
    const uint32_t mid = (h << 16) | 0x8000u;
    const uint16_t even = static_cast<uint16_t>((h & 1) == 0 ? h : h + 1);
    for (uint32_t sign : {0u, 0x80000000u}) {
      const uint16_t s16 = static_cast<uint16_t>(sign >> 16);
      ASSERT_EQ(FloatToBf16(BitsToFloat(sign | mid)), s16 | even) << std::hex << h;
      ASSERT_EQ(FloatToBf16(BitsToFloat(sign | (mid - 1))), s16 | h) << std::hex << h;
      ASSERT_EQ(FloatToBf16(BitsToFloat(sign | (mid + 1))), s16 | (h + 1)) << std::hex << h;
    }
  }
}

TEST(HalfTest, Bf16RoundTripsAllBitPatterns) {
  for (uint32_t i = 0; i <= 0xffff; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Bf16ToFloat(h);
    ASSERT_EQ(FloatBits(f), i << 16) << std::hex << i;
    if (IsBf16NaN(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << i;
      ASSERT_TRUE(IsBf16NaN(FloatToBf16(f))) << std::hex << i;
    } else {
      ASSERT_EQ(FloatToBf16(f), h) << std::hex << i;
    }
  }
}

TEST(HalfTest, BitsHelpers) {
  EXPECT_EQ(FloatBits(1.0f), 0x3f800000u);
  EXPECT_EQ(BitsToFloat(0xc0000000u), -2.0f);
  EXPECT_EQ(FloatBits(BitsToFloat(0x12345678u)), 0x12345678u);
}

}  // namespace
}  // namespace kvpool
