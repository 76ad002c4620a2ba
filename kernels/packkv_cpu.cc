// packkv fast CPU path: AVX2 + F16C, chosen at run time (the reference otherwise). It reads and
// writes the payload format of packkv_ref.cc with the same float operations in the same order,
// so that encoding gives the reference's payload byte for byte and decoding gives the
// reference's values bit for bit. It shares the reference's per-row and per-segment scalar
// steps (scale, row quantisers, token order, validation) and replaces the per-element loops:
//   encode: row statistics and codes 8 elements at a time; packs of 16 tokens (the default G)
//           get their column minimums and maxima 16 columns at a time and their columns packed
//           through 64-bit words;
//   decode: packs of 16 tokens are decoded 8 columns x 8 tokens at a time: each column's 8
//           codes unpacked with one byte shuffle and one variable shift, an 8x8 transpose, then
//           8 tokens' 8 channels converted and stored.
// Other packs (G != 16, the last pack of a head, columns past the last multiple of 8, the few
// bytes at the very end of the payload) take the reference's loops.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "kernels/packkv.h"
#include "kernels/packkv_kernels.cuh"
#include "kernels/simd_avx2.h"


namespace kvpool::kernels::packkv {
namespace {

using internal::Layout;

constexpr uint32_t kFastPack = 16;

// ---- Lane tables for unpacking 8 values of width w from 16 bytes: lane j holds bits
// [j*w, j*w + w): bytes (j*w)/8 .. +2 moved into the lane, shifted right by (j*w) % 8.
struct UnpackTables {
  alignas(32) uint8_t shuffle[17][32];
  alignas(32) int32_t shift[17][8];
};

constexpr UnpackTables MakeUnpackTables() {
  UnpackTables t{};
  for (int w = 0; w <= 16; ++w) {
    for (int j = 0; j < 8; ++j) {
      const int bit = j * w, byte = bit / 8;
      t.shift[w][j] = bit % 8;
      for (int k = 0; k < 4; ++k) {
        const int src = byte + k;
        // Each 128-bit half of the register indexes its own copy of the 16 bytes.
        t.shuffle[w][4 * j + k] = (k < 3 && src < 16) ? static_cast<uint8_t>(src) : 0x80;
      }
    }
  }
  return t;
}

constexpr UnpackTables kUnpack = MakeUnpackTables();

// ---- Conversions, as in the reference (no NaN reaches the stores).

using simd::Load8;
using simd::Store8;
using simd::HMax;
using simd::HMin;

template <bool kBf16>
float ToFloat(uint16_t h) {
  return kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}

// Converters for internal::QuantizeRowWith (the same roundings as common/half.h's).
struct F16cConv {
  KVPOOL_AVX2 static float ToFloat(uint16_t h) { return _cvtsh_ss(h); }
  KVPOOL_AVX2 static uint16_t FromFloat(float f) {
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
  }
  static constexpr uint16_t kExponent = 0x7c00;
  static constexpr uint16_t kMinStep = 0x0001;
};
struct Bf16Conv {
  static float ToFloat(uint16_t h) { return Bf16ToFloat(h); }
  static uint16_t FromFloat(float f) { return FloatToBf16(f); }
  static constexpr uint16_t kExponent = 0x7f80;
  static constexpr uint16_t kMinStep = 0x0080;
};

KVPOOL_AVX2 inline uint32_t HSum(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(x));
}

// In: r[j] = column j's 8 tokens. Out: r[i] = token i's 8 columns.
KVPOOL_AVX2 inline void Transpose8x8(__m256i* r) {
  __m256i t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_epi32(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_epi32(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_unpacklo_epi64(t[k], t[k + 2]);
    u[k + 1] = _mm256_unpackhi_epi64(t[k], t[k + 2]);
    u[k + 2] = _mm256_unpacklo_epi64(t[k + 1], t[k + 3]);
    u[k + 3] = _mm256_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
  }
}

// ---- Encoding.

// internal::StatRow: lanes d % 8 of the sum of squares are the two double vectors' lanes.
template <bool kBf16>
KVPOOL_AVX2 bool StatRowAvx2(const uint16_t* x, uint32_t dim, internal::RowStat* stat) {
  const float inf = std::numeric_limits<float>::infinity();
  __m256 vmin = _mm256_set1_ps(inf), vmax = _mm256_set1_ps(-inf), bad = _mm256_setzero_ps();
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  uint32_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m256 v = Load8<kBf16>(x + d);
    vmin = _mm256_min_ps(vmin, v);
    vmax = _mm256_max_ps(vmax, v);
    bad = _mm256_or_ps(bad,
                       _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), _mm256_set1_ps(inf), _CMP_NLT_UQ));
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
    hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
  }
  if (_mm256_movemask_ps(bad) != 0) return false;
  double lanes[internal::kRowLanes];
  _mm256_storeu_pd(lanes, lo);
  _mm256_storeu_pd(lanes + 4, hi);
  float mn = HMin(vmin), mx = HMax(vmax);
  for (; d < dim; ++d) {
    const float v = ToFloat<kBf16>(x[d]);
    if (!(std::abs(v) < inf)) return false;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    lanes[d % internal::kRowLanes] += static_cast<double>(v) * static_cast<double>(v);
  }
  stat->mn = mn + 0.0f;
  stat->mx = mx + 0.0f;
  stat->sum_sq = internal::CombineRowLanes(lanes);
  return true;
}

