// kivi's CUDA kernels (kernels/kivi_cuda_kernels.cuh) run on the host under
// tests/util/cuda_emulation.h, in batches as the launchers run them, on both the vector path
// (whole-register groups, warp shuffles) and the general one: every segment's payload is the
// reference's byte for byte (keys and values, 2, 4 and 8 bits, fp16 and bf16, groups shorter
// and longer than a warp's rows or lanes, odd shapes), decoding is DecodeRef's bit for bit, an
// unencodable segment gets size 0 without touching its neighbours, and a non-finite scale
// decodes its group to NaN. So their logic is tested in every build, with or without a GPU;
// the GPU itself runs them in KiviTest.Cuda* and CodecBatch.* (label gpu).
#include "tests/util/cuda_emulation.h"  // Before the kernel header.
//
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/kivi.h"
#include "kernels/kivi_cuda_kernels.cuh"
#include "tests/kernels/kivi_test_helpers.h"
#include "tests/kernels/kvpool_test_helpers.h"
#include "tests/util/segment_shape.h"

namespace kvpool::kernels {
namespace {

using ::kvpool::kernels::kivi_test::Kivi;
using ::kvpool::kernels::kivi_test::ShapeCase;
using ::kvpool::test_util::Shape;
using ::kvpool::testing::cuda_emulation::EmulatedLauncher;
using ::kvpool::testing::cuda_emulation::HostBuffer;
namespace in = ::kvpool::kernels::kivi::internal;

// The launchers' grids with 64 threads per block instead of 256: the kernels use no shared
// memory or block barriers, so only the grid-stride loops see the difference (they then take
// several trips, which the test wants), and emulation runs faster with fewer host threads.
struct NarrowLauncher {
  template <typename Kernel, typename... A>
  void operator()(unsigned grid_x, unsigned n, unsigned threads, uint64_t shared_bytes,
                  Kernel kernel, const A&... args) const {
    EmulatedLauncher()(grid_x, n, std::min(threads, 64u), shared_bytes, kernel, args...);
  }
};

// Vector-path shapes (the default, groups shorter than a lane's rows, longer than its cached
// rows or a warp's lanes, a short last group) and general ones (no whole 8-element chunks).
constexpr ShapeCase kShapes[] = {
    {32, 8, 128, 32}, {33, 3, 40, 32},   {64, 2, 64, 64}, {17, 4, 16, 128},
    {3, 2, 96, 48},   {2, 1, 1024, 512}, {40, 2, 8, 8},   {96, 1, 16, 96},
    {5, 1, 100, 7},   {7, 2, 5, 4},      {1, 1, 1, 32},
};

// The geometry as the launcher makes it; `vec` false forces the general path.
in::Geometry GeometryFor(const SegmentShape& s, const CodecParams& p, bool vec) {
  absl::StatusOr<in::Geometry> geo = in::MakeGeometry(s, p);
  EXPECT_TRUE(geo.ok()) << geo.status();
  geo->vec = geo->vec && vec;
  return *geo;
}

// What EncodeBatchCuda launches, emulated: each segment's payload and size (the payload empty
// when the size is 0).
struct Encoded {
  std::vector<std::string> payloads;
  std::vector<uint64_t> sizes;
};
Encoded EncodeBatch(const SegmentShape& s, const CodecParams& p, bool vec,
                    const std::vector<std::vector<uint16_t>>& segments) {
  const in::Geometry geo = GeometryFor(s, p, vec);
  const uint32_t count = uint32_t(segments.size());
  const uint64_t stride = (geo.size + 15) / 16 * 16;
  HostBuffer input(2 * s.Elements() * count + 16), out(stride * count);
  uint16_t* elements = reinterpret_cast<uint16_t*>(input.data());
  for (uint32_t i = 0; i < count; ++i) {
    std::copy(segments[i].begin(), segments[i].end(), elements + i * s.Elements());
  }
  std::memset(out.data(), 0x5a, stride * count);  // Garbage the kernels must overwrite.
  Encoded e;
  e.sizes.assign(count, geo.vec ? geo.size : ~uint64_t{0});  // As the launcher's FillOnDevice.
  const bool aligned = in::VectorPathFits(elements, 2 * s.Elements(), out.data(), stride, count);
  EXPECT_TRUE(!geo.vec || aligned);
  in::LaunchEncodeKernels(NarrowLauncher(), geo, in::Batch{s.Elements(), stride}, count, elements,
                          out.data(), e.sizes.data());
  for (uint32_t i = 0; i < count; ++i) {
    EXPECT_TRUE(e.sizes[i] == 0 || e.sizes[i] == geo.size) << "segment " << i;
    e.payloads.emplace_back(reinterpret_cast<const char*>(out.data()) + i * stride,
                            e.sizes[i] == geo.size ? geo.size : 0);
  }
  return e;
}

// What DecodeBatchCuda launches, emulated: payloads of one size at a 16-byte stride.
std::vector<std::vector<uint16_t>> DecodeBatch(const SegmentShape& s, const CodecParams& p,
                                               bool vec, const std::vector<std::string>& payloads) {
  const in::Geometry geo = GeometryFor(s, p, vec);
  const uint32_t count = uint32_t(payloads.size());
  const uint64_t stride = (geo.size + 15) / 16 * 16;
  HostBuffer staged(stride * count), output(2 * s.Elements() * count + 16);
  for (uint32_t i = 0; i < count; ++i) {
    std::memcpy(staged.data() + i * stride, payloads[i].data(), payloads[i].size());
  }
  uint16_t* out = reinterpret_cast<uint16_t*>(output.data());
  std::fill(out, out + s.Elements() * count, uint16_t{0x1234});
  in::LaunchDecodeKernels(NarrowLauncher(), geo, in::Batch{stride, s.Elements()}, count,
                          staged.data(), out);
  std::vector<std::vector<uint16_t>> segments;
  for (uint32_t i = 0; i < count; ++i) {
    segments.emplace_back(out + i * s.Elements(), out + (i + 1) * s.Elements());
  }
  return segments;
}

// The reference's payload, or an empty string when it refuses the segment.
std::string RefEncode(const SegmentShape& s, const CodecParams& p, const std::vector<uint16_t>& v) {
  std::string out(kivi::MaxPayloadBytes(s, p), '\0');
  const absl::StatusOr<uint64_t> n =
      kivi::EncodeRef(s, p, v.data(), reinterpret_cast<uint8_t*>(out.data()), out.size());
  out.resize(n.ok() ? *n : 0);
  return out;
}

std::vector<uint16_t> RefDecode(const SegmentShape& s, const CodecParams& p,
                                const std::string& payload) {
  std::vector<uint16_t> out(s.Elements(), 0);
  const absl::Status st = kivi::DecodeRef(s, p, reinterpret_cast<const uint8_t*>(payload.data()),
                                          payload.size(), out.data());
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

// Segments of four kinds: low rank with noise, i.i.d. noise, keys-like outlier channels, one
// huge outlier.
std::vector<std::vector<uint16_t>> Segments(const SegmentShape& s, std::mt19937_64& rng) {
  std::vector<std::vector<uint16_t>> segments;
  for (int type : {0, 1, 5, 4}) segments.push_back(kvpool_test::RandomSegment(s, type, rng));
  return segments;
}

// Index of the first difference, or -1 (keeps failure messages short).
template <typename T>
int64_t FirstDifference(const T& a, const T& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

std::string Describe(const SegmentShape& s, const CodecParams& p, bool vec) {
  return absl::StrCat(s.tokens, "x", s.kv_heads, "x", s.head_dim, " G", p.group, " b", p.bits,
                      s.dtype == DType::kBf16 ? " bf16" : " fp16",
                      s.kind == SegmentKind::kKey ? " K" : " V", vec ? " vector" : " general");
}

TEST(KiviCudaKernels, EncodeAndDecodeMatchTheReference) {
  std::mt19937_64 rng(5);
  int vector_cases = 0, compared = 0;
  int rotation = 0;
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      for (const ShapeCase& c : kShapes) {
        // Every width on the first three shapes, one in turn on the others (emulation is slow).
        const bool all = &c - kShapes < 3;
        for (uint8_t bits : {2, 4, 8}) {
          if (!all && (rotation++ % 3) != 0) continue;
          const SegmentShape s = Shape(c.tokens, c.heads, c.dim, dtype, kind);
          const CodecParams p = Kivi(bits, c.group);
          const std::vector<std::vector<uint16_t>> segments = Segments(s, rng);
          std::vector<std::string> want;
          for (const std::vector<uint16_t>& v : segments) want.push_back(RefEncode(s, p, v));
          for (bool vec : {true, false}) {
            const bool vector_shape = GeometryFor(s, p, true).vec;
            if (vec && !vector_shape) continue;
            // The general path on every shape that needs it, and on the small vector shapes
            // (its emulated warp shuffles are slow).
            if (!vec && vector_shape && s.Elements() > 4096) continue;
            SCOPED_TRACE(Describe(s, p, vec));
            vector_cases += vec;
            const Encoded got = EncodeBatch(s, p, vec, segments);
            for (size_t i = 0; i < segments.size(); ++i) {
              ASSERT_EQ(FirstDifference(got.payloads[i], want[i]), -1) << "segment " << i;
              compared += !want[i].empty();
            }
            // Decoding: the reference's payloads (the encodable ones) in one batch.
            std::vector<std::string> payloads;
            for (const std::string& w : want) {
              if (!w.empty()) payloads.push_back(w);
            }
            const std::vector<std::vector<uint16_t>> decoded = DecodeBatch(s, p, vec, payloads);
            for (size_t i = 0; i < payloads.size(); ++i) {
              ASSERT_EQ(FirstDifference(decoded[i], RefDecode(s, p, payloads[i])), -1)
                  << "segment " << i;
            }
          }
        }
      }
    }
  }
  EXPECT_GE(vector_cases, 2 * 2 * (3 * 3 + 5));
  EXPECT_GE(compared, 200);
}

// The vector path's quantiser against the reference's division: random scales, minimums and
// elements, and elements whose quotient is a half-integer (ties, where a reciprocal that is off
// by an ulp would round the other way without the division it falls back to).
TEST(KiviCudaKernels, ReciprocalQuantizerRoundsAsTheDivision) {
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  int ties = 0;
  for (int n = 0; n < 400000; ++n) {
    const uint32_t levels = (4u << (n % 3 * 2)) - 1;  // 3, 15, 255
    const float s = Fp16ToFloat(FloatToFp16(std::ldexp(0.5f + unit(rng), int(rng() % 40) - 20)));
    const float m = Fp16ToFloat(FloatToFp16((unit(rng) - 0.5f) * 100.0f * s));
    float x = m + s * (unit(rng) * 1.2f - 0.1f) * float(levels);
    if (n % 2) {  // A tie: x - m == (k + 0.5) * s exactly, when that is representable.
      const float want = (float(rng() % (levels + 1)) + 0.5f) * s;
      const float tie = m + want;
      if (tie - m == want && want / s == std::floor(want / s) + 0.5f) x = tie, ++ties;
    }
    const float inv = 1.0f / s;
    ASSERT_EQ(in::QuantizeByReciprocal(x, s, inv, m, levels), in::QuantizeOne(x, s, m, levels))
        << "x " << x << " s " << s << " m " << m << " levels " << levels;
  }
  EXPECT_GT(ties, 50000);
}

TEST(KiviCudaKernels, UnencodableSegmentGetsSizeZeroAlone) {
  for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
    for (bool vec : {true, false}) {
      const SegmentShape s = Shape(33, 3, 40, DType::kFp16, kind);
      const CodecParams p = Kivi(4, 32);
      SCOPED_TRACE(Describe(s, p, vec));
      std::mt19937_64 rng(9);
      std::vector<std::vector<uint16_t>> segments = Segments(s, rng);
      segments[1][s.Elements() - 3] = 0x7e00;  // NaN in the last token group
      segments[2][17] = 0x7c00;                // +inf
      const Encoded got = EncodeBatch(s, p, vec, segments);
      EXPECT_EQ(got.sizes[1], 0u);
      EXPECT_EQ(got.sizes[2], 0u);
      EXPECT_EQ(FirstDifference(got.payloads[0], RefEncode(s, p, segments[0])), -1);
      EXPECT_EQ(FirstDifference(got.payloads[3], RefEncode(s, p, segments[3])), -1);
    }
  }
}

TEST(KiviCudaKernels, NonFiniteScaleDecodesItsGroupToNaN) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      for (bool vec : {true, false}) {
        const SegmentShape s = Shape(33, 3, 40, dtype, kind);
        const CodecParams p = Kivi(4, 32);
        SCOPED_TRACE(Describe(s, p, vec));
        std::mt19937_64 rng(11);
        const std::vector<uint16_t> v = kvpool_test::RandomSegment(s, 0, rng);
        std::string payload = RefEncode(s, p, v);
        ASSERT_FALSE(payload.empty());
        const std::vector<uint16_t> want = RefDecode(s, p, payload);
        const in::Geometry geo = GeometryFor(s, p, vec);
        const uint32_t bad = geo.groups / 2;
        payload[2 * bad] = 0x00;
        payload[2 * bad + 1] = 0x7c;  // +inf scale
        const std::vector<uint16_t> got = DecodeBatch(s, p, vec, {payload})[0];
        const uint16_t nan = dtype == DType::kBf16 ? 0x7fc0 : 0x7e00;
        const uint64_t channels = uint64_t{s.kv_heads} * s.head_dim;
        int nans = 0;
        for (uint64_t e = 0; e < got.size(); ++e) {
          const uint64_t g = kind == SegmentKind::kKey
                                 ? e / channels / p.group * channels + e % channels
                                 : e / s.head_dim * geo.groups_per_row + e % s.head_dim / p.group;
          ASSERT_EQ(got[e], g == bad ? nan : want[e]) << e;
          nans += g == bad;
        }
        EXPECT_GT(nans, 0);
      }
    }
  }
}

}  // namespace
}  // namespace kvpool::kernels
