// packkv reference: plain loops, the definition of the packkv payload format.
//
// PackKV-style (2025): per-token quantisation with a step relative to the token's range, an
// optional re-ordering of the tokens, then bit-width-adaptive packing per pack of G tokens and
// per column. Notation: T tokens, H heads, D head_dim, b = params.bits (the largest bit width),
// Q = 2^b - 1, G = params.group (tokens per pack), P = ceil(T/G) packs per head; a row is one
// token of one head (D values), rows r = t*H + h in input order.
//
// Quantisation of a row x_0..x_{D-1}, in float32:
//   mn = min x_d + 0, mx = max x_d + 0 (the "+ 0" turns a zero extreme into +0), R = mx - mn.
//   Scale (one per segment): e = clamp(float(bq * sqrt(12 * S2 / (D * SR))), 1/Q, 1), e = 1 when
//     SR = 0, where S2 = sum of x^2 over the segment and SR = sum over rows of R^2, both in
//     double in the fixed order below, and bq = 0.95 * sqrt(max(budget^2 - c^2, budget^2 / 4)):
//     c = u/sqrt(3) is the output rounding noise, u the dtype's unit roundoff (fp16 2^-11,
//     bf16 2^-8). Why: uniform quantisation with step s_r = e*R_r leaves errors of RMS
//     s_r/sqrt(12) on a row's elements, so the segment's squared error is about
//     sum_r D*s_r^2/12 = e^2*D*SR/12; equal to bq^2*S2 for the e above, i.e. a relative L2
//     error of about bq (0.95 of the budget, less the rounding noise). When e hits 1/Q (the
//     budget would need more than b bits) the budget is not met. The rule depends on the data
//     only through S2/SR, so the decoder never needs e.
//   Step: s = e*R rounded DOWN to the dtype (the largest fp16/bf16 value <= e*R), raised to the
//     dtype's smallest usable step (fp16 2^-24, bf16 2^-126) and lowered to its largest finite
//     value; no step (0) when R = 0. The minimum is stored exactly: it is one of the elements.
//   Codes: inv = 1/s (0 when s = 0); top = nearbyint(min(R*inv, Q)), lowered while
//     dtype(float(top)*s + mn) overflows; q = nearbyint(min((x - mn)*inv, top)), ties to even.
//   Decoding: x' = dtype(float(q)*s + mn), a float32 multiply then an add (no FMA), rounded to
//     the dtype to nearest even.
//   Fixed-order sums: a row's sum of squares keeps 8 lanes (lane d % 8, increasing d, exact
//   double products) combined as ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)); the segment keeps 256
//   lanes (lane r % 256, increasing r) for S2 and for SR (R as float, squared in double),
//   reduced by a pairwise tree: for stride = 128, 64, ..., 1: lane[i] += lane[i + stride].
//
// Re-ordering (params.flags bit 0): per head, the tokens are stably sorted by the sum of their D
//   codes (an integer), so that rows with similar codes share packs; without it the order is
//   the identity. Position i of head h holds token perm[h][i].
//
// Packing: pack p of head h holds positions [p*G, min(T, p*G + G)), n tokens. For each column d:
//   cmin_d = the smallest code, w_d = the bit length of (largest code - cmin_d), written as a
//   4-bit width code min(w_d, 15) where 15 means b bits (so with b = 16 a column that needs 15
//   bits takes 16). mw = the bit length of the pack's largest cmin_d.
//
// Payload layout (little-endian):
//   [0, 4HT)        row parameters, for each h, then each position i: u16 minimum, u16 step
//                   (dtype bit patterns)
//   [4HT, 6HT)      only with re-ordering: u16 perm[h][i], for each h, then each position i
//   pack headers    1 + ceil(D/2) bytes for each pack, in order h*P + p: u8 mw, then the width
//                   codes, column d in the low (d even) or high (d odd) nibble of byte d/2
//   pack data       for each pack in the same order, back to back:
//                     ceil(D*mw/8) bytes: cmin_0..cmin_{D-1}, mw bits each, LSB first;
//                     then for each column d, ceil(n*w_d/8) bytes: the n values q - cmin_d of
//                     the pack's positions in order, w_d bits each, LSB first.
// Everything but the pack data sits at a fixed offset, and the pack data offsets follow from
// the headers (a pack takes ceil(D*mw/8) + sum_d ceil(n*w_d/8) bytes), so a GPU finds every
// column with a scan over the headers, and with G = 16 every column is a whole 2*w_d bytes.
// The payload size is exactly the sum; an empty segment (no elements) has an empty payload.
//
// Decoders reject (DataLoss) a size other than the exact one, a non-finite minimum or step, a
// negative step, a permutation that is not one, mw or a width above b, a minimum or a code above
// Q; they ignore the padding bits. On an error the output holds unspecified values.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "kernels/packkv.h"
#include "kernels/packkv_kernels.cuh"

