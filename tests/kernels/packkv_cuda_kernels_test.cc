// packkv's CUDA kernels (kernels/packkv_cuda_kernels.cuh) run on the host under
// tests/util/cuda_emulation.h, in batches as the launchers run them: each segment's payload is
// the reference's byte for byte (with and without re-ordering, odd shapes, more tokens and packs
// than a block has threads), decoding is DecodeRef's bit for bit for payloads of different
// sizes in one batch, and a corrupt payload zeroes its own segment only. So their logic
// (per-segment scratch, scans, the device-side checks) is tested in every build, with or
// without a GPU; the GPU itself runs them in PackkvCodec.Cuda* and CodecBatch.* (label gpu).
#include "tests/util/cuda_emulation.h"  // Before the kernel header.
//
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/packkv.h"
#include "kernels/packkv_cuda_kernels.cuh"
#include "tests/kernels/kvpool_test_helpers.h"
#include "tests/kernels/packkv_test_helpers.h"
#include "tests/util/segment_shape.h"

namespace kvpool::kernels {
namespace {

using ::kvpool::kernels::packkv_test::Params;
using ::kvpool::test_util::Shape;
using ::kvpool::testing::cuda_emulation::EmulatedLauncher;
using ::kvpool::testing::cuda_emulation::HostBuffer;
using ::kvpool::testing::cuda_emulation::StagedPayloads;
namespace in = ::kvpool::kernels::packkv::internal;

// What EncodeBatchCuda launches, emulated: each segment's payload (empty when its size is 0).
std::vector<std::string> EncodeBatch(const SegmentShape& s, const CodecParams& p,
                                     const std::vector<std::vector<uint16_t>>& segments) {
  const in::Layout l = in::LayoutFor(s, p);
  const uint32_t count = uint32_t(segments.size());
  const uint64_t stride = packkv::MaxPayloadBytes(s, p);
  std::vector<uint16_t> elements;
  for (const std::vector<uint16_t>& v : segments) {
    elements.insert(elements.end(), v.begin(), v.end());
  }
  HostBuffer out(stride * count), scratch(in::EncodeScratchBytes(l, count));
  std::vector<uint64_t> sizes(count, ~uint64_t{0});
  const in::EncodeBatch b{elements.data(), s.Elements(), out.data(), stride, sizes.data()};
  Carver carver(scratch.data());
  const in::EncodeScratchSet set = in::CarveEncodeScratch(&carver, l, count);
  in::LaunchEncodeKernels(EmulatedLauncher(), b, l, s.dtype == DType::kBf16,
                          in::QuantBudget(p.budget, s.dtype), set, count);
  std::vector<std::string> payloads;
  for (uint32_t i = 0; i < count; ++i) {
    EXPECT_LE(sizes[i], stride) << "segment " << i;
    payloads.emplace_back(reinterpret_cast<const char*>(out.data()) + i * stride,
                          std::min(sizes[i], stride));
  }
  return payloads;
}

// What DecodeBatchCuda launches, emulated: the payloads at one stride, every segment's output.
std::vector<std::vector<uint16_t>> DecodeBatch(const SegmentShape& s, const CodecParams& p,
                                               const std::vector<std::string>& payloads) {
  const in::Layout l = in::LayoutFor(s, p);
  const uint32_t count = uint32_t(payloads.size());
  StagedPayloads staged(payloads);
  HostBuffer scratch(in::DecodeScratchBytes(l, count));
  std::vector<uint16_t> out(s.Elements() * count, 0x1234);
  const in::DecodeBatch b{staged.data(), staged.stride(), staged.sizes(), out.data(), s.Elements()};
  Carver carver(scratch.data());
  const in::DecodeScratchSet set = in::CarveDecodeScratch(&carver, l, count);
  std::memset(set.flags, 0, set.zeroed_bytes);  // As the launcher does.
  in::LaunchDecodeKernels(EmulatedLauncher(), b, l, s.dtype == DType::kBf16, set, count);
  std::vector<std::vector<uint16_t>> segments;
  for (uint32_t i = 0; i < count; ++i) {
    segments.emplace_back(out.begin() + i * s.Elements(), out.begin() + (i + 1) * s.Elements());
  }
  return segments;
}

std::string RefEncode(const SegmentShape& s, const CodecParams& p, const std::vector<uint16_t>& v) {
  std::string out(packkv::MaxPayloadBytes(s, p), '\0');
  const absl::StatusOr<uint64_t> n =
      packkv::EncodeRef(s, p, v.data(), reinterpret_cast<uint8_t*>(out.data()), out.size());
  EXPECT_TRUE(n.ok()) << n.status();
  out.resize(n.ok() ? *n : 0);
  return out;
}

absl::Status RefDecode(const SegmentShape& s, const CodecParams& p, const std::string& payload,
                       std::vector<uint16_t>* out) {
  out->assign(s.Elements(), 0);
  return packkv::DecodeRef(s, p, reinterpret_cast<const uint8_t*>(payload.data()), payload.size(),
                           out->data());
}

// Packs of 2 tokens for the long test shape: more packs (300) than a scan block has threads.
uint16_t GroupFor(const SegmentShape& s) { return s.tokens > 256 ? 2 : 16; }

// Segments of every kind RandomSegment makes (low rank, noise, constant, zero, an outlier,
// outlier channels), one more of the first kind; of the long shape (slow under emulation) only
// two, of the first two kinds.
std::vector<std::vector<uint16_t>> Segments(const SegmentShape& s, std::mt19937_64& rng) {
  std::vector<std::vector<uint16_t>> segments;
  for (int type : {0, 1, 2, 3, 4, 5, 0}) {
    segments.push_back(kvpool_test::RandomSegment(s, type, rng));
    if (s.tokens > 256 && segments.size() == 2) break;
  }
  return segments;
}

TEST(PackkvCudaKernels, EncodeBatchIsTheReferenceByteForByte) {
  std::mt19937_64 rng(3);
  int compared = 0;
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (bool reorder : {false, true}) {
      // Odd shapes, one token, and more tokens and packs than a block has threads.
      for (const SegmentShape& s : {Shape(40, 2, 16, dtype), Shape(33, 3, 5, dtype),
                                    Shape(1, 1, 1, dtype), Shape(300, 2, 2, dtype)}) {
        const CodecParams p = Params(reorder ? 0.1f : 0.02f, reorder, reorder ? 6 : 8, GroupFor(s));
        SCOPED_TRACE(::testing::Message()
                     << "dtype " << int(dtype) << " reorder " << reorder << " shape " << s.tokens
                     << "x" << s.kv_heads << "x" << s.head_dim);
        std::vector<std::vector<uint16_t>> segments = Segments(s, rng);
        std::vector<uint16_t> inf = segments[0];
        inf.back() = kvpool_test::FromF(dtype, INFINITY);
        segments.push_back(inf);  // Size 0: the caller stores such a segment raw.
        const std::vector<std::string> batch = EncodeBatch(s, p, segments);
        for (size_t i = 0; i + 1 < segments.size(); ++i) {
          EXPECT_EQ(batch[i], RefEncode(s, p, segments[i])) << "segment " << i;
          ++compared;
        }
        EXPECT_TRUE(batch.back().empty());
      }
    }
  }
  EXPECT_EQ(compared, 2 * 2 * (3 * 7 + 2));
}

TEST(PackkvCudaKernels, DecodeBatchIsTheReferenceBitForBit) {
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (bool reorder : {false, true}) {
      for (const SegmentShape& s : {Shape(40, 2, 16, dtype), Shape(300, 2, 2, dtype)}) {
        // Payloads of different sizes in one batch: several budgets and kinds of data.
        const CodecParams p = Params(0.05f, reorder, 8, GroupFor(s));
        std::vector<std::string> payloads;
        std::vector<std::vector<uint16_t>> want;
        for (const std::vector<uint16_t>& v : Segments(s, rng)) {
          for (float budget : {0.005f, 0.2f}) {
            payloads.push_back(RefEncode(s, Params(budget, reorder, 8, GroupFor(s)), v));
            want.emplace_back();
            ASSERT_TRUE(RefDecode(s, p, payloads.back(), &want.back()).ok());
          }
        }
        const std::vector<std::vector<uint16_t>> got = DecodeBatch(s, p, payloads);
        for (size_t i = 0; i < payloads.size(); ++i) {
          EXPECT_EQ(got[i], want[i]) << "payload " << i << " of " << payloads[i].size() << " bytes";
        }
      }
    }
  }
}

