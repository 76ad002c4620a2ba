// kivi reference: plain loops, the definition of the kivi payload format.
//
// Quantisation (KIVI, Liu et al. 2024): asymmetric min-max to b = params.bits (2, 4 or 8) bits
// per element, L = 2^b - 1 levels, over groups of G = params.group elements:
//   keys   (kind kKey):   per channel; group (tb, h, d) holds tokens [tb*G, min(T, tb*G + G)) of
//                         channel (h, d); the last token group is shorter when T % G != 0.
//   values (kind kValue): per token; group (t, h, j) holds channels [j*G, min(D, j*G + G)) of
//                         token t, head h; the last one is shorter when D % G != 0.
// For each group, in float32:
//   lo = min, hi = max (an element is taken when x < lo, resp. x > hi; then lo += 0, hi += 0
//        so that a zero minimum or maximum is +0);
//   scale = (hi - lo) / L;  s = fp16(scale), m = fp16(lo) (round to nearest even);
//   q = s == 0 ? 0 : clamp(nearbyint((x - m) / s), 0, L)  (ties to even);
// and decoding gives  x' = dtype(float(q) * s + m)  (a multiply, then an add; no FMA), rounded
// to the segment's dtype to nearest even. Encoding fails with InvalidArgument when an element is
// not finite or a group's s or m is not finite in fp16 (bf16 data beyond the fp16 range).
//
// Payload layout (little-endian). T tokens, H heads, D head_dim, E = T*H*D elements, n groups:
//   keys: n = ceil(T/G) * H * D, group index g = (tb * H + h) * D + d;
//   values: n = T * H * ceil(D/G), group index g = (t * H + h) * ceil(D/G) + j.
//   [0, 2n)        s of every group, fp16, in group order
//   [2n, 4n)       m of every group, fp16, in group order
//   [4n, P)        zero; P = 4n rounded up to a multiple of 16, so that the codes are 16-byte
//                  aligned relative to the payload
//   [P, P + ceil(E*b/8))  the codes in element order ([t][h][d]), b bits each, packed LSB
//                  first: element i sits at byte P + i*b/8, bits (i*b) % 8 and up (codes never
//                  straddle bytes); the unused high bits of the last byte are zero.
// The payload size is exactly P + ceil(E*b/8); an empty segment (E = 0) has an empty payload.
// Element order makes every run of 8 elements starting at a multiple of 8 a whole number of
// bytes (b bytes), which is what the AVX2 path and the CUDA kernels work in; keys' scales for
// one token group are contiguous over the H*D channels, so one row of codes pairs with one
// contiguous run of scales and minimums.
//
// Decoders reject (DataLoss) a size other than the exact one and a non-finite s or m; they
// ignore the padding bytes and bits.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/kivi.h"
#include "kernels/kivi_layout.h"

namespace kvpool::kernels::kivi {
namespace {

using internal::CeilDiv;
using internal::ComputeLayout;
using internal::Layout;
using internal::ValidParams;

absl::Status CheckParams(const CodecParams& p) {
  if (ValidParams(p)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "kivi needs bits 2, 4 or 8 and a positive group, got bits ", p.bits, " group ", p.group));
}

// The elements of group g: start, start + stride, ... (count of them, count >= 1).
struct GroupSpan {
  uint64_t start = 0;
  uint64_t stride = 1;
  uint64_t count = 0;
};

GroupSpan SpanOf(const SegmentShape& shape, uint32_t group, uint64_t g) {
  GroupSpan span;
  if (shape.kind == SegmentKind::kKey) {
    const uint64_t channels = uint64_t{shape.kv_heads} * shape.head_dim;
    const uint64_t tb = g / channels, c = g % channels, t0 = tb * group;
    span.start = t0 * channels + c;
    span.stride = channels;
    span.count = std::min<uint64_t>(group, shape.tokens - t0);
  } else {
    const uint64_t per_row = CeilDiv(shape.head_dim, group);
    const uint64_t row = g / per_row, d0 = (g % per_row) * group;
    span.start = row * shape.head_dim + d0;
    span.count = std::min<uint64_t>(group, shape.head_dim - d0);
  }
  return span;
}

float ToFloat(uint16_t v, DType dtype) {
  return ElementToFloat(dtype, v);
}
uint16_t FromFloat(float f, DType dtype) {
  return FloatToElement(dtype, f);
}

bool Fp16IsFinite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

void Put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xff);
  p[1] = static_cast<uint8_t>(v >> 8);
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// The code of one element (the definition of the rounding).
uint32_t Quantize(float x, float s, float m, uint32_t levels) {
  if (s == 0) return 0;
  const float r = std::nearbyint((x - m) / s);
  if (!(r > 0)) return 0;
  if (r > static_cast<float>(levels)) return levels;
  return static_cast<uint32_t>(r);
}

