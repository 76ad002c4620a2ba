// The kvpool codec's payload mode 4 ("rows"), the default mode: plain loops, the definition of
// the format (parser, decoder, the encoder's row kernels; the encoder is in
// kvpool_rows_encoder.cc).
//
// Idea. As in modes 1 and 3, each head is centred (a mean per channel) and its dominant
// low-rank structure across head_dim taken out; the residual is then coded with a fixed number
// of bits per row (one token of one head) instead of entropy coding, so that a decoder does a
// handful of vector operations per element:
//   - the prediction is integer: coefficient codes (at most 15 bits) times int8 basis codes,
//     summed exactly in 32 bits, times one scale per head;
//   - each row has b residual planes (0-15) and a step of its own (a 4-bit index of quarter
//     octaves around the head's unit): a midrise quantiser with 2^b levels, i.e. a code n =
//     sum over planes p of +-2^p (bit set: +), value n times the half step. The encoder picks b
//     per row by rate and distortion, finer for the tokens attention looks at (token classes,
//     as in mode 3), and the step from the row's own spread;
//   - up to 32 outlier channels per head (keys' large channels) take E more planes than the
//     row's b, in a small section of their own per row, instead of widening every channel;
//   - the encoder measures the decoded error and meets the relative L2 budget per segment, or
//     stores the segment raw.
//
// Payload (little-endian; H = kv_heads, D = head_dim, T = tokens):
//   0  1  mode 4
//   1  1  flags: bit 0 a token class map follows the outlier channels; other bits 0
//   2  6  0
//   per head h (16 bytes): u8 rank r (<= 8), u8 outlier channels n (<= min(D, 32)), u8 extra
//         planes E (<= 15; 0 when n = 0), u8 0, f32 unit u (finite, 0 < u <= 2^64), f32
//         low-rank scale p (finite, |p| <= 2^64), 4 bytes of nibbles: width w_j of direction
//         j's coefficient codes (0-15; 0 for j >= r), low nibble first
//   H*D*2     mean m[h][d], one finite element of the segment's dtype
//   per head  r*D int8 basis codes B[j][d] (-127..127)
//   per head  n u16 outlier channels, strictly increasing, < D
//   with flags bit 0: ceil(T*H/2) bytes, the class of token t, head h in nibble t*H + h (low
//         nibble first; padding 0): the encoder's token weights, which a value segment's
//         encoder takes from its keys' segment (decoders ignore them)
//   H*T       row metas, row (h, t) at h*T + t: low nibble b, high nibble the scale index j;
//             b + E_h <= 15
//   rows      row after row in that order (head after head, token after token): b planes of
//             ceil(D/8) bytes (bit d of plane p,
//             byte d/8 bit d%8: bit p of channel d's code), then, when n > 0, E planes of
//             ceil(n/8) bytes (bit k of plane q: bit b + q of outlier channel k's code);
//             padding bits 0
//   coefficients  per head, per direction j < r: w_j planes of ceil(T/8) bytes (bit t of plane
//             p: bit p of c + 2^(w_j - 1), c the coefficient of token t; padding bits 0)
// The payload ends exactly there.
//
// Decoding, row (h, t), channel d (float32, round to nearest even, fma = one rounding):
//   P  = sum_{j < r} c[t][j] * B[j][d]                 (integers: |P| < 2^24, exact)
//   n  = sum_{p < b} (bit p ? 2^p : -2^p), plus for outlier channel k (channel o_k = d):
//        sum_{q < E} (bit q ? 2^(b+q) : -2^(b+q))
//   hs = (u * RowScale(j)) * HalfStep(b)                  (kvpool_rows.h's literals)
//   x' = to_dtype(fma(hs, float(n), fma(p, float(P), float(m[h][d]))))
// With the bounds above no intermediate is NaN; every path gives the same bits.
#include "kernels/kvpool_rows.h"

#include <emmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

float LoadF32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

absl::Status Truncated(const char* what) {
  return absl::DataLossError(absl::StrCat("kvpool: ", what, " truncated"));
}

