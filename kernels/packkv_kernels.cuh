// Internals shared by the three packkv paths (packkv_ref.cc, packkv_cpu.cc, packkv.cu): the
// payload layout arithmetic and the scale rule as inline host/device functions, so that no path
// can drift from the format, plus host helpers defined in packkv_ref.cc. The format itself is
// documented at the top of packkv_ref.cc. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_PACKKV_KERNELS_CUH_
#define KVPOOL_KERNELS_PACKKV_KERNELS_CUH_

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/host_device.h"
#include "kernels/packkv.h"

namespace kvpool::kernels::packkv::internal {

// Lanes of the fixed-order sums behind the segment scale (see packkv_ref.cc, "Scale").
inline constexpr int kRowLanes = 8;
inline constexpr int kSegmentLanes = 256;
// Width code 15 in a pack header means "params.bits wide".
inline constexpr int kFullWidthCode = 15;

// Offsets of the payload sections; everything but the pack data is at a fixed place.
struct Layout {
  uint32_t tokens = 0;
  uint32_t heads = 0;
  uint32_t dim = 0;
  uint32_t group = 0;
  uint32_t packs_per_head = 0;
  uint64_t num_packs = 0;
  int bits = 0;
  uint32_t qmax = 0;
  bool reorder = false;
  uint64_t perm_offset = 0;
  uint64_t headers_offset = 0;
  uint64_t header_bytes = 0;  // 1 + ceil(dim / 2)
  uint64_t data_offset = 0;
};

// REQUIRES: bits in [2, 16], group > 0, tokens * heads * dim > 0.
KVPOOL_HD Layout MakeLayout(uint32_t tokens, uint32_t heads, uint32_t dim, uint32_t group,
                            int bits, bool reorder) {
  Layout l;
  l.tokens = tokens;
  l.heads = heads;
  l.dim = dim;
  l.group = group;
  l.packs_per_head = (tokens + group - 1) / group;
  l.num_packs = uint64_t{heads} * l.packs_per_head;
  l.bits = bits;
  l.qmax = (1u << bits) - 1;
  l.reorder = reorder;
  const uint64_t rows = uint64_t{tokens} * heads;
  l.perm_offset = 4 * rows;
  l.headers_offset = l.perm_offset + (reorder ? 2 * rows : 0);
  l.header_bytes = 1 + (uint64_t{dim} + 1) / 2;
  l.data_offset = l.headers_offset + l.num_packs * l.header_bytes;
  return l;
}

// Tokens in pack p of a head (group, or fewer in the last pack).
KVPOOL_HD uint32_t PackTokens(const Layout& l, uint32_t p) {
  const uint32_t rest = l.tokens - p * l.group;
  return rest < l.group ? rest : l.group;
}

KVPOOL_HD int WidthFromCode(int code, int bits) {
  return code == kFullWidthCode ? bits : code;
}
// The width code for a column whose codes span `w` bits (REQUIRES w <= bits).
KVPOOL_HD int CodeForWidth(int w) { return w >= kFullWidthCode ? kFullWidthCode : w; }

// Bits needed to write v (0 for 0).
KVPOOL_HD int BitLength(uint32_t v) {
  int n = 0;
  while (v != 0) {
    ++n;
    v >>= 1;
  }
  return n;
}

KVPOOL_HD uint64_t BitBytes(uint64_t count, int width) { return (count * width + 7) / 8; }

// The combination order of a row's 8 lane sums (the order of an AVX2 horizontal add).
KVPOOL_HD double CombineRowLanes(const double* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Pairwise tree over the kSegmentLanes lane sums, in place; returns the total.
KVPOOL_HD double TreeReduce(double* p) {
  for (int stride = kSegmentLanes / 2; stride > 0; stride /= 2) {
    for (int i = 0; i < stride; ++i) p[i] = p[i] + p[i + stride];
  }
  return p[0];
}

// e, the step relative to a row's range: budget_q * sqrt(12 * sum(x^2) / (dim * sum(R^2))),
// clamped to [1 / qmax, 1].
KVPOOL_HD float ScaleFromSums(double sum_sq, double sum_range_sq, uint32_t dim,
                              double budget_q, uint32_t qmax) {
  const float lo = 1.0f / static_cast<float>(qmax);
  if (!(sum_range_sq > 0)) return 1.0f;
  const double e = budget_q * sqrt(12.0 * sum_sq / (static_cast<double>(dim) * sum_range_sq));
  float ef = static_cast<float>(e);
  if (!(ef >= lo)) ef = lo;
  if (ef > 1.0f) ef = 1.0f;
  return ef;
}

// One row's quantiser: fp16/bf16 bit patterns of its minimum and step, their float values,
// 1/step (0 when the row is constant) and the largest code the row may use.
struct RowQuant {
  uint16_t min_bits = 0;
  uint16_t step_bits = 0;
  float mn = 0;
  float s = 0;
  float inv = 0;
  uint32_t top = 0;
};

// The row quantiser rule of packkv_ref.cc for one dtype. Conv provides
//   static float ToFloat(uint16_t), static uint16_t FromFloat(float) (round to nearest even),
//   kExponent (the exponent mask: inf bits) and kMinStep (the smallest step, with a finite
//   reciprocal).
template <typename Conv>
KVPOOL_HD uint16_t StepBitsWith(float s) {
  uint16_t h = s <= FLT_MAX ? Conv::FromFloat(s) : Conv::kExponent;
  if (h >= Conv::kExponent) {
    h = Conv::kExponent - 1;
  } else if (Conv::ToFloat(h) > s) {
    --h;
  }
  return h < Conv::kMinStep ? Conv::kMinStep : h;
}

// REQUIRES: mn <= mx, both finite dtype values (+0 for a zero); e in [1/qmax, 1].
template <typename Conv>
KVPOOL_HD RowQuant QuantizeRowWith(float mn, float mx, float e, uint32_t qmax) {
  RowQuant q;
  q.min_bits = Conv::FromFloat(mn);
  q.mn = mn;
  const float range = mx - mn;
  if (!(range > 0)) return q;
  q.step_bits = StepBitsWith<Conv>(e * range);
  q.s = Conv::ToFloat(q.step_bits);
  q.inv = 1.0f / q.s;
  const float span = range * q.inv, limit = static_cast<float>(qmax);
  uint32_t top = static_cast<uint32_t>(nearbyintf(span < limit ? span : limit));
  while (top > 0 && (Conv::FromFloat(static_cast<float>(top) * q.s + mn) & Conv::kExponent) ==
                        Conv::kExponent) {
    --top;
  }
  q.top = top;
  return q;
}

// ---- Host helpers, defined in packkv_ref.cc. ----

// InvalidArgument for a codec other than packkv, bits outside [2, 16], group 0, unknown flag
// bits, a dtype other than fp16/bf16, or more than 65536 tokens.
absl::Status CheckParams(const SegmentShape& shape, const CodecParams& params);
// CheckParams, plus a budget in (0, 1) and capacity >= MaxPayloadBytes.
absl::Status CheckEncodeArgs(const SegmentShape& shape, const CodecParams& params,
                             uint64_t capacity);
Layout LayoutFor(const SegmentShape& shape, const CodecParams& params);

// The budget left for quantisation once the output rounding to the dtype is accounted for.
double QuantBudget(float budget, DType dtype);

// QuantizeRowWith<Conv> for the segment's dtype, with common/half.h's conversions.
RowQuant QuantizeRow(float mn, float mx, float e, DType dtype, uint32_t qmax);

// Per-row statistics of the input (rows r = t * heads + h): min, max, sum of squares.
struct RowStat {
  float mn = 0;
  float mx = 0;
  double sum_sq = 0;
};
float SegmentScale(const std::vector<RowStat>& stats, const Layout& l, double budget_q);

// perm[h * T + i] = the token stored at position i of head h: a stable sort of the tokens by
// key[t * H + h] when l.reorder, else the identity.
void OrderTokens(const Layout& l, const std::vector<uint32_t>& keys, std::vector<uint16_t>* perm);

// Writes the row parameters and the permutation sections.
void WriteRows(const Layout& l, const std::vector<RowQuant>& rows,
               const std::vector<uint16_t>& perm, uint8_t* out);

// Codes, row quantisers and re-ordering keys (code sums) of every row, in input order.
void QuantizeRows(const Layout& l, DType dtype, const uint16_t* in,
                  const std::vector<RowStat>& stats, float e, std::vector<RowQuant>* quant,
                  std::vector<uint16_t>* codes, std::vector<uint32_t>* keys);

// Writes the header and the data of pack (h, p) from codes[(t * H + h) * D + d], its data at
// `off`; returns the offset after it.
struct PackScratch {
  std::vector<uint32_t> cmin;
  std::vector<int> width;
};
uint64_t WritePack(const Layout& l, const std::vector<uint16_t>& perm,
                   const std::vector<uint16_t>& codes, uint32_t h, uint32_t p, uint8_t* out,
                   uint64_t off, PackScratch* scratch);

// Decoding side: the stored rows' float step and minimum and output token, validated.
struct RowTable {
  std::vector<float> s;         // [h * T + i]
  std::vector<float> mn;        // [h * T + i]
  std::vector<uint16_t> token;  // [h * T + i]
};
// DataLoss for a payload shorter than the fixed sections, a non-finite minimum or step, a
// negative step or a permutation that is not one.
absl::Status ReadRows(const Layout& l, DType dtype, const uint8_t* payload, uint64_t size,
                      RowTable* rows);

// One pack's header, validated: widths, minimum codes and byte offsets of its columns.
struct PackInfo {
  std::vector<uint8_t> width;
  std::vector<uint32_t> col_min;
  std::vector<uint64_t> col_offset;  // absolute offsets in the payload
  uint64_t end = 0;                  // offset after the pack's data
};
// DataLoss when a width or the minimum width exceeds bits, a minimum exceeds qmax, or the pack
// runs past `size`. `offset`: where its data starts.
absl::Status ReadPack(const Layout& l, const uint8_t* payload, uint64_t size, uint64_t pack,
                      uint64_t offset, PackInfo* info);

// Decodes pack (h, p) with plain loops; DataLoss for a code above qmax.
absl::Status DecodePackRef(const Layout& l, DType dtype, const RowTable& rows,
                           const uint8_t* payload, const PackInfo& info, uint32_t h, uint32_t p,
                           uint16_t* out);

}  // namespace kvpool::kernels::packkv::internal

#endif  // KVPOOL_KERNELS_PACKKV_KERNELS_CUH_
