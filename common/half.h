// Scalar conversions between float and the 16-bit KV element types (fp16, bf16), round to
// nearest even; NaN and infinities preserved; per element or by DType. Thread-safe (stateless).
#ifndef KVPOOL_COMMON_HALF_H_
#define KVPOOL_COMMON_HALF_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/types/span.h"
#include "common/kv_spec.h"

namespace kvpool {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float Bf16ToFloat(uint16_t h) { return BitsToFloat(uint32_t{h} << 16); }

inline uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float Fp16ToFloat(uint16_t h);
uint16_t FloatToFp16(float f);

// One element of `dtype` to float and back.
inline float ElementToFloat(DType dtype, uint16_t h) {
  return dtype == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}
inline uint16_t FloatToElement(DType dtype, float f) {
  return dtype == DType::kBf16 ? FloatToBf16(f) : FloatToFp16(f);
}

// Elements of `dtype` as floats.
std::vector<float> ElementsToFloats(DType dtype, absl::Span<const uint16_t> x);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_HALF_H_
