// The kvpool codec, reference path: plain loops, the definition of the payload format.
//
// Idea. Per head, a segment is centred (a mean per channel), its dominant low-rank structure
// across head_dim is taken out (a rank r <= 8 basis found by a sketched subspace iteration and
// a small eigen-decomposition), and the residual is quantised with one uniform step for the
// whole segment (equal error per element minimises the relative L2 error for its bytes), in
// mode 3 scaled down per token and head where attention is likely to look (below). The
// prediction (mean + low-rank) is formed from the quantised basis and coefficients with the
// decoder's own arithmetic, so its quantisation error lands in the residual and the only error
// left is the residual's rounding plus the output rounding to fp16/bf16. The encoder measures
// that error on the decoded values and shrinks the step until ||x' - x|| / ||x|| <= budget;
// if no step meets it (non-finite input, codes too wide) it stores the elements raw.
// Codes are zigzag integers. Mode 3 (the default) entropy-codes them (rANS, tables per group of
// similar columns), the means and the basis too, with steps tied to the residual's (their
// rounding lands in the residual); mode 1 (CodecParams::flags bit 2, and the GPU encoder) stores
// means as the dtype, the basis as int8 and the codes in packs of 16 tokens of one column, each
// pack with its own bit width (a nibble), as bit planes: about 40% larger, simpler to decode.
// Mode 2 (mode 3 with mode 1's means and basis) is retired and rejected. Keys' budget can be
// tightened by `extra`. The fast profile (flags bit 4, kvpool_fast.cc) writes mode 1 with rank
// 0 and a class map, for CPU encode and decode at memory speeds.
//
// Token weighting (modes 1 and 3). The residual step may differ per token and head: a query attends
// mostly to the tokens whose keys lie far from the head's mean key (their logits q.k spread
// the most), so their errors, in keys and in values, move the attention output far more than
// the others'. The encoder puts each (token, head) in a class by its key's squared distance
// from the mean, in units of the mean such distance (TokenClasses in kvpool_analysis.cc);
// class k quantises with step * 2^(-k/4). A value segment takes its classes from its layer's
// keys when the caller passes them (EncodeSegment's `keys`), else every token is class 0. The
// relative L2 budget still holds (the step search measures it); the bytes go where attention
// looks.
//
// Parameters: budget (relative L2 per segment, (0, 1)); extra bits 0-7: key budget scale in
// 1/64 (0 means 64/64: keys use the whole budget); flags bit 2: write mode 1; flags bit 3:
// weight every token equally (no class map); flags bit 4: the fast profile (kvpool_fast.cc);
// other bits unused.
//
// Payload (little-endian; H = kv_heads, D = head_dim, T = tokens, G = ceil(T / 16)):
//   0  1  mode: 0 raw, 1 coded with packs, 3 coded with entropy-coded streams
//   1  1  flags: bit 0 (modes 1 and 3) a token class map follows the direction entries;
//         other bits 0
//   2  2  reserved, 0
//   4  4  f32 residual step (modes 1, 3: finite, > 0; mode 0: 0)
// mode 0: T*H*D elements, 2 bytes each (the segment's dtype); nothing else.
// mode 1:
//   H bytes          rank r_h of each head, <= 8
//   H*D*2 bytes      mean m[h][d], one element of the segment's dtype
//   per head h, per direction j < r_h (8 + D bytes each):
//      f32 coefficient step cs, f32 basis scale bs (both finite), D int8 basis codes b
//   with flags bit 0: the class map as in mode 3
//   coefficients     [T][R] codes (R = sum of r_h; column of (h, j) = r_0 + .. + r_{h-1} + j)
//   residual         [T][H*D] codes (column of (h, d) = h*D + d)
// the last two as pack streams.
// mode 3:
//   H bytes          rank r_h of each head, <= 8
//   4 bytes          f32 mean step ms (finite, > 0)
//   per direction, in mode 1's order (8 bytes each): f32 cs, f32 bs (both finite)
//   with flags bit 0: ceil(T*H/2) bytes, the class k of token t, head h in nibble t*H + h
//                    (low nibble first; padding 0)
//   means and basis  [D][H + R] codes: column h < H the mean codes of head h (m[h][d] =
//                    code * ms), column H + col the basis codes b of direction col
//   coefficients, residual as in mode 1
// the last three as entropy streams.
// The payload ends exactly after the residual's stream.
// A pack stream with C columns: ceil(G*C/2) bytes of widths (nibble k = pack k = g*C + c, low
// nibble first, each 0..15), then for each pack in that order 2*w bytes: w u16 bit planes,
// bit i of plane b = bit b of the zigzag code of token 16*g + i (zigzag: 0,-1,1,-2,..). Codes
// of tokens >= T are 0.
// An entropy stream of a [T][C] matrix (nothing at all when T or C is 0; kvpool_entropy.h):
//   1 byte           K, tables (1..16)
//   K * 65 bytes     per table: shift s (0..12), then 32 u16 frequencies summing to 4096
//   ceil(C/2) bytes  table of column c: nibble c (low nibble first; < K; padding 0)
//   L * 8 bytes      per lane (L = ceil(C/16), lane l = columns 16l .. 16l+15): u32 final rANS
//                    state (>= 2^16), u32 byte length of its data (even)
//   lane data        lane after lane, u16 words
// A zigzag code u of column c (table k, shift s) is hi = u >> s, then s low bits. Each lane
// decodes its codes token by token, columns in order: symbol = the table's symbol of slot
// x mod 4096 (symbols take consecutive slots in order, as many as their frequency), then
// x = freq * (x >> 12) + slot - start of the symbol; when x < 2^16: x = x << 16 | next word.
// Symbol 31 is an escape: hi = 31 + b0 + 256 * b1, two uniform bytes; a uniform value of n
// bits is slot >> (12 - n) with frequency 2^(12-n); the s low bits are one uniform value.
// After the last code x is 2^16 and every word is read. Codes above 32766 are invalid.
//
// Decoding (float32, no fused multiply-add, round to nearest even):
//   B[h][j][d] = float(b) * bs;   c[t][h][j] = float(coefficient) * cs
//   mean: float(m[h][d]) (mode 1) or float(mean code) * ms (mode 3)
//   p = mean; for j = 0 .. r_h - 1: p = p + c[t][h][j] * B[h][j][d]
//   s = step, or with a class map step * ClassScale(k) (2^(-k/4) as kvpool_format.h's
//   literals give it; one float multiplication)
//   x'[t][h][d] = to_dtype(p + float(residual code) * s)
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/kvpool.h"
#include "kernels/kvpool_format.h"
#include "kernels/kvpool_rows.h"