// The fixed-size sections up to the row metas.
absl::Status ParseHeads(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                        ParsedRows* parsed, uint64_t* pos) {
  const uint32_t H = shape.kv_heads, D = shape.head_dim;
  if (size < kHeaderBytes) return absl::DataLossError("kvpool: payload shorter than its header");
  if (payload[0] != kModeRows) return absl::DataLossError("kvpool: not a mode 4 payload");
  if ((payload[1] & ~kHeadClasses) != 0) {
    return absl::DataLossError("kvpool: reserved header bits are not zero");
  }
  for (int i = 2; i < 8; ++i) {
    if (payload[i] != 0) return absl::DataLossError("kvpool: reserved header bytes are not zero");
  }
  *pos = kHeaderBytes;
  if (size - *pos < uint64_t{H} * kRowHeadBytes) return Truncated("head entries");
  parsed->heads.assign(H, {});
  uint64_t basis = 0, outliers = 0;
  for (uint32_t h = 0; h < H; ++h) {
    const uint8_t* e = payload + *pos + uint64_t{h} * kRowHeadBytes;
    ParsedRows::Head& hd = parsed->heads[h];
    hd.rank = e[0];
    hd.outliers = e[1];
    hd.extra = e[2];
    hd.unit = LoadF32(e + 4);
    hd.lr_scale = LoadF32(e + 8);
    if (hd.rank > kMaxRank) return absl::DataLossError("kvpool: rank above 8");
    if (hd.outliers > std::min(D, kMaxOutliers) || hd.extra > kMaxPlanes ||
        (hd.outliers == 0 && hd.extra != 0) || e[3] != 0) {
      return absl::DataLossError("kvpool: bad outlier channel count or extra planes");
    }
    if (!(hd.unit > 0 && hd.unit <= kMaxHeadScale) || !(std::fabs(hd.lr_scale) <= kMaxHeadScale)) {
      return absl::DataLossError("kvpool: head unit or low-rank scale out of range");
    }
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      hd.widths[j] = (e[12 + j / 2] >> (4 * (j & 1))) & 15;
      if (j >= hd.rank && hd.widths[j] != 0) {
        return absl::DataLossError("kvpool: coefficient width of a missing direction");
      }
    }
    hd.basis = basis;
    hd.outlier = outliers;
    basis += uint64_t{hd.rank} * D;
    outliers += hd.outliers;
  }
  *pos += uint64_t{H} * kRowHeadBytes;
  const uint64_t HD = uint64_t{H} * D;
  if (size - *pos < 2 * HD) return Truncated("means");
  parsed->means = payload + *pos;
  const uint16_t exp = shape.dtype == DType::kBf16 ? 0x7f80 : 0x7c00;
  uint32_t infinite = 0;  // No early exit: the loop vectorises.
  for (uint64_t c = 0; c < HD; ++c) infinite |= (Load16(parsed->means + 2 * c) & exp) == exp;
  if (infinite) return absl::DataLossError("kvpool: a mean is not finite");
  *pos += 2 * HD;
  if (size - *pos < basis) return Truncated("basis");
  parsed->basis = payload + *pos;
  uint32_t low = 0;
  for (uint64_t i = 0; i < basis; ++i) low |= parsed->basis[i] == 0x80;
  if (low) return absl::DataLossError("kvpool: basis code -128");
  *pos += basis;
  if (size - *pos < 2 * outliers) return Truncated("outlier channels");
  parsed->outliers = payload + *pos;
  for (const ParsedRows::Head& hd : parsed->heads) {
    for (uint32_t k = 0; k < hd.outliers; ++k) {
      const uint32_t c = Load16(parsed->outliers + 2 * (hd.outlier + k));
      const uint32_t prev = k ? Load16(parsed->outliers + 2 * (hd.outlier + k - 1)) : 0;
      if (c >= D || (k > 0 && c <= prev)) {
        return absl::DataLossError("kvpool: outlier channels not increasing within head_dim");
      }
    }
  }
  *pos += 2 * outliers;
  parsed->classes = nullptr;
  if (payload[1] & kHeadClasses) {
    const uint64_t n = uint64_t{shape.tokens} * H, bytes = (n + 1) / 2;
    if (size - *pos < bytes) return Truncated("token classes");
    parsed->classes = payload + *pos;
    if ((n & 1) && (parsed->classes[bytes - 1] >> 4) != 0) {
      return absl::DataLossError("kvpool: token class padding is not zero");
    }
    *pos += bytes;
  }
  return absl::OkStatus();
}