namespace kvpool::kernels::packkv {
namespace internal {
namespace {

bool IsFp16(DType dtype) { return dtype == DType::kFp16; }
float ToFloat(uint16_t h, DType dtype) { return IsFp16(dtype) ? Fp16ToFloat(h) : Bf16ToFloat(h); }
uint16_t FromFloat(float f, DType dtype) { return IsFp16(dtype) ? FloatToFp16(f) : FloatToBf16(f); }
uint16_t ExponentMask(DType dtype) { return IsFp16(dtype) ? 0x7c00 : 0x7f80; }
bool FiniteBits(uint16_t h, DType dtype) {
  return (h & ExponentMask(dtype)) != ExponentMask(dtype);
}

struct Fp16Conv {
  static float ToFloat(uint16_t h) { return Fp16ToFloat(h); }
  static uint16_t FromFloat(float f) { return FloatToFp16(f); }
  static constexpr uint16_t kExponent = 0x7c00;
  static constexpr uint16_t kMinStep = 0x0001;  // 2^-24
};
struct Bf16Conv {
  static float ToFloat(uint16_t h) { return Bf16ToFloat(h); }
  static uint16_t FromFloat(float f) { return FloatToBf16(f); }
  static constexpr uint16_t kExponent = 0x7f80;
  static constexpr uint16_t kMinStep = 0x0080;  // 2^-126
};

// ORs the low `w` bits of v in at bit `bit` of zeroed memory.
void PutBits(uint8_t* base, uint64_t bit, uint32_t v, int w) {
  for (int k = 0; k < w; ++k, ++bit) {
    if ((v >> k) & 1u) base[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
  }
}

// Bits [bit, bit + w) of base (w <= 16), reading only the bytes that hold them.
uint32_t GetBits(const uint8_t* base, uint64_t bit, int w) {
  if (w == 0) return 0;
  const uint64_t first = bit / 8, last = (bit + w - 1) / 8;
  uint32_t word = 0;
  for (uint64_t b = first; b <= last; ++b) word |= uint32_t{base[b]} << (8 * (b - first));
  return (word >> (bit % 8)) & ((1u << w) - 1);
}

uint16_t Load16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
void Store16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// Min, max and the fixed-order sum of squares of one row; false when an element is not finite.
bool StatRow(const uint16_t* x, uint32_t dim, DType dtype, RowStat* stat) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  double lanes[kRowLanes] = {};
  for (uint32_t d = 0; d < dim; ++d) {
    const float v = ToFloat(x[d], dtype);
    if (!std::isfinite(v)) return false;
    if (v < mn) mn = v;
    if (v > mx) mx = v;
    lanes[d % kRowLanes] += static_cast<double>(v) * static_cast<double>(v);
  }
  stat->mn = mn + 0.0f;
  stat->mx = mx + 0.0f;
  stat->sum_sq = CombineRowLanes(lanes);
  return true;
}

// Widths (bits) and minimum codes of pack (h, p); writes its header, returns mw.
int PackColumns(const Layout& l, const std::vector<uint16_t>& perm,
                const std::vector<uint16_t>& codes, uint32_t h, uint32_t p, uint8_t* header,
                std::vector<uint32_t>* cmin, std::vector<int>* width) {
  const uint32_t n = PackTokens(l, p);
  const uint16_t* pos_token = perm.data() + uint64_t{h} * l.tokens + uint64_t{p} * l.group;
  std::memset(header, 0, l.header_bytes);
  uint32_t largest_min = 0;
  for (uint32_t d = 0; d < l.dim; ++d) {
    uint32_t lo = l.qmax, hi = 0;
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t c = codes[(uint64_t{pos_token[i]} * l.heads + h) * l.dim + d];
      lo = std::min(lo, c);
      hi = std::max(hi, c);
    }
    const int code = CodeForWidth(BitLength(hi - lo));
    (*cmin)[d] = lo;
    (*width)[d] = WidthFromCode(code, l.bits);
    header[1 + d / 2] |= static_cast<uint8_t>(code << (4 * (d % 2)));
    largest_min = std::max(largest_min, lo);
  }
  header[0] = static_cast<uint8_t>(BitLength(largest_min));
  return header[0];
}

}  // namespace

absl::Status CheckParams(const SegmentShape& shape, const CodecParams& params) {
  if (params.codec != CodecId::kPackKv) {
    return absl::InvalidArgumentError("packkv: parameters of another codec");
  }
  if (params.bits < 2 || params.bits > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("packkv: max bits must be in [2, 16], got ", params.bits));
  }
  if (params.group == 0) return absl::InvalidArgumentError("packkv: pack size (group) is 0");
  if ((params.flags & ~1u) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("packkv: unknown flags 0x", absl::Hex(params.flags)));
  }
  if (shape.dtype != DType::kFp16 && shape.dtype != DType::kBf16) {
    return absl::InvalidArgumentError("packkv: dtype must be fp16 or bf16");
  }
  if (shape.tokens > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("packkv: at most 65536 tokens, got ", shape.tokens));
  }
  return absl::OkStatus();
}

