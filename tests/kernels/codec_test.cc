// EncodeSegment's contract across codecs: encoders that EncoderWritesEveryByte claims need no
// zeroed buffer do write every byte, encoded segments hold no more memory than their size,
// and HasNonFinite finds NaN and Inf anywhere.
#include "kernels/codec.h"

#include <algorithm>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec_staging.h"
#include "kernels/device.h"
#include "kernels/device_codec.h"
#include "kernels/fusion.h"
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
                                  CodecParams{CodecId::kPackKv, 6, 1, 16, 0.1f},  // Re-ordered.
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

// A StreamingOutput sets its thread's setting for its lifetime: the innermost one wins, the
// one before comes back after it, and other threads keep their own (off without one).
TEST(StreamingOutput, InnermostWinsOnItsOwnThread) {
  const auto elsewhere = [] {
    bool wanted = true;
    std::thread([&] { wanted = StreamingOutput::Wanted(); }).join();
    return wanted;
  };
  EXPECT_FALSE(StreamingOutput::Wanted());
  {
    const StreamingOutput on;
    EXPECT_TRUE(StreamingOutput::Wanted());
    EXPECT_FALSE(elsewhere());
    {
      const StreamingOutput off(false);
      EXPECT_FALSE(StreamingOutput::Wanted());
      {
        const StreamingOutput again(true);
        EXPECT_TRUE(StreamingOutput::Wanted());
      }
      EXPECT_FALSE(StreamingOutput::Wanted());
    }
    EXPECT_TRUE(StreamingOutput::Wanted());
  }
  EXPECT_FALSE(StreamingOutput::Wanted());
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

// The batch launchers (all segments of one shape in one set of launches) write, for every
// segment, the reference's payload (kvpool: its one-segment CUDA payload, a simpler encoding
// than the reference's) and decode each to the reference's values, at payload strides that
// keep the vector paths (256) and that do not (the bare payload size).
TEST(CodecBatch, CudaBatchLaunchersMatchTheReference) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  std::mt19937_64 rng(11);
  int checked = 0;
  for (const CodecParams& p : AllCodecs()) {
    const CodecOps& ops = GetCodecOps(p.codec);
    if (ops.encode_cuda_batch == nullptr) continue;
    for (const SegmentShape& s : {Shape(32, 8, 128, DType::kFp16, SegmentKind::kKey),
                                  Shape(32, 8, 128, DType::kBf16, SegmentKind::kValue),
                                  Shape(33, 3, 40, DType::kFp16, SegmentKind::kKey),
                                  Shape(7, 2, 5, DType::kBf16, SegmentKind::kValue),
                                  Shape(1, 1, 1, DType::kFp16, SegmentKind::kValue)}) {
      const uint32_t count = 5;
      std::vector<uint16_t> in;
      for (uint32_t i = 0; i < count; ++i) {
        const std::vector<uint16_t> v = RandomSegment(s, int(i % 5), rng);
        in.insert(in.end(), v.begin(), v.end());
      }
      const uint64_t cap = ops.max_payload_bytes(s, p);
      for (uint64_t stride : {cap, (cap + 255) / 256 * 256}) {
        SCOPED_TRACE(::testing::Message()
                     << "codec " << int(p.codec) << " bits " << int(p.bits) << " shape " << s.tokens
                     << "x" << s.kv_heads << "x" << s.head_dim << " stride " << stride);
        std::vector<uint8_t> out(stride * count, 0xa5);
        std::vector<uint64_t> sizes(count);
        ASSERT_TRUE(
            EncodeBatchOnDevice(ops, s, p, count, in.data(), out.data(), stride, sizes.data())
                .ok());
        std::vector<uint16_t> decoded(in.size());
        for (uint32_t i = 0; i < count; ++i) {
          std::vector<uint8_t> ref(cap);
          absl::StatusOr<uint64_t> n;
          if (p.codec == CodecId::kKvpool) {
            uint64_t one = 0;
            ASSERT_TRUE(EncodeBatchOnDevice(ops, s, p, 1, in.data() + i * s.Elements(), ref.data(),
                                            cap, &one)
                            .ok());
            n = one;
          } else {
            n = ops.encode_ref(s, p, in.data() + i * s.Elements(), ref.data(), cap);
          }
          ASSERT_TRUE(n.ok()) << n.status();
          ASSERT_EQ(sizes[i], *n) << "segment " << i;
          EXPECT_TRUE(std::equal(ref.begin(), ref.begin() + *n, out.begin() + i * stride))
              << "segment " << i << "'s payload differs from the reference's";
          ASSERT_TRUE(ops.decode_ref(s, p, ref.data(), *n, decoded.data() + i * s.Elements()).ok());
        }
        std::vector<uint16_t> by_cuda(in.size(), 0x5a5a);
        ASSERT_TRUE(
            DecodeBatchOnDevice(ops, s, p, count, out.data(), stride, sizes.data(), by_cuda.data())
                .ok());
        EXPECT_EQ(by_cuda, decoded);
        ++checked;
      }
    }
  }
  // raw, three kivi, two packkv and three kvpool settings, five shapes, two strides.
  EXPECT_GE(checked, 90);
}