// Checks the padding bits of every row's planes (only shapes whose planes have any).
absl::Status CheckRowPadding(const SegmentShape& shape, const ParsedRows& parsed) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint8_t* row = parsed.rows;
  for (uint32_t h = 0; h < H; ++h) {
    const ParsedRows::Head& hd = parsed.heads[h];
    const uint32_t extra = hd.outliers ? hd.extra : 0;
    const bool outlier_padding = hd.outliers % 8 != 0;
    for (uint32_t t = 0; t < T; ++t) {
      const uint32_t b = parsed.metas[uint64_t{h} * T + t] & 15;
      if (D % 8 == 0) {  // Whole bytes: nothing to check.
        row += b * PlaneBytes(D);
      } else {
        for (uint32_t p = 0; p < b; ++p, row += PlaneBytes(D)) {
          if (!PaddingClear(row, D)) return absl::DataLossError("kvpool: row plane padding not 0");
        }
      }
      for (uint32_t q = 0; q < extra; ++q, row += PlaneBytes(hd.outliers)) {
        if (outlier_padding && !PaddingClear(row, hd.outliers)) {
          return absl::DataLossError("kvpool: outlier plane padding not 0");
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseRows(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                       ParsedRows* parsed) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  uint64_t pos = 0;
  absl::Status s = ParseHeads(shape, payload, size, parsed, &pos);
  if (!s.ok()) return s;
  const uint64_t rows = uint64_t{T} * H;
  if (size - pos < rows) return Truncated("row metas");
  parsed->metas = payload + pos;
  pos += rows;
  uint64_t bytes = 0;
  bool padded = D % 8 != 0;
  for (uint32_t h = 0; h < H; ++h) {  // Per head: its planes per row, b summed, largest b.
    ParsedRows::Head& hd = parsed->heads[h];
    const uint8_t* m = parsed->metas + uint64_t{h} * T;
    uint32_t planes = 0, top = 0;
    for (uint32_t t = 0; t < T; ++t) {
      planes += m[t] & 15;
      top = std::max<uint32_t>(top, m[t] & 15);
    }
    if (top + hd.extra > kMaxPlanes)
      return absl::DataLossError("kvpool: a row has more than 15 planes");
    hd.rows = bytes;
    bytes += planes * PlaneBytes(D) + uint64_t{T} * RowDataBytes(D, hd.outliers, hd.extra, 0);
    padded = padded || (hd.outliers % 8 != 0 && hd.extra > 0);
  }
  if (size - pos < bytes) return Truncated("row data");
  parsed->rows = payload + pos;
  parsed->rows_bytes = bytes;
  pos += bytes;
  uint64_t coefs = 0;
  for (ParsedRows::Head& hd : parsed->heads) {
    hd.coef = coefs;
    for (uint32_t j = 0; j < hd.rank; ++j) coefs += hd.widths[j] * PlaneBytes(T);
  }
  if (size - pos != coefs) {
    return size - pos < coefs ? Truncated("coefficients")
                              : absl::DataLossError("kvpool: bytes after the coefficients");
  }
  parsed->coefs = payload + pos;
  if (T % 8 != 0) {
    for (uint64_t p = 0; p < coefs / PlaneBytes(T); ++p) {
      if (!PaddingClear(parsed->coefs + p * PlaneBytes(T), T)) {
        return absl::DataLossError("kvpool: coefficient plane padding not 0");
      }
    }
  }
  return padded ? CheckRowPadding(shape, *parsed) : absl::OkStatus();
}

void FillPairs(const int8_t* codes, uint32_t rank, uint32_t D, int16_t* pairs) {
  const __m128i zero = _mm_setzero_si128();
  for (uint32_t k = 0; k < (rank + 1) / 2; ++k)
    for (uint32_t d = 0; d < D; d += 16) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 2 * k * D + d));
      const __m128i b =
          2 * k + 1 < rank
              ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (2 * k + 1) * D + d))
              : zero;
      // Sign-extended to 16 bits (the sign bytes from a compare), then interleaved a, b.
      const __m128i sa = _mm_cmpgt_epi8(zero, a), sb = _mm_cmpgt_epi8(zero, b);
      const __m128i a0 = _mm_unpacklo_epi8(a, sa), a1 = _mm_unpackhi_epi8(a, sa);
      const __m128i b0 = _mm_unpacklo_epi8(b, sb), b1 = _mm_unpackhi_epi8(b, sb);
      __m128i* out = reinterpret_cast<__m128i*>(pairs + PairSlot(d, 2 * k));
      _mm_storeu_si128(out, _mm_unpacklo_epi16(a0, b0));
      _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(a0, b0));
      _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(a1, b1));
      _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(a1, b1));
    }
}