// The codes of one row (internal::QuantizeRows' inner loop); returns their sum.
template <bool kBf16>
KVPOOL_AVX2 uint32_t QuantizeRowAvx2(const uint16_t* x, uint32_t dim, const internal::RowQuant& q,
                                     uint16_t* codes) {
  const __m256 mn = _mm256_set1_ps(q.mn), inv = _mm256_set1_ps(q.inv);
  const __m256 top = _mm256_set1_ps(static_cast<float>(q.top));
  __m256i sum = _mm256_setzero_si256();
  uint32_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(Load8<kBf16>(x + d), mn), inv);
    v = _mm256_round_ps(_mm256_min_ps(v, top), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i c = _mm256_cvttps_epi32(v);
    sum = _mm256_add_epi32(sum, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + d),
                     _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
  }
  uint32_t key = HSum(sum);
  for (; d < dim; ++d) {
    const float v = (ToFloat<kBf16>(x[d]) - q.mn) * q.inv;
    const uint32_t c = static_cast<uint32_t>(std::nearbyint(std::min(v, float(q.top))));
    codes[d] = static_cast<uint16_t>(c);
    key += c;
  }
  return key;
}

// Column minimums and ranges (max - min) of 16 rows, 16 columns at a time.
KVPOOL_AVX2 void ColumnRanges(const uint16_t* const* rows, uint32_t dim, uint32_t* cmin,
                              uint32_t* range) {
  uint32_t d = 0;
  alignas(32) uint16_t lo16[16], span16[16];
  for (; d + 16 <= dim; d += 16) {
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[0] + d)), hi = lo;
    for (uint32_t i = 1; i < kFastPack; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + d));
      lo = _mm256_min_epu16(lo, v);
      hi = _mm256_max_epu16(hi, v);
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo16), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(span16), _mm256_sub_epi16(hi, lo));
    for (int k = 0; k < 16; ++k) {
      cmin[d + k] = lo16[k];
      range[d + k] = span16[k];
    }
  }
  for (; d < dim; ++d) {
    uint32_t lo = rows[0][d], hi = lo;
    for (uint32_t i = 1; i < kFastPack; ++i) {
      lo = std::min<uint32_t>(lo, rows[i][d]);
      hi = std::max<uint32_t>(hi, rows[i][d]);
    }
    cmin[d] = lo;
    range[d] = hi - lo;
  }
}

// Appends `count` values of `width` bits, LSB first, at *bit of zeroed-then-written memory.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  void Put(uint32_t v, int width) {
    acc_ |= uint64_t{v} << fill_;
    fill_ += width;
    while (fill_ >= 8) {
      *out_++ = static_cast<uint8_t>(acc_);
      acc_ >>= 8;
      fill_ -= 8;
    }
  }
  void Flush() {
    if (fill_ > 0) *out_++ = static_cast<uint8_t>(acc_);
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;
  int fill_ = 0;
};

