// kvpool's GPU encoder of payload mode 4 (kernels/kvpool_rows_cuda_encoder.cuh) run on the host
// under tests/util/cuda_emulation.h, with host memory standing in for the device's: the whole
// encode as kvpool.cu runs it (sampled tokens copied to the host, planning there, the passes'
// kernels, the host's decisions, the rows packed on the device, the payload's other sections
// copied in). Its payloads must be the reference encoder's, byte for byte: one plan and mu give
// one payload. The GPU itself runs it in KvpoolCodec.Cuda* and CodecSelfCheck.* (label gpu).
#include "tests/util/cuda_emulation.h"  // Before the kernel header.
//
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_rows_cuda_encoder.cuh"
#include "tests/kernels/kvpool_test_helpers.h"

namespace kvpool::kernels::kvpool_test {
namespace {

using ::kvpool::testing::cuda_emulation::EmulatedLauncher;
using ::kvpool::testing::cuda_emulation::HostBuffer;
namespace in = ::kvpool::kernels::kvpool::internal;

// Host memory as the device's (DeviceRowsPass's Memory), counting what crosses "the bus".
class HostMemory {
 public:
  absl::StatusOr<uint8_t*> Allocate(uint64_t bytes) {
    buffers_.push_back(std::make_unique<HostBuffer>(bytes));
    return buffers_.back()->data();
  }
  absl::Status ToDevice(void* d, const void* h, uint64_t n) {
    std::memcpy(d, h, n);
    to_device += n;
    return absl::OkStatus();
  }
  absl::Status ToHost(void* h, const void* d, uint64_t n) {
    std::memcpy(h, d, n);
    to_host += n;
    return absl::OkStatus();
  }
  absl::Status ToHostRows(void* h, const void* d, uint64_t pitch, uint64_t width, uint64_t rows) {
    for (uint64_t r = 0; r < rows; ++r) {
      std::memcpy(static_cast<uint8_t*>(h) + r * pitch, static_cast<const uint8_t*>(d) + r * pitch,
                  width);
    }
    to_host += rows * width;
    return absl::OkStatus();
  }
  absl::Status OnDevice(void* d, const void* s, uint64_t n) {
    std::memcpy(d, s, n);
    return absl::OkStatus();
  }
  uint64_t to_device = 0, to_host = 0;