void DecodeRowCoefficients(const SegmentShape& shape, const ParsedRows& parsed, int16_t* coefs) {
  const uint32_t T = shape.tokens, H = shape.kv_heads;
  std::fill(coefs, coefs + uint64_t{H} * kMaxRank * T, int16_t{0});
  for (uint32_t h = 0; h < H; ++h) {
    const ParsedRows::Head& hd = parsed.heads[h];
    const uint8_t* plane = parsed.coefs + hd.coef;
    for (uint32_t j = 0; j < hd.rank; ++j) {
      const uint32_t w = hd.widths[j];
      for (uint32_t t = 0; t < T; ++t) {
        int32_t c = 0;
        for (uint32_t p = 0; p < w; ++p) c |= int32_t(PlaneBit(plane + p * PlaneBytes(T), t)) << p;
        if (w > 0) c -= 1 << (w - 1);
        coefs[(uint64_t{h} * kMaxRank + j) * T + t] = int16_t(c);
      }
      plane += w * PlaneBytes(T);
    }
  }
}

void DecodeRowsRef(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint64_t HD = uint64_t{H} * D;
  std::vector<int16_t> coefs(uint64_t{H} * kMaxRank * T);
  DecodeRowCoefficients(shape, parsed, coefs.data());
  std::vector<int32_t> n(D);
  const uint8_t* row = parsed.rows;
  for (uint32_t h = 0; h < H; ++h) {
    const ParsedRows::Head& hd = parsed.heads[h];
    const int8_t* basis = reinterpret_cast<const int8_t*>(parsed.basis + hd.basis);
    for (uint32_t t = 0; t < T; ++t) {
      const uint8_t meta = parsed.metas[uint64_t{h} * T + t];
      const uint32_t b = meta & 15;
      for (uint32_t d = 0; d < D; ++d) {
        n[d] = 0;
        for (uint32_t p = 0; p < b; ++p) {
          n[d] += PlaneBit(row + p * PlaneBytes(D), d) ? (1 << p) : -(1 << p);
        }
      }
      const uint8_t* extra = row + b * PlaneBytes(D);
      for (uint32_t k = 0; k < hd.outliers; ++k) {
        const uint32_t d = Load16(parsed.outliers + 2 * (hd.outlier + k));
        for (uint32_t q = 0; q < hd.extra; ++q) {
          n[d] +=
              PlaneBit(extra + q * PlaneBytes(hd.outliers), k) ? (1 << (b + q)) : -(1 << (b + q));
        }
      }
      row += RowBytes(hd, D, meta);
      const float hs = RowHalfStep(hd.unit, meta);
      for (uint32_t d = 0; d < D; ++d) {
        int32_t P = 0;
        for (uint32_t j = 0; j < hd.rank; ++j) {
          P += int32_t(coefs[(uint64_t{h} * kMaxRank + j) * T + t]) * basis[uint64_t{j} * D + d];
        }
        const float m = ToFloat(shape.dtype, Load16(parsed.means + 2 * (uint64_t{h} * D + d)));
        const float z = std::fma(hd.lr_scale, float(P), m);
        out[t * HD + uint64_t{h} * D + d] = FromFloat(shape.dtype, std::fma(hs, float(n[d]), z));
      }
    }
  }
}

