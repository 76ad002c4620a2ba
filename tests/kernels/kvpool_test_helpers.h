// Helpers shared by the kvpool codec's tests (kvpool_codec_test.cc, kvpool_fast_test.cc,
// kvpool_rows*_test.cc): shapes, parameters, random segments of several kinds, encode / decode
// with gtest checks, payloads.
#ifndef KVPOOL_TESTS_KERNELS_KVPOOL_TEST_HELPERS_H_
#define KVPOOL_TESTS_KERNELS_KVPOOL_TEST_HELPERS_H_

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "client/synthetic.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_format.h"
#include "tests/util/segment_shape.h"

namespace kvpool::kernels::kvpool_test {

using ::kvpool::test_util::Shape;

// `kvpool gen`'s synthetic KV of this shape ([layers][2][tokens][heads][dim] elements), the
// generator's defaults otherwise.
inline std::string SyntheticKvOf(uint32_t layers, uint32_t heads, uint32_t dim, uint64_t tokens,
                                 uint64_t seed = 1, DType dtype = DType::kFp16) {
  client::SyntheticOptions o;
  o.num_layers = layers;
  o.num_kv_heads = heads;
  o.head_dim = dim;
  o.tokens = tokens;
  o.seed = seed;
  o.dtype = dtype;
  return client::SyntheticKv(o);
}

inline CodecParams Params(float budget, uint64_t extra = 0, uint8_t flags = 0) {
  CodecParams p;
  p.codec = CodecId::kKvpool;
  p.budget = budget;
  p.extra = extra;
  p.flags = flags;
  return p;
}
inline constexpr uint8_t kPacked = kvpool::internal::kFlagPacked;
inline constexpr uint8_t kFast = kvpool::internal::kFlagFast;
inline constexpr uint8_t kEntropy = kvpool::internal::kFlagEntropy;  // Mode 3.

inline float ToF(DType dt, uint16_t h) {
  return dt == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}
inline uint16_t FromF(DType dt, float f) {
  return dt == DType::kBf16 ? FloatToBf16(f) : FloatToFp16(f);
}

inline double RelL2(const SegmentShape& s, const std::vector<uint16_t>& a,
                    const std::vector<uint16_t>& b) {
  double e = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = ToF(s.dtype, a[i]), y = ToF(s.dtype, b[i]);
    e += (y - x) * (y - x);
    r += x * x;
  }
  return r > 0 ? std::sqrt(e / r) : (e > 0 ? INFINITY : 0);
}

// Random segment: 0 low-rank + noise, 1 i.i.d. noise, 2 constant, 3 zero, 4 one huge outlier,
// 5 keys-like outlier channels (every 17th), 6 as 5 with every 5th channel (more than 16 of 96
// or more channels: outlier planes of two 16-lane groups).
inline std::vector<uint16_t> RandomSegment(const SegmentShape& s, int type, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<uint16_t> v(s.Elements());
  const uint32_t HD = s.kv_heads * s.head_dim;
  std::vector<float> basis(3 * HD), mix(3), scale(HD, 1.f), offset(HD, 0.f);
  for (float& b : basis) b = n(rng);
  if (type == 5 || type == 6) {
    for (uint32_t c = 0; c < HD; c += type == 5 ? 17 : 5) {
      scale[c] = 10.f;
      offset[c] = 5.f;
    }
  }
  const float c0 = n(rng) * 3;
  for (uint32_t t = 0; t < s.tokens; ++t) {
    for (float& m : mix) m = n(rng);
    for (uint32_t c = 0; c < HD; ++c) {
      float x = 0;
      switch (type) {
        case 1:
          x = n(rng);
          break;
        case 2:
          x = c0;
          break;
        case 3:
          x = 0;
          break;
        case 4:
          x = 0.01f * n(rng);
          break;
        default:
          x = 0.3f * n(rng) +
              0.5f * (mix[0] * basis[c] + mix[1] * basis[HD + c] + mix[2] * basis[2 * HD + c]);
          x = offset[c] + scale[c] * x;
      }
      v[uint64_t{t} * HD + c] = FromF(s.dtype, x);
    }
  }
  if (type == 4 && !v.empty()) v[rng() % v.size()] = FromF(s.dtype, 3000.f);
  return v;
}

inline std::string Encode(const CodecParams& p, const SegmentShape& s,
                          const std::vector<uint16_t>& v, Path path = Path::kRef,
                          absl::Span<const uint16_t> keys = {},
                          absl::string_view encoded_keys = {}, PlanCache* plans = nullptr) {
  auto e = EncodeSegment(p, s, v, path, keys, encoded_keys, plans);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *e : std::string();
}

// The payload of an encoded segment.
inline std::string PayloadOf(const std::string& enc) { return enc.substr(kSegmentHeaderBytes); }

// Appends f's 4 bytes (little-endian, as payloads hold floats).
inline void PutF32(std::string* s, float f) {
  char b[4];
  std::memcpy(b, &f, 4);
  s->append(b, 4);
}

// Decodes a kvpool payload (no segment header) of shape `s` on the reference or the CPU path.
inline absl::Status DecodePayload(const SegmentShape& s, const std::string& p, Path path,
                                  std::vector<uint16_t>* out) {
  out->assign(s.Elements(), 0);
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.data());
  const CodecParams params = Params(0.1f);
  return path == Path::kRef ? kvpool::DecodeRef(s, params, bytes, p.size(), out->data())
                            : kvpool::DecodeCpu(s, params, bytes, p.size(), out->data());
}

inline std::vector<uint16_t> Decode(const std::string& enc, const SegmentShape& s,
                                    Path path = Path::kRef) {
  std::vector<uint16_t> out(s.Elements());
  const absl::Status st = DecodeSegment(enc, absl::MakeSpan(out), path);
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

}  // namespace kvpool::kernels::kvpool_test

#endif  // KVPOOL_TESTS_KERNELS_KVPOOL_TEST_HELPERS_H_