absl::Status CheckEncodeArgs(const SegmentShape& shape, const CodecParams& params,
                             uint64_t capacity) {
  KVPOOL_RETURN_IF_ERROR(CheckParams(shape, params));
  if (!(params.budget > 0 && params.budget < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("packkv: error budget must be in (0, 1), got ", params.budget));
  }
  const uint64_t need = MaxPayloadBytes(shape, params);
  if (capacity < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("packkv: output capacity ", capacity, " < MaxPayloadBytes ", need));
  }
  return absl::OkStatus();
}

Layout LayoutFor(const SegmentShape& shape, const CodecParams& params) {
  return MakeLayout(shape.tokens, shape.kv_heads, shape.head_dim, params.group, params.bits,
                    (params.flags & 1) != 0);
}

double QuantBudget(float budget, DType dtype) {
  const double u = IsFp16(dtype) ? 0x1p-11 : 0x1p-8;
  const double b2 = static_cast<double>(budget) * budget;
  const double q2 = std::max(b2 - u * u / 3, b2 / 4);
  return 0.95 * std::sqrt(q2);
}

RowQuant QuantizeRow(float mn, float mx, float e, DType dtype, uint32_t qmax) {
  return IsFp16(dtype) ? QuantizeRowWith<Fp16Conv>(mn, mx, e, qmax)
                       : QuantizeRowWith<Bf16Conv>(mn, mx, e, qmax);
}

float SegmentScale(const std::vector<RowStat>& stats, const Layout& l, double budget_q) {
  double sq[kSegmentLanes] = {}, r2[kSegmentLanes] = {};
  for (size_t r = 0; r < stats.size(); ++r) {
    const double range = stats[r].mx - stats[r].mn;
    sq[r % kSegmentLanes] += stats[r].sum_sq;
    r2[r % kSegmentLanes] += range * range;
  }
  return ScaleFromSums(TreeReduce(sq), TreeReduce(r2), l.dim, budget_q, l.qmax);
}

// Row quantisers, codes (input order) and re-ordering keys (code sums) of every row.
void QuantizeRows(const Layout& l, DType dtype, const uint16_t* in,
                  const std::vector<RowStat>& stats, float e, std::vector<RowQuant>* quant,
                  std::vector<uint16_t>* codes, std::vector<uint32_t>* keys) {
  for (uint64_t r = 0; r < stats.size(); ++r) {
    const RowQuant q = QuantizeRow(stats[r].mn, stats[r].mx, e, dtype, l.qmax);
    (*quant)[r] = q;
    uint32_t key = 0;
    for (uint32_t d = 0; d < l.dim; ++d) {
      const float v = (ToFloat(in[r * l.dim + d], dtype) - q.mn) * q.inv;
      const uint32_t c = static_cast<uint32_t>(std::nearbyint(std::min(v, float(q.top))));
      (*codes)[r * l.dim + d] = static_cast<uint16_t>(c);
      key += c;
    }
    (*keys)[r] = key;
  }
}

void OrderTokens(const Layout& l, const std::vector<uint32_t>& keys, std::vector<uint16_t>* perm) {
  perm->resize(uint64_t{l.tokens} * l.heads);
  for (uint32_t h = 0; h < l.heads; ++h) {
    uint16_t* order = perm->data() + uint64_t{h} * l.tokens;
    for (uint32_t t = 0; t < l.tokens; ++t) order[t] = static_cast<uint16_t>(t);
    if (!l.reorder) continue;
    std::stable_sort(order, order + l.tokens, [&](uint16_t a, uint16_t b) {
      return keys[uint64_t{a} * l.heads + h] < keys[uint64_t{b} * l.heads + h];
    });
  }
}