// Writes 16 values of width w (2w bytes) of column d; `slack`: whether 16 bytes may be written.
inline void PackColumn16(const uint16_t* const* rows, uint32_t d, uint32_t cmin, int w, bool slack,
                         uint8_t* out) {
  for (int half = 0; half < 2; ++half) {
    unsigned __int128 acc = 0;
    for (int i = 0; i < 8; ++i) {
      acc |= static_cast<unsigned __int128>(rows[8 * half + i][d] - cmin) << (i * w);
    }
    std::memcpy(out, &acc, slack ? 16 : w);  // the bytes past w are zero, overwritten later
    out += w;
  }
}

// Packs lanes of v (each < 2^w, 1 <= w <= 16) into w bytes at out, LSB first; writes 16 bytes,
// zero past the w.
KVPOOL_AVX2 inline void Pack8(__m256i v, int w, uint8_t* out) {
  // Pairs of lanes into 64-bit lanes of 2w bits, pairs of those into 4w bits, then the halves.
  const __m256i x =
      _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi64x(0xffffffff)),
                      _mm256_sll_epi64(_mm256_srli_epi64(v, 32), _mm_cvtsi32_si128(w)));
  const __m256i y =
      _mm256_or_si256(x, _mm256_sll_epi64(_mm256_srli_si256(x, 8), _mm_cvtsi32_si128(2 * w)));
  const uint64_t a = static_cast<uint64_t>(_mm256_extract_epi64(y, 0));
  const uint64_t b = static_cast<uint64_t>(_mm256_extract_epi64(y, 2));
  const int s = 4 * w;
  const uint64_t words[2] = {s < 64 ? a | (b << s) : a, s < 64 ? b >> (64 - s) : b};
  std::memcpy(out, words, 16);
}

KVPOOL_AVX2 inline __m256i Load8Codes(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Columns [d0, d0 + 8) of a 16-token pack, both halves, at their offsets; writes up to 16 bytes
// past each column's end (in increasing order, so that later columns overwrite them).
KVPOOL_AVX2 void PackBlock8(const uint16_t* const* rows, uint32_t d0, const uint32_t* cmin,
                            const uint32_t* width, const uint64_t* col_offset, uint8_t* out) {
  const __m256i mins = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cmin + d0));
  __m256i lo[8], hi[8];
  for (int i = 0; i < 8; ++i) {
    lo[i] = _mm256_sub_epi32(Load8Codes(rows[i] + d0), mins);
    hi[i] = _mm256_sub_epi32(Load8Codes(rows[8 + i] + d0), mins);
  }
  Transpose8x8(lo);
  Transpose8x8(hi);
  for (int j = 0; j < 8; ++j) {
    const int w = static_cast<int>(width[d0 + j]);
    if (w == 0) continue;
    Pack8(lo[j], w, out + col_offset[d0 + j]);
    Pack8(hi[j], w, out + col_offset[d0 + j] + w);
  }
}

// internal::WritePack for a whole pack of 16 tokens; `scratch` holds the column minimums,
// widths and offsets.
struct Pack16Scratch {
  std::vector<uint32_t> cmin, width;
  std::vector<uint64_t> col_offset;
};