namespace kvpool::kernels::kvpool {
namespace internal {
uint16_t Load16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
namespace {
float LoadF32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
uint32_t Nibble(const uint8_t* widths, uint64_t k) { return (widths[k / 2] >> (4 * (k & 1))) & 15; }

// Checks one pack stream at *pos; on success advances *pos past it.
absl::Status ParsePacks(const uint8_t* payload, uint64_t size, uint64_t groups, uint64_t cols,
                        uint64_t* pos, const uint8_t** widths, const uint8_t** data) {
  const uint64_t n = groups * cols, width_bytes = (n + 1) / 2;
  if (size - *pos < width_bytes) return absl::DataLossError("kvpool: pack widths truncated");
  *widths = payload + *pos;
  *pos += width_bytes;
  // Sum of the widths, 16 nibbles at a time: each byte's two nibbles add (<= 30), then the
  // multiply sums the 8 bytes (<= 240) into the top byte.
  uint64_t bytes = 0, k = 0;
  const uint64_t lo = 0x0f0f0f0f0f0f0f0full, ones = 0x0101010101010101ull;
  for (; k + 16 <= n; k += 16) {
    uint64_t x;
    std::memcpy(&x, *widths + k / 2, 8);
    bytes += 2 * ((((x & lo) + ((x >> 4) & lo)) * ones) >> 56);
  }
  for (; k < n; ++k) bytes += 2 * Nibble(*widths, k);
  if (size - *pos < bytes) return absl::DataLossError("kvpool: pack data truncated");
  *data = payload + *pos;
  *pos += bytes;
  return absl::OkStatus();
}

// Decodes a pack stream into codes[(16 * g + i) * cols + c].
void DecodePacks(const uint8_t* widths, const uint8_t* data, uint32_t groups, uint32_t cols,
                 std::vector<int32_t>* codes) {
  codes->assign(uint64_t{groups} * kPack * cols, 0);
  for (uint32_t g = 0; g < groups; ++g) {
    for (uint32_t c = 0; c < cols; ++c) {
      const uint32_t w = Nibble(widths, uint64_t{g} * cols + c);
      for (uint32_t i = 0; i < kPack; ++i) {
        uint32_t u = 0;
        for (uint32_t b = 0; b < w; ++b) u |= ((Load16(data + 2 * b) >> i) & 1u) << b;
        (*codes)[(uint64_t{g} * kPack + i) * cols + c] = UnZigZag(u);
      }
      data += 2 * w;
    }
  }
}

double Tree(const double* s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }
float Tree(const float* s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

// Reference kernels (EncodeKernels): plain loops.
bool LoadRef(DType dtype, const uint16_t* in, uint64_t n, float* x, double* energy) {
  double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  bool finite = true;
  for (uint64_t i = 0; i < n; ++i) {
    x[i] = ToFloat(dtype, in[i]);
    if (!std::isfinite(x[i])) finite = false;
    sums[i % 8] += double(x[i]) * double(x[i]);
  }
  *energy = Tree(sums);
  return finite;
}

void DotRef(const float* rows, uint64_t ld, uint32_t count, uint32_t stride, const float* s,
            uint32_t k, uint32_t D, float* y) {
  for (uint32_t n = 0; n < count; ++n) {
    const float* r = rows + uint64_t{n} * stride * ld;
    for (uint32_t j = 0; j < k; ++j) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (uint32_t d = 0; d < D; ++d) acc[d % 8] = acc[d % 8] + r[d] * s[j * D + d];
      y[uint64_t{n} * k + j] = Tree(acc);
    }
  }
}

void AccumulateRef(const float* rows, uint64_t ld, uint32_t count, uint32_t stride,
                   const float* w, uint32_t k, uint32_t D, float* out) {
  for (uint32_t n = 0; n < count; ++n) {
    const float* r = rows + uint64_t{n} * stride * ld;
    for (uint32_t j = 0; j < k; ++j) {
      const float wj = w[uint64_t{n} * k + j];
      for (uint32_t d = 0; d < D; ++d) out[j * D + d] = out[j * D + d] + wj * r[d];
    }
  }
}

void PredictRef(uint32_t T, uint64_t HD, uint32_t D, uint32_t r, const float* m, const float* cf,
                const float* basis, float* pred) {
  const uint32_t G = Groups(T);
  for (uint32_t g = 0; g < G; ++g)
    for (uint32_t d = 0; d < D; ++d)
      for (uint32_t i = 0; i < kPack; ++i) {
        const uint32_t t = g * kPack + i;
        float p = 0;
        if (t < T) {
          p = m[d];
          for (uint32_t j = 0; j < r; ++j) p = p + cf[uint64_t{j} * G * kPack + t] * basis[j * D + d];
        }
        pred[(uint64_t{g} * HD + d) * kPack + i] = p;
      }
}

void ToPacksRef(const float* x, uint32_t T, uint64_t HD, float* xp) {
  const uint32_t G = Groups(T);
  for (uint32_t g = 0; g < G; ++g)
    for (uint64_t c = 0; c < HD; ++c)
      for (uint32_t i = 0; i < kPack; ++i) {
        const uint32_t t = g * kPack + i;
        xp[(g * HD + c) * kPack + i] = t < T ? x[t * HD + c] : 0.f;
      }
}

bool QuantizeRef(const Analysis& a, DType dtype, uint64_t packs, uint32_t stride, float step,
                 uint16_t* codes, double* err) {
  double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint64_t k = 0; k < packs; k += stride) {
    const float* scale = &a.scale[k / a.head_dim * kPack];
    for (uint32_t i = 0; i < kPack; ++i) {
      const uint64_t e = k * kPack + i;
      const float x = a.xp[e], p = a.prediction[e];
      const float s = step * scale[i], inv = 1.f / s;
      const float v = std::nearbyint((x - p) * inv);
      if (!(std::fabs(v) <= kMaxCode)) return false;
      const int32_t q = int32_t(v);
      if (codes != nullptr) codes[e] = uint16_t(ZigZag(q));
      const float y = ToFloat(dtype, FromFloat(dtype, p + float(q) * s));
      const float diff = y - x;
      sums[i % 8] += double(diff) * double(diff);
    }
  }
  *err = Tree(sums);
  return std::isfinite(*err);
}

uint64_t PackRef(const uint16_t* codes, uint64_t packs, uint8_t* out) {
  const uint64_t width_bytes = (packs + 1) / 2;
  std::memset(out, 0, width_bytes);
  uint64_t pos = width_bytes;
  for (uint64_t k = 0; k < packs; ++k) {
    const uint16_t* u = codes + k * kPack;
    uint32_t all = 0;
    for (uint32_t i = 0; i < kPack; ++i) all |= u[i];
    uint32_t w = 0;
    while ((all >> w) != 0) ++w;
    out[k / 2] |= uint8_t(w << (4 * (k & 1)));
    for (uint32_t b = 0; b < w; ++b) {
      uint32_t plane = 0;
      for (uint32_t i = 0; i < kPack; ++i) plane |= ((u[i] >> b) & 1u) << i;
      out[pos++] = uint8_t(plane);
      out[pos++] = uint8_t(plane >> 8);
    }
  }
  return pos;
}

}  // namespace

float ToFloat(DType dtype, uint16_t h) {
  return ElementToFloat(dtype, h);
}
uint16_t FromFloat(DType dtype, float f) {
  return FloatToElement(dtype, f);
}

uint64_t RawPayloadBytes(const SegmentShape& shape) { return kHeaderBytes + shape.Bytes(); }

absl::StatusOr<uint64_t> WriteRawPayload(const SegmentShape& shape, const uint16_t* in,
                                         uint8_t* out, uint64_t capacity) {
  if (capacity < RawPayloadBytes(shape)) {
    return absl::InvalidArgumentError("kvpool: output too small");
  }
  std::memset(out, 0, kHeaderBytes);
  for (uint64_t i = 0; i < shape.Elements(); ++i) {
    out[kHeaderBytes + 2 * i] = uint8_t(in[i]);
    out[kHeaderBytes + 2 * i + 1] = uint8_t(in[i] >> 8);
  }
  return RawPayloadBytes(shape);
}

double TargetError(const SegmentShape& shape, const CodecParams& params) {
  double target = params.budget;
  const uint32_t key_scale = params.extra & 0xff;
  if (shape.kind == SegmentKind::kKey && key_scale != 0) target *= key_scale / 64.0;
  return target * (1 - 1e-6);  // Margin for the caller's own rounding of the measurement.
}

absl::Status ParseHead(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                       Parsed* parsed, uint64_t* end_of_head) {
  if (size < kHeaderBytes) return absl::DataLossError("kvpool: payload shorter than its header");
  parsed->mode = payload[0];
  parsed->end = payload + size;
  if (parsed->mode != kModeRaw && parsed->mode != kModeCoded && parsed->mode != kModeEntropy) {
    return absl::DataLossError("kvpool: unknown payload mode");
  }
  const uint8_t head_flags = parsed->mode == kModeRaw ? 0 : kHeadClasses;
  if ((payload[1] & ~head_flags) != 0 || payload[2] != 0 || payload[3] != 0) {
    return absl::DataLossError("kvpool: reserved header bits are not zero");
  }
  parsed->step = LoadF32(payload + 4);
  if (parsed->mode == kModeRaw) {
    if (size != RawPayloadBytes(shape)) {
      return absl::DataLossError(absl::StrCat("kvpool: raw payload is ", size, " bytes, expected ",
                                              RawPayloadBytes(shape)));
    }
    parsed->raw = payload + kHeaderBytes;
    *end_of_head = size;
    return absl::OkStatus();
  }
  if (!std::isfinite(parsed->step) || !(parsed->step > 0)) {
    return absl::DataLossError("kvpool: residual step is not a positive finite number");
  }
  const uint64_t H = shape.kv_heads, D = shape.head_dim;
  const bool side = parsed->mode == kModeEntropy;
  uint64_t pos = kHeaderBytes;
  const uint64_t means_bytes = side ? 4 : H * D * 2;
  if (size - pos < H + means_bytes) return absl::DataLossError("kvpool: payload truncated");
  parsed->ranks = payload + pos;
  pos += H;
  parsed->coef_cols = 0;
  for (uint64_t h = 0; h < H; ++h) {
    if (parsed->ranks[h] > kMaxRank) return absl::DataLossError("kvpool: rank above 8");
    parsed->coef_cols += parsed->ranks[h];
  }
  if (side) {
    parsed->mean_step = LoadF32(payload + pos);
    if (!std::isfinite(parsed->mean_step) || !(parsed->mean_step > 0)) {
      return absl::DataLossError("kvpool: mean step is not a positive finite number");
    }
  } else {
    parsed->means = payload + pos;
  }
  pos += means_bytes;
  const uint64_t stride = DirectionBytes(parsed->mode, shape.head_dim);
  const uint64_t dir_bytes = uint64_t{parsed->coef_cols} * stride;
  if (size - pos < dir_bytes) return absl::DataLossError("kvpool: basis truncated");
  parsed->directions = payload + pos;
  for (uint64_t j = 0; j < parsed->coef_cols; ++j) {
    const uint8_t* p = parsed->directions + j * stride;
    if (!std::isfinite(LoadF32(p)) || !std::isfinite(LoadF32(p + 4))) {
      return absl::DataLossError("kvpool: basis or coefficient step is not finite");
    }
  }
  pos += dir_bytes;
  if (payload[1] & kHeadClasses) {
    const uint64_t n = uint64_t{shape.tokens} * H, bytes = (n + 1) / 2;
    if (size - pos < bytes) return absl::DataLossError("kvpool: token classes truncated");
    parsed->classes = payload + pos;
    if ((n & 1) && (parsed->classes[bytes - 1] >> 4) != 0) {
      return absl::DataLossError("kvpool: token class padding is not zero");
    }
    pos += bytes;
  }
  *end_of_head = pos;
  return absl::OkStatus();
}

absl::Status ParsePayload(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                          Parsed* parsed) {
  uint64_t pos = 0;
  absl::Status s = ParseHead(shape, payload, size, parsed, &pos);
  if (!s.ok() || parsed->mode == kModeRaw) return s;
  const uint64_t H = shape.kv_heads, D = shape.head_dim, G = Groups(shape.tokens);
  const bool side = parsed->mode == kModeEntropy;
  if (side) {
    s = ParseStream(payload, size, shape.head_dim, shape.kv_heads + parsed->coef_cols, &pos,
                    &parsed->side_stream);
    if (s.ok()) {
      s = ParseStream(payload, size, shape.tokens, parsed->coef_cols, &pos, &parsed->coef_stream);
    }
    if (s.ok()) s = ParseStream(payload, size, shape.tokens, H * D, &pos, &parsed->res_stream);
    if (!s.ok()) return s;
  } else {
    s = ParsePacks(payload, size, G, parsed->coef_cols, &pos, &parsed->coef_widths,
                   &parsed->coef_data);
    if (!s.ok()) return s;
    s = ParsePacks(payload, size, G, H * D, &pos, &parsed->res_widths, &parsed->res_data);
    if (!s.ok()) return s;
  }
  if (pos != size) return absl::DataLossError("kvpool: bytes after the residual packs");
  return absl::OkStatus();
}

bool KeyClasses(const SegmentShape& shape, absl::Span<const uint8_t> payload,
                std::vector<uint8_t>* classes) {
  const uint8_t* map = nullptr;
  if (!payload.empty() && payload[0] == kModeRows) {
    if (!RowKeyClassMap(shape, payload.data(), payload.size(), &map)) return false;
  } else {
    SegmentShape key = shape;
    key.kind = SegmentKind::kKey;
    Parsed parsed;
    uint64_t end = 0;
    if (!ParseHead(key, payload.data(), payload.size(), &parsed, &end).ok() ||
        parsed.mode == kModeRaw) {
      return false;
    }
    map = parsed.classes;
  }
  classes->clear();
  if (map == nullptr) return true;
  classes->resize(uint64_t{shape.tokens} * shape.kv_heads);
  for (uint64_t i = 0; i < classes->size(); ++i) {
    (*classes)[i] = (map[i / 2] >> (4 * (i & 1))) & 15;
  }
  return true;
}

absl::Status DecodeLowRank(const SegmentShape& shape, const Parsed& parsed, LowRank* lr) {
  const uint32_t H = shape.kv_heads, D = shape.head_dim, G = Groups(shape.tokens);
  const uint32_t R = parsed.coef_cols;
  const bool side = parsed.mode == kModeEntropy;
  const uint64_t stride = DirectionBytes(parsed.mode, D);
  std::vector<int32_t> side_codes;  // Mode 3: [D][H + R]
  if (side) {
    side_codes.assign(uint64_t{D} * (H + R), 0);
    absl::Status s = DecodeStream(parsed.side_stream, side_codes.data(), H + R);
    if (!s.ok()) return s;
  }
  lr->means.resize(uint64_t{H} * D);
  for (uint32_t h = 0; h < H; ++h)
    for (uint32_t d = 0; d < D; ++d) {
      const uint64_t c = uint64_t{h} * D + d;
      lr->means[c] = side ? float(side_codes[uint64_t{d} * (H + R) + h]) * parsed.mean_step
                          : ToFloat(shape.dtype, Load16(parsed.means + 2 * c));
    }
  lr->basis.assign(uint64_t{H} * kMaxRank * D, 0.f);
  lr->first_col.assign(H + 1, 0);
  std::vector<float> cstep(R);
  for (uint32_t h = 0, col = 0; h < H; ++h) {
    lr->first_col[h] = col;
    for (uint32_t j = 0; j < parsed.ranks[h]; ++j, ++col) {
      const uint8_t* p = parsed.directions + col * stride;
      cstep[col] = LoadF32(p);
      const float bs = LoadF32(p + 4);
      for (uint32_t d = 0; d < D; ++d) {
        const int32_t code = side ? side_codes[uint64_t{d} * (H + R) + H + col]
                                  : int32_t(int8_t(p[kDirectionBytes + d]));
        lr->basis[(uint64_t{h} * kMaxRank + j) * D + d] = float(code) * bs;
      }
    }
  }
  lr->first_col[H] = R;
  std::vector<int32_t> codes;
  if (side) {
    codes.assign(uint64_t{G} * kPack * R, 0);
    absl::Status s = DecodeStream(parsed.coef_stream, codes.data(), R);
    if (!s.ok()) return s;
  } else {
    DecodePacks(parsed.coef_widths, parsed.coef_data, G, R, &codes);
  }
  lr->coefficients.resize(codes.size());
  for (uint64_t i = 0; i < codes.size(); ++i) lr->coefficients[i] = float(codes[i]) * cstep[i % R];
  return absl::OkStatus();
}

void TokenSteps(const SegmentShape& shape, const Parsed& parsed, std::vector<float>* steps) {
  const uint64_t n = uint64_t{shape.tokens} * shape.kv_heads;
  steps->resize(n);
  if (parsed.classes == nullptr) {
    std::fill(steps->begin(), steps->end(), parsed.step);
    return;
  }
  float by_class[kClasses];
  for (uint32_t k = 0; k < kClasses; ++k) by_class[k] = parsed.step * ClassScale(k);
  for (uint64_t i = 0; i < n; ++i) (*steps)[i] = by_class[Nibble(parsed.classes, i)];
}

absl::Status DecodeResidualCodes(const SegmentShape& shape, const Parsed& parsed,
                                 std::vector<int32_t>* codes) {
  const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
  const uint32_t G = Groups(shape.tokens);
  if (parsed.mode == kModeEntropy) {
    codes->assign(uint64_t{G} * kPack * HD, 0);
    return DecodeStream(parsed.res_stream, codes->data(), HD);
  }
  DecodePacks(parsed.res_widths, parsed.res_data, G, uint32_t(HD), codes);
  return absl::OkStatus();
}

bool AppendPacks(const std::vector<int32_t>& codes, uint32_t groups, uint32_t cols,
                 std::vector<uint8_t>* out) {
  const uint64_t n = uint64_t{groups} * cols;
  const uint64_t widths_at = out->size();
  out->resize(widths_at + (n + 1) / 2, 0);
  for (uint32_t g = 0; g < groups; ++g) {
    for (uint32_t c = 0; c < cols; ++c) {
      uint32_t u[kPack], all = 0;
      for (uint32_t i = 0; i < kPack; ++i) {
        u[i] = ZigZag(codes[(uint64_t{g} * kPack + i) * cols + c]);
        all |= u[i];
      }
      uint32_t w = 0;
      while (w < 32 && (all >> w) != 0) ++w;
      if (w > kMaxWidth) return false;
      const uint64_t k = uint64_t{g} * cols + c;
      (*out)[widths_at + k / 2] |= uint8_t(w << (4 * (k & 1)));
      for (uint32_t b = 0; b < w; ++b) {
        uint32_t plane = 0;
        for (uint32_t i = 0; i < kPack; ++i) plane |= ((u[i] >> b) & 1u) << i;
        out->push_back(uint8_t(plane));
        out->push_back(uint8_t(plane >> 8));
      }
    }
  }
  return true;
}

const EncodeKernels& RefKernels() {
  static const EncodeKernels k = {&LoadRef,  &DotRef,      &AccumulateRef, &PredictRef,
                                  &ToPacksRef, &QuantizeRef, &PackRef};
  return k;
}

namespace {

// Picks the step whose estimated error (on every kSubsample-th pack, scaled to all) is just
// under the target: a secant search in log-log. Returns the step and the fitted exponent.
constexpr uint32_t kSubsample = 7;
constexpr double kAim = 0.985;  // Aim this fraction of the allowed error.

float EstimateStep(const Analysis& a, DType dtype, uint64_t packs, QuantizeFnPtr quantize,
                   double allowed, double* alpha) {
  const double scale = double(packs) / double((packs + kSubsample - 1) / kSubsample);
  float step = a.first_step, prev_step = 0;
  double prev_err = 0;
  for (int it = 0; it < 5; ++it) {
    double err = 0;
    const bool fits = quantize(a, dtype, packs, kSubsample, step, nullptr, &err);
    err *= scale;
    double factor = 2.0;
    if (fits && err > 0) {
      if (prev_step > 0 && prev_err > 0 && prev_step != step) {
        const double fit = std::log(err / prev_err) / std::log(double(step) / prev_step);
        if (std::isfinite(fit)) *alpha = std::min(4.0, std::max(0.5, fit));
      }
      if (std::fabs(err / (kAim * allowed) - 1) < 0.01) break;
      factor = std::pow(kAim * allowed / err, 1 / *alpha);
      prev_step = step;
      prev_err = err;
    } else {
      prev_step = 0;
    }
    const float next = float(step * std::min(4.0, std::max(0.25, factor)));
    if (!(next > 0) || !std::isfinite(next)) break;
    step = next;
  }
  return step;
}

}  // namespace

absl::StatusOr<uint64_t> FinishEncode(const SegmentShape& shape, const CodecParams& params,
                                      const uint16_t* in, const EncodeKernels& kn, Analysis* a,
                                      uint8_t* out, uint64_t capacity) {
  const uint64_t raw_bytes = RawPayloadBytes(shape);
  const uint64_t packs = uint64_t{Groups(shape.tokens)} * shape.kv_heads * shape.head_dim;
  std::vector<uint8_t>& payload = a->payload;
  uint64_t size = 0;  // Of the coded payload; 0: raw.
  if (a->finite) {
    const double target = TargetError(shape, params);
    const double allowed = target * target * a->energy;
    double alpha = 2;
    float step = packs >= 64 * kSubsample
                     ? EstimateStep(*a, shape.dtype, packs, kn.quantize, allowed, &alpha)
                     : a->first_step;
    std::vector<uint16_t>& codes = a->codes;
    std::vector<uint16_t>& best_codes = a->best_codes;
    codes.resize(packs * kPack);
    float best_step = 0;
    bool tried_larger = false;
    for (int it = 0; it < kMaxSearch; ++it) {
      double err = 0;
      const bool fits = kn.quantize(*a, shape.dtype, packs, 1, step, codes.data(), &err);
      double factor = 2.0;
      if (fits && err <= allowed) {
        if (step > best_step) {
          best_step = step;
          best_codes.swap(codes);
          codes.resize(packs * kPack);
        }
        if (err >= 0.95 * allowed || tried_larger) break;
        tried_larger = true;
        factor = err > 0 ? std::pow(kAim * allowed / err, 1 / alpha) : 2.0;
      } else if (best_step > 0) {
        break;  // Overshot after a success.
      } else if (fits) {
        factor = std::min(0.995, std::pow(kAim * allowed / err, 1 / alpha));
      }
      const float next = float(step * std::min(4.0, std::max(0.25, factor)));
      if (!(next > 0) || !std::isfinite(next) || next == step) break;
      step = next;
    }
    if (best_step > 0) {
      payload.assign(kHeaderBytes, 0);
      payload[0] = (params.flags & kFlagPacked) ? kModeCoded : kModeEntropy;
      payload[1] = a->classes.empty() ? 0 : kHeadClasses;
      std::memcpy(&payload[4], &best_step, 4);
      payload.insert(payload.end(), a->head.begin(), a->head.end());
      const uint32_t T = shape.tokens, G = Groups(T), R = a->coef_cols;
      const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
      if (payload[0] == kModeCoded) {
        AppendPacks(a->coef_codes, G, R, &payload);  // Coefficient codes are below 16001.
        const uint64_t head = payload.size();
        payload.resize(head + PackBound(packs));
        size = head + kn.pack(best_codes.data(), packs, payload.data() + head);
      } else {
        std::vector<uint16_t>& zz = a->zz;  // Row-major zigzag codes, coefficients then residual.
        zz.resize(uint64_t{T} * R);
        for (uint64_t i = 0; i < zz.size(); ++i) zz[i] = uint16_t(ZigZag(a->coef_codes[i]));
        AppendStream(zz.data(), T, R, &payload);
        zz.resize(uint64_t{T} * HD);
        for (uint32_t g = 0; g < G; ++g)
          for (uint64_t c = 0; c < HD; ++c)
            for (uint32_t i = 0; i < kPack && g * kPack + i < T; ++i)
              zz[uint64_t{g * kPack + i} * HD + c] = best_codes[(g * HD + c) * kPack + i];
        AppendStream(zz.data(), T, uint32_t(HD), &payload);
        size = payload.size();
      }
      if (size >= raw_bytes) size = 0;
    }
  }
  if (size == 0) return WriteRawPayload(shape, in, out, capacity);  // Raw: exact.
  if (capacity < size) return absl::InvalidArgumentError("kvpool: output too small");
  std::memcpy(out, payload.data(), size);
  return size;
}

}  // namespace internal