void WriteRows(const Layout& l, const std::vector<RowQuant>& rows,
               const std::vector<uint16_t>& perm, uint8_t* out) {
  for (uint32_t h = 0; h < l.heads; ++h) {
    for (uint32_t i = 0; i < l.tokens; ++i) {
      const uint64_t pos = uint64_t{h} * l.tokens + i;
      const RowQuant& q = rows[uint64_t{perm[pos]} * l.heads + h];
      Store16(out + 4 * pos, q.min_bits);
      Store16(out + 4 * pos + 2, q.step_bits);
      if (l.reorder) Store16(out + l.perm_offset + 2 * pos, perm[pos]);
    }
  }
}

uint64_t WritePack(const Layout& l, const std::vector<uint16_t>& perm,
                   const std::vector<uint16_t>& codes, uint32_t h, uint32_t p, uint8_t* out,
                   uint64_t off, PackScratch* scratch) {
  std::vector<uint32_t>& cmin = scratch->cmin;
  std::vector<int>& width = scratch->width;
  cmin.resize(l.dim);
  width.resize(l.dim);
  uint8_t* header = out + l.headers_offset + (uint64_t{h} * l.packs_per_head + p) * l.header_bytes;
  const int mw = PackColumns(l, perm, codes, h, p, header, &cmin, &width);
  const uint64_t min_bytes = BitBytes(l.dim, mw);
  std::memset(out + off, 0, min_bytes);
  for (uint32_t d = 0; d < l.dim; ++d) PutBits(out + off, uint64_t{d} * mw, cmin[d], mw);
  off += min_bytes;
  const uint32_t n = PackTokens(l, p);
  const uint16_t* pos_token = perm.data() + uint64_t{h} * l.tokens + uint64_t{p} * l.group;
  for (uint32_t d = 0; d < l.dim; ++d) {
    const uint64_t bytes = BitBytes(n, width[d]);
    std::memset(out + off, 0, bytes);
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t c = codes[(uint64_t{pos_token[i]} * l.heads + h) * l.dim + d];
      PutBits(out + off, uint64_t{i} * width[d], c - cmin[d], width[d]);
    }
    off += bytes;
  }
  return off;
}

absl::Status ReadRows(const Layout& l, DType dtype, const uint8_t* payload, uint64_t size,
                      RowTable* rows) {
  if (size < l.data_offset) {
    return absl::DataLossError(absl::StrCat(
        "packkv payload of ", size, " bytes is shorter than its fixed part, ", l.data_offset));
  }
  const uint64_t count = uint64_t{l.tokens} * l.heads;
  rows->s.resize(count);
  rows->mn.resize(count);
  rows->token.resize(count);
  std::vector<uint8_t> seen(l.tokens);
  for (uint32_t h = 0; h < l.heads; ++h) {
    if (l.reorder) std::fill(seen.begin(), seen.end(), 0);
    for (uint32_t i = 0; i < l.tokens; ++i) {
      const uint64_t pos = uint64_t{h} * l.tokens + i;
      const uint16_t mn = Load16(payload + 4 * pos), s = Load16(payload + 4 * pos + 2);
      if (!FiniteBits(mn, dtype) || !FiniteBits(s, dtype) || (s & 0x8000) != 0) {
        return absl::DataLossError(absl::StrCat("packkv: bad minimum or step in row ", pos));
      }
      rows->mn[pos] = ToFloat(mn, dtype);
      rows->s[pos] = ToFloat(s, dtype);
      uint16_t t = static_cast<uint16_t>(i);
      if (l.reorder) {
        t = Load16(payload + l.perm_offset + 2 * pos);
        if (t >= l.tokens || seen[t]) {
          return absl::DataLossError(absl::StrCat("packkv: bad permutation in head ", h));
        }
        seen[t] = 1;
      }
      rows->token[pos] = t;
    }
  }
  return absl::OkStatus();
}

absl::Status ReadPack(const Layout& l, const uint8_t* payload, uint64_t size, uint64_t pack,
                      uint64_t offset, PackInfo* info) {
  const uint8_t* header = payload + l.headers_offset + pack * l.header_bytes;
  const int mw = header[0];
  if (mw > l.bits) return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " mw ", mw));
  const uint32_t n = PackTokens(l, static_cast<uint32_t>(pack % l.packs_per_head));
  info->width.resize(l.dim);
  info->col_min.resize(l.dim);
  info->col_offset.resize(l.dim);
  uint64_t off = offset + BitBytes(l.dim, mw);
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int w = WidthFromCode((header[1 + d / 2] >> (4 * (d % 2))) & 15, l.bits);
    if (w > l.bits) {
      return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " width ", w));
    }
    info->width[d] = static_cast<uint8_t>(w);
    info->col_offset[d] = off;
    off += BitBytes(n, w);
  }
  if (off > size) {
    return absl::DataLossError(
        absl::StrCat("packkv: pack ", pack, " ends at ", off, ", past the payload (", size, ")"));
  }
  for (uint32_t d = 0; d < l.dim; ++d) {
    info->col_min[d] = GetBits(payload + offset, uint64_t{d} * mw, mw);
    if (info->col_min[d] > l.qmax) {
      return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " minimum above max"));
    }
  }
  info->end = off;
  return absl::OkStatus();
}