 private:
  std::vector<std::unique_ptr<HostBuffer>> buffers_;
};

CodecParams Normal(float budget, uint8_t flags = 0) {
  absl::StatusOr<CodecParams> p = NormalizeParams(Params(budget, 0, flags));
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// The emulated GPU encode of one segment: its payload, or the error.
absl::StatusOr<std::string> DeviceEncode(const SegmentShape& s, const CodecParams& p,
                                         const std::vector<uint16_t>& v, const LayerKeys& keys = {},
                                         HostMemory* memory = nullptr) {
  HostMemory local;
  HostMemory* mem = memory ? memory : &local;
  HostBuffer d_in(v.size() * 2);
  if (!v.empty()) std::memcpy(d_in.data(), v.data(), v.size() * 2);
  const uint64_t capacity = kvpool::MaxPayloadBytes(s, p);
  HostBuffer d_out(capacity);
  KVPOOL_ASSIGN_OR_RETURN(
      const uint64_t size,
      in::EncodeRowsOnDevice(s, p, reinterpret_cast<const uint16_t*>(d_in.data()), keys,
                             in::FastRefKernels(), in::RowKernelsRef(), EmulatedLauncher(), mem,
                             d_out.data(), capacity));
  return std::string(reinterpret_cast<const char*>(d_out.data()), size);
}

// The reference encoder's payload (raw mode 0 where it stores elements that are not finite).
std::string RefEncode(const SegmentShape& s, const CodecParams& p, const std::vector<uint16_t>& v,
                      const LayerKeys& keys = {}) {
  std::string out(kvpool::MaxPayloadBytes(s, p), '\0');
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data());
  absl::StatusOr<uint64_t> size = kvpool::EncodeRef(s, p, v.data(), keys, o, out.size());
  if (!size.ok()) size = in::WriteRawPayload(s, v.data(), o, out.size());
  EXPECT_TRUE(size.ok()) << size.status();
  out.resize(size.ok() ? *size : 0);
  return out;
}

TEST(KvpoolRowsCudaEncoder, PayloadsAreTheReferences) {
  std::mt19937_64 rng(11);
  struct Case {
    uint32_t tokens, heads, dim;
  };
  // Odd shapes: one token, a partial block of rows, channels not a multiple of 8 or 16.
  const Case cases[] = {{1, 1, 8},   {3, 2, 16},   {37, 3, 72}, {64, 2, 64},
                        {20, 2, 13}, {48, 4, 128}, {9, 1, 1024}};  // The widest it takes.
  int coded = 0;
  for (const Case& c : cases) {
    for (DType dt : {DType::kFp16, DType::kBf16}) {
      for (float budget : {0.02f, 0.2f, 0.5f}) {
        for (int type : {0, 5, 6}) {
          const SegmentShape ks = Shape(c.tokens, c.heads, c.dim, dt, SegmentKind::kKey);
          const SegmentShape vs = Shape(c.tokens, c.heads, c.dim, dt, SegmentKind::kValue);
          const CodecParams p = Normal(budget);
          const std::vector<uint16_t> k = RandomSegment(ks, type, rng);
          const std::vector<uint16_t> v = RandomSegment(vs, 0, rng);
          SCOPED_TRACE(::testing::Message()
                       << c.tokens << "x" << c.heads << "x" << c.dim << " dtype " << int(dt)
                       << " budget " << budget << " type " << type);
          const std::string ref_k = RefEncode(ks, p, k);
          absl::StatusOr<std::string> dev_k = DeviceEncode(ks, p, k);
          ASSERT_TRUE(dev_k.ok()) << dev_k.status();
          EXPECT_EQ(*dev_k, ref_k);
          // Values weighted by their keys' classes (from the key payload).
          LayerKeys keys;
          keys.payload =
              absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(ref_k.data()), ref_k.size());
          absl::StatusOr<std::string> dev_v = DeviceEncode(vs, p, v, keys);
          ASSERT_TRUE(dev_v.ok()) << dev_v.status();
          EXPECT_EQ(*dev_v, RefEncode(vs, p, v, keys));
          coded += (*dev_k)[0] == in::kModeRows;
        }
      }
    }
  }
  EXPECT_GT(coded, 60);  // Most are mode 4, not raw.
}

// Runs every pass of an encode twice, on the CPU (whose outputs the encoder goes on with) and
// on the emulated device, and checks that the device's pass measured and wrote exactly what
// the CPU's did: each row's meta, class and coefficients, the sums of errors and energies bit
// for bit (so the same decisions), and the rows' bytes once packed.
class TwinPass final : public in::RowsPass {
 public:
  TwinPass(const SegmentShape& s, const uint16_t* x, const in::RowKernels& rk)
      : s_(s),
        d_in_(s.Elements() * 2),
        cpu_(in::MakeCpuRowsPass(s, x, rk)),
        dev_(s, reinterpret_cast<const uint16_t*>(d_in_.data()), EmulatedLauncher(), &mem_) {
    std::memcpy(d_in_.data(), x, s.Elements() * 2);
  }
  absl::Status Run(const std::vector<in::HeadPlan>& heads, double mu, bool key_classes,
                   const std::vector<uint8_t>& given, uint8_t* classes, uint8_t* metas,
                   int16_t* coefs, uint8_t* rows, in::PassResult* res) override {
    const uint64_t n = uint64_t{s_.tokens} * s_.kv_heads;
    KVPOOL_RETURN_IF_ERROR(
        cpu_->Run(heads, mu, key_classes, given, classes, metas, coefs, rows, res));
    std::vector<uint8_t> d_classes((n + 1) / 2), d_metas(n);
    std::vector<int16_t> d_coefs(n * in::kMaxRank);
    in::PassResult d_res;
    KVPOOL_RETURN_IF_ERROR(dev_.Run(heads, mu, key_classes, given, d_classes.data(), d_metas.data(),
                                    d_coefs.data(), nullptr, &d_res));
    ++passes;
    EXPECT_EQ(d_res.finite, res->finite);
    if (!res->finite) return absl::OkStatus();
    EXPECT_EQ(d_res.err, res->err);
    EXPECT_EQ(d_res.energy, res->energy);
    EXPECT_EQ(d_res.rows_bytes, res->rows_bytes);
    EXPECT_EQ(d_metas, std::vector<uint8_t>(metas, metas + n));
    if (key_classes) EXPECT_EQ(d_classes, std::vector<uint8_t>(classes, classes + (n + 1) / 2));
    for (uint32_t h = 0; h < s_.kv_heads; ++h) {
      for (uint32_t j = 0; j < heads[h].view.rank; ++j) {
        const uint64_t at = (uint64_t{h} * in::kMaxRank + j) * s_.tokens;
        EXPECT_TRUE(std::equal(coefs + at, coefs + at + s_.tokens, d_coefs.begin() + at))
            << "head " << h << " direction " << j;
      }
    }
    HostBuffer d_rows(res->rows_bytes + 1);
    KVPOOL_RETURN_IF_ERROR(dev_.WriteRows(d_rows.data()));
    EXPECT_EQ(std::memcmp(d_rows.data(), rows, res->rows_bytes), 0);
    return absl::OkStatus();
  }
  int passes = 0;