absl::Status DecodeRows(const SegmentShape& shape, const uint8_t* payload, uint64_t size, bool fast,
                        uint16_t* out) {
  thread_local ParsedRows parsed;
  absl::Status s = ParseRows(shape, payload, size, &parsed);
  if (!s.ok()) return s;
  if (!fast || !(DecodeRowsAvx512(shape, parsed, out) || DecodeRowsAvx2(shape, parsed, out))) {
    DecodeRowsRef(shape, parsed, out);
  }
  return absl::OkStatus();
}

bool DecodeRowsAvx512(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out) {
  if (!CpuHasAvx512() || shape.head_dim % 32 != 0 || shape.tokens == 0) return false;
  return CpuHasAvx512Vnni() ? DecodeRowsAvx512Vnni(shape, parsed, out)
                            : DecodeRowsAvx512Base(shape, parsed, out);
}

bool RowKeyClassMap(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                    const uint8_t** map) {
  SegmentShape key = shape;
  key.kind = SegmentKind::kKey;
  ParsedRows parsed;
  uint64_t pos = 0;
  if (!ParseHeads(key, payload, size, &parsed, &pos).ok()) return false;
  *map = parsed.classes;
  return true;
}

namespace {

// ---- The reference row kernels (RowKernels) ------------------------------------------------

bool ProjectRowRef(const RowHead& hd, DType dtype, const uint16_t* x, int16_t* coefs, float* z,
                   RowStats* st) {
  float dot[kMaxRank][16] = {}, dist[16] = {}, en[16] = {}, reg[16] = {}, out[16] = {};
  for (uint32_t d = 0; d < hd.D; ++d) {
    const float v = ToFloat(dtype, x[d]);
    const float xc = v - hd.means[d];
    for (uint32_t j = 0; j < hd.rank; ++j) {
      dot[j][d % 16] = std::fma(xc, hd.basis[uint64_t{j} * hd.D + d], dot[j][d % 16]);
    }
    dist[d % 16] = std::fma(xc, xc, dist[d % 16]);
    en[d % 16] = std::fma(v, v, en[d % 16]);
  }
  for (uint32_t j = 0; j < hd.rank; ++j) {
    const float q = std::nearbyint(Tree16(dot[j]) * hd.inv_step[j]);
    const float c = std::min(float(kMaxCoefCode), std::max(-float(kMaxCoefCode), q));
    coefs[j] = int16_t(c);
  }
  for (uint32_t d = 0; d < hd.D; ++d) {
    int32_t P = 0;
    for (uint32_t j = 0; j < hd.rank; ++j)
      P += int32_t(coefs[j]) * hd.codes[uint64_t{j} * hd.D + d];
    z[d] = std::fma(hd.lr_scale, float(P), hd.means[d]);
    const float r = ToFloat(dtype, x[d]) - z[d];
    float* acc = hd.is_outlier[d] ? out : reg;
    acc[d % 16] = std::fma(r, r, acc[d % 16]);
  }
  st->dist = Tree16(dist);
  st->energy = Tree16(en);
  st->regular = Tree16(reg);
  st->outlier = Tree16(out);
  return std::isfinite(st->energy);
}

float QuantizeRowRef(const RowHead& hd, DType dtype, const uint16_t* x, const float* z,
                     uint8_t meta, float hs, uint8_t* out) {
  const uint32_t D = hd.D, b = meta & 15;
  const float inv = 1.f / (2.f * hs);
  std::memset(out, 0, RowBytesOf(hd, meta));
  uint8_t* extra = out + b * PlaneBytes(D);
  float err[16] = {};
  for (uint32_t d = 0, k = 0; d < D; ++d) {
    const float v = ToFloat(dtype, x[d]);
    const bool outlier = hd.is_outlier[d] != 0;
    const uint32_t planes = outlier ? b + hd.extra : b;
    float n = 0, u = 0;
    if (planes > 0) {
      const float top = float((1u << planes) - 1);
      u = std::floor((v - z[d]) * inv) + float(1u << (planes - 1));
      u = std::min(top, std::max(0.f, u));
      n = 2.f * u - top;
    }
    const float y = ToFloat(dtype, FromFloat(dtype, std::fma(hs, n, z[d])));
    const float e = y - v;
    err[d % 16] = std::fma(e, e, err[d % 16]);
    const uint32_t code = uint32_t(u);
    for (uint32_t p = 0; p < b; ++p) {
      out[p * PlaneBytes(D) + d / 8] |= uint8_t(((code >> p) & 1) << (d % 8));
    }
    if (outlier) {
      for (uint32_t q = 0; q < hd.extra; ++q) {
        extra[q * PlaneBytes(hd.outliers) + k / 8] |= uint8_t(((code >> (b + q)) & 1) << (k % 8));
      }
      ++k;
    }
  }
  return Tree16(err);
}

bool EncodeRowRef(const RowHead& hd, DType dtype, const uint16_t* const* x, uint32_t rows,
                  int16_t* coefs, ChooseFn choose, void* ctx, uint8_t* out, RowStats* st,
                  uint8_t* meta, float* err) {
  thread_local std::vector<float> z;
  z.resize(kRowBlock * uint64_t{hd.D});
  for (uint32_t i = 0; i < rows; ++i) {
    if (!ProjectRowRef(hd, dtype, x[i], coefs + i * kMaxRank, &z[i * hd.D], &st[i])) return false;
  }
  for (uint32_t i = 0; i < rows; ++i) {
    float hs;
    meta[i] = choose(ctx, i, st[i], &hs);
    err[i] = QuantizeRowRef(hd, dtype, x[i], &z[i * hd.D], meta[i], hs, out);
    out += RowBytesOf(hd, meta[i]);
  }
  return true;
}

void AccumulateRef(const float* x, uint64_t ld, uint32_t count, const float* w, uint32_t k,
                   uint32_t D, float* out) {
  for (uint32_t j = 0; j < k; ++j)
    for (uint32_t d = 0; d < D; ++d) {
      float acc = out[j * D + d];
      for (uint32_t n = 0; n < count; ++n)
        acc = std::fma(w[uint64_t{n} * k + j], x[n * ld + d], acc);
      out[j * D + d] = acc;
    }
}

void DotRef(const float* x, uint64_t ld, uint32_t count, const float* s, uint32_t k, uint32_t D,
            float* y) {
  for (uint32_t n = 0; n < count; ++n)
    for (uint32_t j = 0; j < k; ++j) {
      float l[16] = {};
      for (uint32_t d = 0; d < D; ++d) l[d % 16] = std::fma(x[n * ld + d], s[j * D + d], l[d % 16]);
      y[uint64_t{n} * k + j] = Tree16(l);
    }
}

void PlanesRef(const int16_t* codes, uint32_t T, uint32_t width, uint8_t* out) {
  std::memset(out, 0, width * PlaneBytes(T));
  for (uint32_t t = 0; t < T; ++t) {
    const uint32_t u = uint32_t(codes[t] + (1 << (width - 1)));
    for (uint32_t p = 0; p < width; ++p)
      out[p * PlaneBytes(T) + t / 8] |= uint8_t(((u >> p) & 1) << (t % 8));
  }
}

float LoadRef(DType dtype, const uint16_t* x, uint64_t n, float* out, float* sums) {
  float en[16] = {};
  for (uint64_t c = 0; c < n; ++c) {
    out[c] = ToFloat(dtype, x[c]);
    sums[c] = sums[c] + out[c];
    en[c % 16] = std::fma(out[c], out[c], en[c % 16]);
  }
  return Tree16(en);
}

float CentreRef(const float* x, const float* m, uint32_t D, float* xc, float* var) {
  float l[16] = {};
  for (uint32_t d = 0; d < D; ++d) {
    xc[d] = x[d] - m[d];
    var[d] = var[d] + xc[d] * xc[d];
    l[d % 16] = std::fma(xc[d], xc[d], l[d % 16]);
  }
  return Tree16(l);
}

}  // namespace

const RowKernels& RowKernelsRef() {
  static const RowKernels k = {&EncodeRowRef, &AccumulateRef, &DotRef,
                               &PlanesRef,    &LoadRef,       &CentreRef};
  return k;
}

}  // namespace kvpool::kernels::kvpool::internal