// The daemon's GPU encode and the client's decode into device memory, on a block's segments
// (keys and values of each layer alternate, so each kind's segments lie at equal distances)
// plus one segment of another shape: every codec with CUDA kernels gives the values of its
// one-segment CUDA path, and decoding to device memory gives the CPU's values, scaled where
// asked.
TEST(CodecBatch, CudaBlockEncodeAndDecodeToDeviceMatchOneSegmentAtATime) {
  if (DeviceCount() == 0) GTEST_SKIP() << DescribeDevices();
  std::mt19937_64 rng(13);
  std::vector<SegmentShape> shapes;
  for (int layer = 0; layer < 3; ++layer) {
    shapes.push_back(Shape(16, 4, 64, DType::kFp16, SegmentKind::kKey));
    shapes.push_back(Shape(16, 4, 64, DType::kFp16, SegmentKind::kValue));
  }
  shapes.push_back(Shape(5, 2, 24, DType::kFp16, SegmentKind::kValue));
  std::vector<uint16_t> elements;
  std::vector<uint64_t> at;
  for (const SegmentShape& s : shapes) {
    at.push_back(elements.size());
    const std::vector<uint16_t> v = RandomSegment(s, int(at.size() % 5), rng);
    elements.insert(elements.end(), v.begin(), v.end());
  }
  const std::vector<float> scales = {1.f, 0.5f, 1.f, 2.f, 1.f, 1.f, 0.25f};
  int codecs = 0;
  for (const CodecParams& p : AllCodecs()) {
    if (GetCodecOps(p.codec).encode_cuda == nullptr) continue;
    SCOPED_TRACE(::testing::Message() << "codec " << int(p.codec) << " bits " << int(p.bits)
                                      << " flags " << int(p.flags));
    auto encoded = EncodeSegmentsOnDevice(p, shapes, elements);
    ASSERT_TRUE(encoded.ok()) << encoded.status();
    ASSERT_EQ(encoded->size(), shapes.size());
    std::vector<uint16_t> expected(elements.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      const absl::Span<const uint16_t> in(elements.data() + at[i], shapes[i].Elements());
      const absl::Span<uint16_t> want(expected.data() + at[i], shapes[i].Elements());
      auto one = EncodeSegment(p, shapes[i], in, Path::kCuda);
      ASSERT_TRUE(one.ok()) << one.status();
      std::vector<uint16_t> got(shapes[i].Elements());
      ASSERT_TRUE(DecodeSegment((*encoded)[i], absl::MakeSpan(got), Path::kCpu).ok());
      ASSERT_TRUE(DecodeSegment(*one, want, Path::kCpu).ok());
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin())) << "segment " << i;
      ScaleElements(shapes[i].dtype, want, scales[i], Path::kCpu);
    }
    const std::vector<absl::string_view> views(encoded->begin(), encoded->end());
    auto device = DeviceBuffer::Allocate(2 * elements.size());
    ASSERT_TRUE(device.ok()) << device.status();
    std::vector<uint16_t> poison(elements.size(), 0x7e01);
    ASSERT_TRUE(device->CopyFromHost(poison.data(), 2 * poison.size()).ok());
    ASSERT_TRUE(
        DecodeSegmentsToDevice(views, shapes, static_cast<uint16_t*>(device->get()), scales).ok());
    std::vector<uint16_t> decoded(elements.size());
    ASSERT_TRUE(device->CopyToHost(decoded.data(), 2 * decoded.size()).ok());
    EXPECT_EQ(decoded, expected);
    ++codecs;
  }
  EXPECT_GE(codecs, 4);
}

}  // namespace
}  // namespace kvpool::kernels