// A corrupt payload between two good ones: zeros in its own segment where DecodeRef rejects it
// (except codes or minimums above 2^bits - 1, which the kernels decode as they are), its
// values where DecodeRef accepts it, and its neighbours decoded either way.
TEST(PackkvCudaKernels, CorruptPayloadsZeroOnlyTheirOwnSegment) {
  std::mt19937_64 rng(19);
  for (bool reorder : {false, true}) {
    const SegmentShape s = Shape(40, 2, 16);
    const CodecParams p = Params(0.05f, reorder);
    const std::string good = RefEncode(s, p, kvpool_test::RandomSegment(s, 0, rng));
    std::vector<uint16_t> want_good;
    ASSERT_TRUE(RefDecode(s, p, good, &want_good).ok());
    const std::vector<uint16_t> zeros(s.Elements(), 0);
    const in::Layout l = in::LayoutFor(s, p);
    int zeroed = 0;
    for (int n = 0; n < 30; ++n) {
      std::string bad = good;
      if (n % 3 == 0) {
        bad.resize(l.data_offset + rng() % (bad.size() - l.data_offset));
      } else if (n % 3 == 1) {
        bad += std::string(1 + n % 7, '\0');
      } else {
        for (int k = 0; k < 1 + n % 4; ++k) bad[rng() % bad.size()] ^= char(1 + rng() % 255);
      }
      const std::vector<std::vector<uint16_t>> got = DecodeBatch(s, p, {good, bad, good});
      EXPECT_EQ(got[0], want_good) << n;
      EXPECT_EQ(got[2], want_good) << n;
      std::vector<uint16_t> want;
      const absl::Status status = RefDecode(s, p, bad, &want);
      if (status.ok()) {
        EXPECT_EQ(got[1], want) << n;
      } else if (std::string(status.message()).find("above max") == std::string::npos) {
        EXPECT_EQ(got[1], zeros) << n << ": " << status;
        ++zeroed;
      }
    }
    EXPECT_GE(zeroed, 15) << "reorder " << reorder;
  }
}

}  // namespace
}  // namespace kvpool::kernels