uint64_t MaxPayloadBytes(const SegmentShape& shape, const CodecParams& params) {
  // The default profile's encoder writes in place into a buffer of its worst case (about 1.26x
  // raw for 128-channel heads) instead of a scratch it then copies; its payloads stay below raw.
  const uint64_t raw = internal::RawPayloadBytes(shape);
  return IsKvpoolRowsMode(params) ? std::max(raw, internal::RowsBufferBytes(shape)) : raw;
}

absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  return EncodeRef(shape, params, in, LayerKeys{}, out, capacity);
}

absl::StatusOr<uint64_t> EncodeRef(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, const LayerKeys& keys, uint8_t* out,
                                   uint64_t capacity) {
  if (!(params.budget > 0 && params.budget < 1)) {
    return absl::InvalidArgumentError("kvpool: budget must be in (0, 1)");
  }
  if (params.flags & internal::kFlagFast) {
    return internal::FastEncode(shape, params, in, keys, internal::FastRefKernels(), out, capacity);
  }
  if (IsKvpoolRowsMode(params)) {
    return internal::EncodeRows(shape, params, in, keys, internal::FastRefKernels(),
                                internal::RowKernelsRef(), out, capacity);
  }
  internal::Analysis a;
  internal::Analyze(shape, params, in, keys, internal::RefKernels(), &a);
  return internal::FinishEncode(shape, params, in, internal::RefKernels(), &a, out, capacity);
}