 private:
  const SegmentShape s_;
  HostBuffer d_in_;
  HostMemory mem_;
  std::unique_ptr<in::RowsPass> cpu_;
  in::DeviceRowsPass<EmulatedLauncher, HostMemory> dev_;
};

// Against the reference kernels and against the CPU's fast ones (AVX-512 or AVX2 where this CPU
// and head_dim have them, as kvpool.cu plans with), which the device must match as well.
TEST(KvpoolRowsCudaEncoder, EveryPassMeasuresWhatTheCpusMeasures) {
  std::mt19937_64 rng(17);
  int passes = 0;
  for (const SegmentShape& base : {Shape(40, 3, 64), Shape(33, 2, 72), Shape(16, 4, 128)}) {
    for (DType dt : {DType::kFp16, DType::kBf16}) {
      for (float budget : {0.02f, 0.3f}) {
        SegmentShape s = base;
        s.dtype = dt;
        for (int type : {0, 4, 6}) {
          const std::vector<uint16_t> v = RandomSegment(s, type, rng);
          for (bool use_fast : {false, true}) {
            const in::RowKernels& rk =
                use_fast ? in::CpuRowKernels(s.head_dim) : in::RowKernelsRef();
            TwinPass twin(s, v.data(), rk);
            std::vector<uint8_t> out(kvpool::MaxPayloadBytes(s, Normal(budget)));
            in::RowsSpan span;
            const absl::StatusOr<uint64_t> size =
                in::EncodeRowsWith(s, Normal(budget), v.data(), LayerKeys{},
                                   use_fast ? in::FastCpuKernels() : in::FastRefKernels(), rk, twin,
                                   out.data(), out.size(), &span);
            ASSERT_TRUE(size.ok()) << size.status();
            passes += twin.passes;
          }
        }
      }
    }
  }
  EXPECT_GE(passes, 72);
}

TEST(KvpoolRowsCudaEncoder, PlanCacheSequencesAreTheReferences) {
  // A stream of segments through one cache on each side: reused, replaced and fresh plans.
  std::mt19937_64 rng(5);
  const SegmentShape s = Shape(64, 2, 64, DType::kFp16, SegmentKind::kKey);
  const CodecParams p = Normal(0.05f);
  PlanCache dev_cache(4), ref_cache(4);
  for (int i = 0; i < 10; ++i) {
    std::vector<uint16_t> v = RandomSegment(s, i == 6 ? 1 : 5, rng);
    if (i == 7) {
      for (uint16_t& x : v) x = FromF(s.dtype, 50.f * ToF(s.dtype, x));  // Another scale.
    }
    LayerKeys dk, rk;
    dk.plans = &dev_cache;
    rk.plans = &ref_cache;
    absl::StatusOr<std::string> dev = DeviceEncode(s, p, v, dk);
    ASSERT_TRUE(dev.ok()) << dev.status();
    EXPECT_EQ(*dev, RefEncode(s, p, v, rk)) << "segment " << i;
  }
  EXPECT_EQ(dev_cache.reused(), ref_cache.reused());
  EXPECT_EQ(dev_cache.replaced(), ref_cache.replaced());
  EXPECT_GT(dev_cache.reused(), 0u);
  EXPECT_GT(dev_cache.replaced() + dev_cache.planned(), 1u);
}

TEST(KvpoolRowsCudaEncoder, RawWhereTheReferenceStoresRaw) {
  std::mt19937_64 rng(3);
  const SegmentShape s = Shape(16, 2, 32);
  // Not finite: raw mode 0, the elements as they are.
  std::vector<uint16_t> v = RandomSegment(s, 0, rng);
  v[7] = 0x7e00;   // NaN
  v[40] = 0x7c00;  // Inf
  absl::StatusOr<std::string> dev = DeviceEncode(s, Normal(0.05f), v);
  ASSERT_TRUE(dev.ok()) << dev.status();
  ASSERT_EQ(dev->size(), in::RawPayloadBytes(s));
  EXPECT_EQ(*dev, RefEncode(s, Normal(0.05f), v));
  std::vector<uint16_t> back(s.Elements());
  ASSERT_TRUE(kvpool::DecodeRef(s, Normal(0.05f), reinterpret_cast<const uint8_t*>(dev->data()),
                                dev->size(), back.data())
                  .ok());
  EXPECT_EQ(back, v);
  // Noise at a budget that coding cannot beat raw at.
  const std::vector<uint16_t> noise = RandomSegment(s, 1, rng);
  dev = DeviceEncode(s, Normal(1e-4f), noise);
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ(dev->size(), in::RawPayloadBytes(s));
  EXPECT_EQ(*dev, RefEncode(s, Normal(1e-4f), noise));
  // No elements: the header alone.
  const SegmentShape empty = Shape(0, 2, 32);
  dev = DeviceEncode(empty, Normal(0.05f), {});
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ(*dev, std::string(in::kHeaderBytes, '\0'));
}

TEST(KvpoolRowsCudaEncoder, RefusesWhatItCannotTake) {
  std::mt19937_64 rng(3);
  const SegmentShape wide = Shape(2, 1, 2048);
  const std::vector<uint16_t> v = RandomSegment(wide, 0, rng);
  EXPECT_TRUE(absl::IsUnimplemented(DeviceEncode(wide, Normal(0.05f), v).status()));
  // Output smaller than a raw payload.
  const SegmentShape s = Shape(4, 1, 16);
  HostBuffer d_in(s.Elements() * 2), d_out(64);
  HostMemory mem;
  const auto size = in::EncodeRowsOnDevice(
      s, Normal(0.05f), reinterpret_cast<const uint16_t*>(d_in.data()), LayerKeys{},
      in::FastRefKernels(), in::RowKernelsRef(), EmulatedLauncher(), &mem, d_out.data(), 64);
  EXPECT_TRUE(absl::IsInvalidArgument(size.status())) << size.status();
}

TEST(KvpoolRowsCudaEncoder, MovesAFewBytesARowAcrossTheBus) {
  // The price of planning and deciding on the host: the sample one way, the plan and the
  // payload's small sections the other, and per pass a few bytes a row back.
  std::mt19937_64 rng(9);
  const SegmentShape s = Shape(256, 4, 128, DType::kFp16, SegmentKind::kKey);
  const std::vector<uint16_t> v = RandomSegment(s, 5, rng);
  HostMemory mem;
  absl::StatusOr<std::string> dev = DeviceEncode(s, Normal(0.05f), v, {}, &mem);
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ(*dev, RefEncode(s, Normal(0.05f), v));
  const uint64_t rows = 256 * 4;
  // 64 sampled tokens of 4 x 128 elements; per row: meta, class, error, energy, 8 codes.
  EXPECT_LE(mem.to_host, 64 * 4 * 128 * 2 + 2 * rows * (2 + 8 + 16)) << mem.to_host;
  EXPECT_LT(mem.to_device, dev->size());  // Rows stay on the device.
}

}  // namespace
}  // namespace kvpool::kernels::kvpool_test