uint64_t WritePack16(const Layout& l, const std::vector<uint16_t>& perm,
                     const std::vector<uint16_t>& codes, uint32_t h, uint32_t p, uint8_t* out,
                     uint64_t off, uint64_t capacity, Pack16Scratch* scratch) {
  const uint16_t* rows[kFastPack];
  const uint16_t* pos_token = perm.data() + uint64_t{h} * l.tokens + uint64_t{p} * kFastPack;
  for (uint32_t i = 0; i < kFastPack; ++i) {
    rows[i] = codes.data() + (uint64_t{pos_token[i]} * l.heads + h) * l.dim;
  }
  scratch->cmin.resize(l.dim);
  scratch->width.resize(l.dim);
  scratch->col_offset.resize(l.dim);
  uint32_t* cmin = scratch->cmin.data();
  uint32_t* width = scratch->width.data();
  ColumnRanges(rows, l.dim, cmin, width);
  uint8_t* header = out + l.headers_offset + (uint64_t{h} * l.packs_per_head + p) * l.header_bytes;
  std::memset(header, 0, l.header_bytes);
  uint32_t largest_min = 0;
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int code = internal::CodeForWidth(internal::BitLength(width[d]));
    width[d] = internal::WidthFromCode(code, l.bits);
    header[1 + d / 2] |= static_cast<uint8_t>(code << (4 * (d % 2)));
    largest_min = std::max(largest_min, cmin[d]);
  }
  const int mw = internal::BitLength(largest_min);
  header[0] = static_cast<uint8_t>(mw);
  BitWriter mins(out + off);
  for (uint32_t d = 0; d < l.dim; ++d) mins.Put(cmin[d], mw);
  mins.Flush();
  off += internal::BitBytes(l.dim, mw);
  for (uint32_t d = 0; d < l.dim; ++d) {
    scratch->col_offset[d] = off;
    off += 2 * uint64_t{width[d]};
  }
  const bool slack = off + 16 <= capacity;
  uint32_t d = 0;
  for (; slack && d + 8 <= l.dim; d += 8) {
    PackBlock8(rows, d, cmin, width, scratch->col_offset.data(), out);
  }
  for (; d < l.dim; ++d) {
    const uint64_t at = scratch->col_offset[d];
    if (width[d] != 0)
      PackColumn16(rows, d, cmin[d], width[d], at + 16 + width[d] <= capacity, out + at);
  }
  return off;
}

template <bool kBf16>
KVPOOL_AVX2 absl::StatusOr<uint64_t> EncodeAvx2(const SegmentShape& shape,
                                                const CodecParams& params, const uint16_t* in,
                                                uint8_t* out, uint64_t capacity) {
  const Layout l = internal::LayoutFor(shape, params);
  const uint64_t rows = uint64_t{l.tokens} * l.heads;
  std::vector<internal::RowStat> stats(rows);
  for (uint64_t r = 0; r < rows; ++r) {
    if (!StatRowAvx2<kBf16>(in + r * l.dim, l.dim, &stats[r])) {
      return absl::InvalidArgumentError(absl::StrCat("packkv: non-finite element in row ", r));
    }
  }
  const float e =
      internal::SegmentScale(stats, l, internal::QuantBudget(params.budget, shape.dtype));
  std::vector<internal::RowQuant> quant(rows);
  std::vector<uint16_t> codes(shape.Elements());
  std::vector<uint32_t> keys(rows);
  for (uint64_t r = 0; r < rows; ++r) {
    quant[r] = kBf16 ? internal::QuantizeRowWith<Bf16Conv>(stats[r].mn, stats[r].mx, e, l.qmax)
                     : internal::QuantizeRowWith<F16cConv>(stats[r].mn, stats[r].mx, e, l.qmax);
    keys[r] = QuantizeRowAvx2<kBf16>(in + r * l.dim, l.dim, quant[r], codes.data() + r * l.dim);
  }
  std::vector<uint16_t> perm;
  internal::OrderTokens(l, keys, &perm);
  internal::WriteRows(l, quant, perm, out);
  internal::PackScratch ref_scratch;
  Pack16Scratch scratch;
  uint64_t off = l.data_offset;
  for (uint32_t h = 0; h < l.heads; ++h) {
    for (uint32_t p = 0; p < l.packs_per_head; ++p) {
      off = l.group == kFastPack && internal::PackTokens(l, p) == kFastPack
                ? WritePack16(l, perm, codes, h, p, out, off, capacity, &scratch)
                : internal::WritePack(l, perm, codes, h, p, out, off, &ref_scratch);
    }
  }
  return off;
}

// ---- Decoding.

// 8 values of width w (w <= 16) starting at bit 0 of p; reads 16 bytes.
KVPOOL_AVX2 inline __m256i Unpack8(const uint8_t* p, int w) {
  const __m256i bytes =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i moved = _mm256_shuffle_epi8(
      bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shuffle[w])));
  const __m256i shifted = _mm256_srlv_epi32(
      moved, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shift[w])));
  return _mm256_and_si256(shifted, _mm256_set1_epi32((1 << w) - 1));
}