absl::Status DecodeRef(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* payload, uint64_t size, uint16_t* out) {
  using namespace internal;  // NOLINT: the format's own helpers.
  if (size > 0 && payload[0] == kModeRows) return DecodeRows(shape, payload, size, /*fast=*/false, out);
  Parsed parsed;
  absl::Status s = ParsePayload(shape, payload, size, &parsed);
  if (!s.ok()) return s;
  const uint64_t N = shape.Elements();
  if (parsed.mode == kModeRaw) {
    for (uint64_t i = 0; i < N; ++i) out[i] = Load16(parsed.raw + 2 * i);
    return absl::OkStatus();
  }
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint64_t HD = uint64_t{H} * D;
  LowRank lr;
  s = DecodeLowRank(shape, parsed, &lr);
  std::vector<int32_t> codes;
  if (s.ok()) s = DecodeResidualCodes(shape, parsed, &codes);
  if (!s.ok()) return s;
  const uint32_t R = parsed.coef_cols;
  std::vector<float> steps;
  TokenSteps(shape, parsed, &steps);
  for (uint32_t t = 0; t < T; ++t) {
    for (uint32_t h = 0; h < H; ++h) {
      const float step = steps[uint64_t{t} * H + h];
      for (uint32_t d = 0; d < D; ++d) {
        const uint64_t c = uint64_t{h} * D + d;
        float p = lr.means[c];
        for (uint32_t j = 0; j < parsed.ranks[h]; ++j) {
          p = p + lr.coefficients[uint64_t{t} * R + lr.first_col[h] + j] *
                      lr.basis[(uint64_t{h} * kMaxRank + j) * D + d];
        }
        out[t * HD + c] = FromFloat(shape.dtype, p + float(codes[t * HD + c]) * step);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kvpool