absl::Status DecodePackRef(const Layout& l, DType dtype, const RowTable& rows,
                           const uint8_t* payload, const PackInfo& info, uint32_t h, uint32_t p,
                           uint16_t* out) {
  const uint32_t n = PackTokens(l, p);
  const uint64_t first = uint64_t{h} * l.tokens + uint64_t{p} * l.group;
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int w = info.width[d];
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t code =
          info.col_min[d] + GetBits(payload + info.col_offset[d], uint64_t{i} * w, w);
      if (code > l.qmax) return absl::DataLossError("packkv: code above max");
      const float x = static_cast<float>(code) * rows.s[first + i] + rows.mn[first + i];
      out[(uint64_t{rows.token[first + i]} * l.heads + h) * l.dim + d] = FromFloat(x, dtype);
    }
  }
  return absl::OkStatus();
}

}  // namespace internal

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params) {
  if (shape.Elements() == 0) return 0;
  const int bits = std::clamp<int>(params.bits, 2, 16);
  const uint32_t group = std::max<uint32_t>(params.group, 1);
  const internal::Layout l = internal::MakeLayout(shape.tokens, shape.kv_heads, shape.head_dim,
                                                  group, bits, (params.flags & 1) != 0);
  const uint64_t full = l.tokens / group, last = l.tokens % group;
  const uint64_t per_head = l.packs_per_head * internal::BitBytes(l.dim, bits) +
                            full * l.dim * internal::BitBytes(group, bits) +
                            l.dim * internal::BitBytes(last, bits);
  return l.data_offset + l.heads * per_head;
}

absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  KVPOOL_RETURN_IF_ERROR(internal::CheckEncodeArgs(shape, params, capacity));
  if (shape.Elements() == 0) return uint64_t{0};
  const internal::Layout l = internal::LayoutFor(shape, params);
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  std::vector<internal::RowStat> stats(rows);
  for (uint64_t r = 0; r < rows; ++r) {
    if (!internal::StatRow(in + r * l.dim, l.dim, shape.dtype, &stats[r])) {
      return absl::InvalidArgumentError(absl::StrCat("packkv: non-finite element in row ", r));
    }
  }
  const float e =
      internal::SegmentScale(stats, l, internal::QuantBudget(params.budget, shape.dtype));
  std::vector<internal::RowQuant> quant(rows);
  std::vector<uint16_t> codes(shape.Elements());
  std::vector<uint32_t> keys(rows, 0);
  internal::QuantizeRows(l, shape.dtype, in, stats, e, &quant, &codes, &keys);
  std::vector<uint16_t> perm;
  internal::OrderTokens(l, keys, &perm);
  internal::WriteRows(l, quant, perm, out);
  internal::PackScratch scratch;
  uint64_t off = l.data_offset;
  for (uint32_t h = 0; h < l.heads; ++h) {
    for (uint32_t p = 0; p < l.packs_per_head; ++p) {
      off = internal::WritePack(l, perm, codes, h, p, out, off, &scratch);
    }
  }
  return off;
}

absl::Status DecodeRef(const SegmentShape& shape, const CodecParams& params, const uint8_t* payload,
                       uint64_t size, uint16_t* out) {
  KVPOOL_RETURN_IF_ERROR(internal::CheckParams(shape, params));
  if (shape.Elements() == 0) {
    if (size == 0) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat("packkv: empty segment with a ", size, "-byte payload"));
  }
  const internal::Layout l = internal::LayoutFor(shape, params);
  internal::RowTable rows;
  KVPOOL_RETURN_IF_ERROR(internal::ReadRows(l, shape.dtype, payload, size, &rows));
  internal::PackInfo info;
  uint64_t off = l.data_offset;
  for (uint64_t pack = 0; pack < l.num_packs; ++pack) {
    KVPOOL_RETURN_IF_ERROR(internal::ReadPack(l, payload, size, pack, off, &info));
    const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
    const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
    KVPOOL_RETURN_IF_ERROR(internal::DecodePackRef(l, shape.dtype, rows, payload, info, h, p, out));
    off = info.end;
  }
  if (off != size) {
    return absl::DataLossError(
        absl::StrCat("packkv: payload is ", size, " bytes, its packs end at ", off));
  }
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::packkv