// Bits [bit, bit + w) of base (w <= 16), reading only the bytes that hold them.
inline uint32_t GetBits(const uint8_t* base, uint64_t bit, int w) {
  if (w == 0) return 0;
  const uint64_t first = bit / 8, last = (bit + w - 1) / 8;
  uint32_t word = 0;
  for (uint64_t b = first; b <= last; ++b) word |= uint32_t{base[b]} << (8 * (b - first));
  return (word >> (bit % 8)) & ((1u << w) - 1);
}

// internal::ReadPack for a pack of 16 tokens (the same checks, DataLoss likewise).
absl::Status ReadPack16(const Layout& l, const uint8_t* payload, uint64_t size, uint64_t pack,
                        uint64_t offset, internal::PackInfo* info) {
  const uint8_t* header = payload + l.headers_offset + pack * l.header_bytes;
  const int mw = header[0];
  if (mw > l.bits) return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " mw ", mw));
  info->width.resize(l.dim);
  info->col_min.resize(l.dim);
  info->col_offset.resize(l.dim);
  const uint64_t min_bytes = internal::BitBytes(l.dim, mw);
  uint64_t off = offset + min_bytes;
  int widest = 0;
  for (uint32_t d = 0; d < l.dim; ++d) {
    const int code = (header[1 + d / 2] >> (4 * (d % 2))) & 15;
    const int w = code == internal::kFullWidthCode ? l.bits : code;
    widest = std::max(widest, w);
    info->width[d] = static_cast<uint8_t>(w);
    info->col_offset[d] = off;
    off += 2 * w;
  }
  if (widest > l.bits) {
    return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " width ", widest));
  }
  if (off > size) {
    return absl::DataLossError(
        absl::StrCat("packkv: pack ", pack, " ends at ", off, ", past the payload (", size, ")"));
  }
  const uint8_t* mins = payload + offset;
  const bool fast = offset + min_bytes + 4 <= size;
  const uint32_t mask = (1u << mw) - 1;
  uint32_t largest = 0;
  for (uint32_t d = 0; d < l.dim; ++d) {
    const uint64_t bit = uint64_t{d} * mw;
    uint32_t word = 0;
    if (fast) {
      std::memcpy(&word, mins + bit / 8, 4);
      info->col_min[d] = (word >> (bit % 8)) & mask;
    } else {
      info->col_min[d] = GetBits(mins, bit, mw);
    }
    largest = std::max(largest, info->col_min[d]);
  }
  if (largest > l.qmax) {
    return absl::DataLossError(absl::StrCat("packkv: pack ", pack, " minimum above max"));
  }
  info->end = off;
  return absl::OkStatus();
}

// Decodes columns [d0, d0 + 8) of 8 tokens (pack positions 8*half ..); returns the codes' max.
template <bool kBf16>
KVPOOL_AVX2 inline __m256i DecodeBlock8(const uint8_t* payload, const internal::PackInfo& info,
                                        uint32_t d0, int half, const float* s, const float* mn,
                                        uint16_t* const* out_rows) {
  __m256i r[8];
  for (int j = 0; j < 8; ++j) {
    const int w = info.width[d0 + j];
    r[j] = Unpack8(payload + info.col_offset[d0 + j] + half * w, w);
  }
  Transpose8x8(r);
  const __m256i mins =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(info.col_min.data() + d0));
  __m256i top = _mm256_setzero_si256();
  for (int i = 0; i < 8; ++i) {
    const __m256i code = _mm256_add_epi32(r[i], mins);
    top = _mm256_max_epu32(top, code);
    const int k = 8 * half + i;
    const __m256 x = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(code), _mm256_set1_ps(s[k])),
                                   _mm256_set1_ps(mn[k]));
    Store8<kBf16>(out_rows[k] + d0, x);
  }
  return top;
}