// REQUIRES: the code's bits are zero in `codes`.
void PutCode(uint8_t* codes, uint64_t e, uint32_t bits, uint32_t q) {
  const uint64_t bit = e * bits;
  codes[bit / 8] |= static_cast<uint8_t>(q << (bit % 8));
}
uint32_t GetCode(const uint8_t* codes, uint64_t e, uint32_t bits) {
  const uint64_t bit = e * bits;
  return (codes[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
}

absl::Status EncodeGroup(const SegmentShape& shape, const CodecParams& params, const Layout& l,
                         uint64_t g, const uint16_t* in, uint8_t* out) {
  const GroupSpan span = SpanOf(shape, params.group, g);
  const uint32_t levels = (1u << params.bits) - 1;
  float lo = ToFloat(in[span.start], shape.dtype), hi = lo;
  for (uint64_t i = 0; i < span.count; ++i) {
    const uint64_t e = span.start + i * span.stride;
    const float x = ToFloat(in[e], shape.dtype);
    if (!std::isfinite(x)) {
      return absl::InvalidArgumentError(absl::StrCat("kivi: element ", e, " is not finite"));
    }
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  lo += 0.0f;
  hi += 0.0f;
  const float scale = (hi - lo) / static_cast<float>(levels);
  const uint16_t sh = FloatToFp16(scale), mh = FloatToFp16(lo);
  if (!Fp16IsFinite(sh) || !Fp16IsFinite(mh)) {
    return absl::InvalidArgumentError(absl::StrCat("kivi: group ", g, " spans [", lo, ", ", hi,
                                                   "], beyond the fp16 scale and minimum"));
  }
  Put16(out + 2 * g, sh);
  Put16(out + 2 * l.groups + 2 * g, mh);
  const float s = Fp16ToFloat(sh), m = Fp16ToFloat(mh);
  uint8_t* codes = out + l.codes_offset;
  for (uint64_t i = 0; i < span.count; ++i) {
    const uint64_t e = span.start + i * span.stride;
    PutCode(codes, e, params.bits, Quantize(ToFloat(in[e], shape.dtype), s, m, levels));
  }
  return absl::OkStatus();
}

}  // namespace

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params) {
  if (!ValidParams(params)) return 0;
  return ComputeLayout(shape, params).size;
}

absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  if (absl::Status s = CheckParams(params); !s.ok()) return s;
  const Layout l = ComputeLayout(shape, params);
  if (capacity < l.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("kivi: output has ", capacity, " bytes, the payload needs ", l.size));
  }
  if (l.size > 0) std::memset(out, 0, l.size);
  for (uint64_t g = 0; g < l.groups; ++g) {
    if (absl::Status s = EncodeGroup(shape, params, l, g, in, out); !s.ok()) return s;
  }
  return l.size;
}

absl::Status DecodeRef(const SegmentShape& shape, const CodecParams& params, const uint8_t* payload,
                       uint64_t size, uint16_t* out) {
  if (absl::Status s = CheckParams(params); !s.ok()) return s;
  const Layout l = ComputeLayout(shape, params);
  if (size != l.size) {
    return absl::DataLossError(
        absl::StrCat("kivi payload is ", size, " bytes, the shape and parameters need ", l.size));
  }
  for (uint64_t i = 0; i < 2 * l.groups; ++i) {
    if (!Fp16IsFinite(Get16(payload + 2 * i))) {
      return absl::DataLossError(absl::StrCat("kivi payload has a non-finite ",
                                              i < l.groups ? "scale" : "minimum", " for group ",
                                              i % l.groups));
    }
  }
  const uint8_t* codes = payload + l.codes_offset;
  for (uint64_t g = 0; g < l.groups; ++g) {
    const GroupSpan span = SpanOf(shape, params.group, g);
    const float s = Fp16ToFloat(Get16(payload + 2 * g));
    const float m = Fp16ToFloat(Get16(payload + 2 * l.groups + 2 * g));
    for (uint64_t i = 0; i < span.count; ++i) {
      const uint64_t e = span.start + i * span.stride;
      const float q = static_cast<float>(GetCode(codes, e, params.bits));
      out[e] = FromFloat(q * s + m, shape.dtype);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kivi