// internal::DecodePackRef for a whole pack of 16 tokens whose data ends 16 bytes or more before
// the end of the payload.
template <bool kBf16>
KVPOOL_AVX2 absl::Status DecodePack16(const Layout& l, const internal::RowTable& rows,
                                      const uint8_t* payload, const internal::PackInfo& info,
                                      uint32_t h, uint32_t p, uint16_t* out) {
  const uint64_t first = uint64_t{h} * l.tokens + uint64_t{p} * kFastPack;
  uint16_t* out_rows[kFastPack];
  for (uint32_t i = 0; i < kFastPack; ++i) {
    out_rows[i] = out + (uint64_t{rows.token[first + i]} * l.heads + h) * l.dim;
  }
  const float* s = rows.s.data() + first;
  const float* mn = rows.mn.data() + first;
  __m256i top = _mm256_setzero_si256();
  uint32_t d0 = 0;
  for (; d0 + 8 <= l.dim; d0 += 8) {
    top = _mm256_max_epu32(top, DecodeBlock8<kBf16>(payload, info, d0, 0, s, mn, out_rows));
    top = _mm256_max_epu32(top, DecodeBlock8<kBf16>(payload, info, d0, 1, s, mn, out_rows));
  }
  const __m256i over = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(static_cast<int>(l.qmax)));
  if (_mm256_movemask_epi8(over) != 0) return absl::DataLossError("packkv: code above max");
  for (uint32_t d = d0; d < l.dim; ++d) {
    const int w = info.width[d];
    const uint8_t* col = payload + info.col_offset[d];
    for (uint32_t i = 0; i < kFastPack; ++i) {
      const uint32_t code = info.col_min[d] + GetBits(col, uint64_t{i} * w, w);
      if (code > l.qmax) return absl::DataLossError("packkv: code above max");
      const float x = static_cast<float>(code) * s[i] + mn[i];
      out_rows[i][d] = kBf16 ? FloatToBf16(x) : FloatToFp16(x);
    }
  }
  return absl::OkStatus();
}

template <bool kBf16>
KVPOOL_AVX2 absl::Status DecodeAvx2(const SegmentShape& shape, const CodecParams& params,
                                    const uint8_t* payload, uint64_t size, uint16_t* out) {
  const Layout l = internal::LayoutFor(shape, params);
  internal::RowTable rows;
  KVPOOL_RETURN_IF_ERROR(internal::ReadRows(l, shape.dtype, payload, size, &rows));
  internal::PackInfo info;
  uint64_t off = l.data_offset;
  for (uint64_t pack = 0; pack < l.num_packs; ++pack) {
    const uint32_t h = static_cast<uint32_t>(pack / l.packs_per_head);
    const uint32_t p = static_cast<uint32_t>(pack % l.packs_per_head);
    const bool full = l.group == kFastPack && internal::PackTokens(l, p) == kFastPack;
    KVPOOL_RETURN_IF_ERROR(full ? ReadPack16(l, payload, size, pack, off, &info)
                                : internal::ReadPack(l, payload, size, pack, off, &info));
    if (full && info.end + 16 <= size) {
      KVPOOL_RETURN_IF_ERROR(DecodePack16<kBf16>(l, rows, payload, info, h, p, out));
    } else {
      KVPOOL_RETURN_IF_ERROR(
          internal::DecodePackRef(l, shape.dtype, rows, payload, info, h, p, out));
    }
    off = info.end;
  }
  if (off != size) {
    return absl::DataLossError(
        absl::StrCat("packkv: payload is ", size, " bytes, its packs end at ", off));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> EncodeCpu(const SegmentShape& shape, const CodecParams& params,
                                   const uint16_t* in, uint8_t* out, uint64_t capacity) {
  if (!CpuHasAvx2()) return EncodeRef(shape, params, in, out, capacity);
  KVPOOL_RETURN_IF_ERROR(internal::CheckEncodeArgs(shape, params, capacity));
  if (shape.Elements() == 0) return uint64_t{0};
  return shape.dtype == DType::kBf16 ? EncodeAvx2<true>(shape, params, in, out, capacity)
                                     : EncodeAvx2<false>(shape, params, in, out, capacity);
}

absl::Status DecodeCpu(const SegmentShape& shape, const CodecParams& params, const uint8_t* payload,
                       uint64_t size, uint16_t* out) {
  if (!CpuHasAvx2() || shape.Elements() == 0) {
    return DecodeRef(shape, params, payload, size, out);
  }
  KVPOOL_RETURN_IF_ERROR(internal::CheckParams(shape, params));
  return shape.dtype == DType::kBf16 ? DecodeAvx2<true>(shape, params, payload, size, out)
                                     : DecodeAvx2<false>(shape, params, payload, size, out);
}

}  // namespace kvpool::kernels::packkv
