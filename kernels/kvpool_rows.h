// Internal to the kvpool codec: payload mode 4 ("rows"), the default mode's format. The format
// is documented at the top of kvpool_rows.cc (which defines it: parser, reference decoder and
// the reference encoder kernels); kvpool_rows_encoder.cc holds the encoder both host paths
// share, kvpool_rows_avx512.cc the fast CPU kernels and decoder. Not a public API.
// Thread-safe (stateless, or thread-local scratch).
#ifndef KVPOOL_KERNELS_KVPOOL_ROWS_H_
#define KVPOOL_KERNELS_KVPOOL_ROWS_H_

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/codec.h"
#include "kernels/host_device.h"
#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint8_t kModeRows = 4;
inline constexpr uint32_t kRowHeadBytes = 16;    // Per head: r, n_o, E, 0, f32 u, f32 p, widths.
inline constexpr uint32_t kMaxOutliers = 32;     // Outlier channels per head, at most.
inline constexpr uint32_t kMaxPlanes = 15;       // b + E of any row.
inline constexpr uint32_t kMaxCoefWidth = 15;    // Bits per coefficient code.
inline constexpr float kMaxHeadScale = 0x1p64f;  // |u| and |p| bound: decoding never overflows
                                                 // into NaN (README of the format).
inline constexpr int32_t kMaxCoefCode = (1 << (kMaxCoefWidth - 1)) - 1;
// The widest head the AVX2 kernels and decoder take (their stack buffers); a head's groups of 8
// channels are then the bits of one 64-bit word.
inline constexpr uint32_t kAvx2MaxHeadDim = 512;
static_assert(kAvx2MaxHeadDim / 8 <= 64, "a head's groups of 8 channels fit one word");

// The row step multiplier of scale index j < 16: 2^((j - 8) / 4), as these literals give it
// (a quarter power of two times an exact power of two).
KVPOOL_HD constexpr float RowScale(uint32_t j) {
  const uint32_t q = j & 3;
  const float s = q == 0 ? 1.0f : q == 1 ? 1.18920712f : q == 2 ? 1.41421356f : 1.68179283f;
  const uint32_t e = (j >> 2) & 3;
  return s * (e == 0 ? 0.25f : e == 1 ? 0.5f : e == 2 ? 1.0f : 2.0f);
}

// Half the step of a row with b residual planes, per unit of row scale: for b >= 1 about half
// the MSE-optimal step of a uniform quantiser with 2^b levels for a unit Gaussian; for b = 0 (a
// row whose only planes are its outlier channels') 1.
KVPOOL_HD constexpr float HalfStep(uint32_t b) {
  switch (b) {
    case 0:
      return 1.0f;
    case 1:
      return 0.798f;
    case 2:
      return 0.49785f;
    case 3:
      return 0.293f;
    case 4:
      return 0.1676f;
    case 5:
      return 0.09405f;
    case 6:
      return 0.05205f;
    case 7:
      return 0.02845f;
    case 8:
      return 0.0154f;
    case 9:
      return 0.0083f;
    case 10:
      return 0.0044f;
    case 11:
      return 0.00235f;
    case 12:
      return 0.00126f;
    case 13:
      return 0.00067f;
    case 14:
      return 0.00036f;
    default:
      return 0.00019f;
  }
}

// A row's half step: (u * RowScale(j)) * HalfStep(b), two float multiplications in that order.
KVPOOL_HD float RowHalfStep(float unit, uint8_t meta) {
  return (unit * RowScale(meta >> 4)) * HalfStep(meta & 15);
}

KVPOOL_HD uint64_t PlaneBytes(uint32_t n) { return (uint64_t{n} + 7) / 8; }

// Bit i of a bit plane (byte i / 8, bit i % 8).
KVPOOL_HD bool PlaneBit(const uint8_t* plane, uint64_t i) { return (plane[i / 8] >> (i % 8)) & 1; }

// True when the bits of `plane` (n bits used) beyond n are 0.
KVPOOL_HD bool PaddingClear(const uint8_t* plane, uint64_t n) {
  return n % 8 == 0 || (plane[n / 8] >> (n % 8)) == 0;
}

// Bytes of a row's data: b planes of its D channels, then its head's E extra planes of the n
// outlier channels (none when n = 0).
KVPOOL_HD uint64_t RowDataBytes(uint32_t D, uint32_t outliers, uint32_t extra, uint32_t b) {
  return b * PlaneBytes(D) + (outliers ? extra * PlaneBytes(outliers) : 0);
}

// Vectors whose data starts on a 64-byte boundary, for the fast kernels' aligned loads.
template <typename T>
struct Align64 {
  using value_type = T;
  Align64() = default;
  template <typename U>
  Align64(const Align64<U>&) {}  // NOLINT: allocators convert implicitly.
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete (p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Align64<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const Align64<U>&) const {
    return false;
  }
};
template <typename T>
using AlignedVector = std::vector<T, Align64<T>>;

// The validated sections of a mode 4 payload (pointers into it) and its per-head fields.
struct ParsedRows {
  struct Head {
    uint32_t rank = 0, outliers = 0, extra = 0;
    float unit = 0, lr_scale = 0;
    uint8_t widths[kMaxRank] = {};
    uint64_t basis = 0;    // Offset of its basis codes from `basis`.
    uint64_t outlier = 0;  // Index of its first outlier channel in `outliers`.
    uint64_t coef = 0;     // Offset of its coefficient planes from `coefs`.
    uint64_t rows = 0;     // Offset of its first row's data from `rows`.
  };
  std::vector<Head> heads;
  const uint8_t* means = nullptr;     // [H][D] elements of the dtype.
  const uint8_t* basis = nullptr;     // int8 codes, head after head, [r][D].
  const uint8_t* outliers = nullptr;  // u16 channels, head after head.
  const uint8_t* classes = nullptr;   // Nibbles [T][H], or null.
  const uint8_t* metas = nullptr;     // [H][T]: low nibble b, high nibble j.
  const uint8_t* rows = nullptr;      // Row data, row after row.
  const uint8_t* coefs = nullptr;     // Coefficient planes.
  uint64_t rows_bytes = 0;
};

// Bytes of row (h, t)'s data given its meta byte.
inline uint64_t RowBytes(const ParsedRows::Head& hd, uint32_t D, uint8_t meta) {
  return RowDataBytes(D, hd.outliers, hd.extra, meta & 15);
}

// The fast decoders' walk over a parsed payload: token after token, head after head, so that
// the output streams out in order, each head's rows (head-major in the payload) read through a
// pointer of their own; row(h, t, meta, data, o) decodes row (h, t) from `data` into the D
// elements at o.
template <typename Row>
void ForEachRowTokenMajor(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out,
                          Row row) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  thread_local std::vector<const uint8_t*> rows;
  rows.resize(H);
  for (uint32_t h = 0; h < H; ++h) rows[h] = parsed.rows + parsed.heads[h].rows;
  for (uint32_t t = 0; t < T; ++t) {
    uint16_t* o = out + uint64_t{t} * H * D;
    for (uint32_t h = 0; h < H; ++h) {
      const uint8_t meta = parsed.metas[uint64_t{h} * T + t];
      __builtin_prefetch(rows[h] + 256);
      row(h, t, meta, rows[h], o + uint64_t{h} * D);
      rows[h] += RowBytes(parsed.heads[h], D, meta);
    }
  }
}

// Validates every field of a mode 4 payload against `size` (DataLoss naming what is wrong).
absl::Status ParseRows(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                       ParsedRows* parsed);

// The coefficient codes of every row, coefs[(h * kMaxRank + j) * T + t] (0 for j >= r).
void DecodeRowCoefficients(const SegmentShape& shape, const ParsedRows& parsed, int16_t* coefs);

// Decodes a parsed mode 4 payload with plain loops (the definition).
void DecodeRowsRef(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out);
// Parses a mode 4 payload and decodes it: with AVX-512 where DecodeRowsAvx512 qualifies, else
// with AVX2 where DecodeRowsAvx2 does, else DecodeRowsRef (`fast` false: always DecodeRowsRef).
absl::Status DecodeRows(const SegmentShape& shape, const uint8_t* payload, uint64_t size, bool fast,
                        uint16_t* out);
// Decodes a parsed mode 4 payload with AVX-512 (bit-identical); false (nothing written) when the
// CPU or the shape does not qualify (head_dim a multiple of 32). kvpool_rows.cc dispatches to
// the build of kvpool_rows_decode_avx512.cc for the CPU (with or without VNNI).
bool DecodeRowsAvx512(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out);
bool DecodeRowsAvx512Base(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out);
bool DecodeRowsAvx512Vnni(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out);
// The same with AVX2, FMA and F16C (kvpool_rows_decode_avx2.cc), for CPUs without AVX-512;
// false (nothing written) when the CPU or the shape does not qualify (head_dim a multiple of 32,
// at most kAvx2MaxHeadDim).
bool DecodeRowsAvx2(const SegmentShape& shape, const ParsedRows& parsed, uint16_t* out);

// ---- The encoder --------------------------------------------------------------------------

// Where RowHead::pairs (and the AVX-512 decoder's copy) keeps basis code j of channel d.
inline uint64_t PairSlot(uint32_t d, uint32_t j) {
  return ((uint64_t{d / 16} * 4 + j / 2) * 16 + d % 16) * 2 + j % 2;
}

// pairs[PairSlot(d, j)] = codes[j * D + d] for j < rank, d < D (D a multiple of 16); slot
// j = rank of an odd rank gets 0, the slots of higher pairs are left as they are. 16 channels
// at a time (SSE2).
void FillPairs(const int8_t* codes, uint32_t rank, uint32_t D, int16_t* pairs);

// One head's fixed parts as the row kernels use them (built by the encoder per segment).
struct RowHead {
  uint32_t D = 0, rank = 0, outliers = 0, extra = 0;
  const float* means = nullptr;     // [D] decoded means.
  const float* basis = nullptr;     // [rank][D] the decoded basis, float(code) * basis scale.
  const float* inv_step = nullptr;  // [rank] 1 / (coefficient step * |basis_j|^2).
  const int8_t* codes = nullptr;    // [rank][D] basis codes.
  // The same for the fast kernels (head_dim a multiple of 16), 16 channels at a time: chunks
  // [D / 16][8][16] (direction j of channels 16k.. at (8k + j) * 16, zero for j >= rank) and
  // pairs [D / 16][4][16][2] (codes of directions 2i, 2i + 1 of channel 16k + l at
  // ((4k + i) * 16 + l) * 2, zero beyond rank).
  const float* chunks = nullptr;
  const int16_t* pairs = nullptr;
  const uint8_t* is_outlier = nullptr;      // [D] 1 for outlier channels.
  const uint32_t* outlier = nullptr;        // [outliers] the outlier channels, increasing.
  const uint32_t* outlier_masks = nullptr;  // [D / 32] bit d % 32 set for outlier channels.
  float lr_scale = 0;
};

// What projecting a row measured: squared distance of x from the means (all channels), the
// residual's energy in regular and in outlier channels, and x's energy; each a float sum of 16
// lanes (d mod 16, fused multiply-add, channels in order) combined by Tree16.
struct RowStats {
  float dist = 0, regular = 0, outlier = 0, energy = 0;
};

// Chooses the meta byte of row `i` of a RowKernels::encode call from its stats and gives its
// half step (the encoder's per-row decision, between projecting and quantising).
using ChooseFn = uint8_t (*)(void* ctx, uint32_t i, const RowStats& stats, float* hs);

// Planes' worth of room past a row's start that RowKernels::encode may write (whole groups of
// eight planes, stored without branching on the row's b).
inline constexpr uint32_t kRowStoreRoom = 16;

// The most rows one RowKernels::encode call takes.
inline constexpr uint32_t kRowBlock = 16;

// The encoder's inner loops: the reference's are plain loops (kvpool_rows.cc), the AVX-512
// ones compute the same operations in the same order, so both write the same payload.
struct RowKernels {
  // The full pass, for `rows` (1 to kRowBlock) rows x[i] (D elements of the dtype) of one head:
  //   project: coefficient codes c_j = clamp(nearbyint(dot_j * inv_step_j), +-kMaxCoefCode)
  //     where dot_j = Tree16 of 16 lanes of fma((x - m), basis_j, .), at coefs + i * kMaxRank;
  //     the prediction z[d] = fma(lr_scale, float(sum_j c_j * code_j[d]), m[d]); stats[i] of
  //     x - m (dist), of x (energy) and of x - z;
  //   meta[i] = choose(ctx, i, stats[i], &hs);
  //   quantise against z with meta[i] (b residual planes, half step hs = RowHalfStep): per
  //     element v = floor((x - z) * inv) with inv = 1 / (2 hs), code u = clamp(v + 2^(n-1), 0,
  //     2^n - 1) with n = b (regular) or b + E (outlier channels), decoded
  //     y = to_dtype(fma(hs, 2u - (2^n - 1), z)); the row's planes into `out` (each right
  //     after the one before), its squared error Tree16 of 16 lanes of fma(y - x, y - x, .)
  //     into err[i]. It may write scratch bytes past a row's own, up to kRowStoreRoom planes
  //     of ceil(D / 8) bytes from the row's start, which `out` must hold; what follows
  //     overwrites them.
  // False when an energy is not finite (an element not finite, or too large to square); then
  // nothing else is defined.
  bool (*encode)(const RowHead& hd, DType dtype, const uint16_t* const* x, uint32_t rows,
                 int16_t* coefs, ChooseFn choose, void* ctx, uint8_t* out, RowStats* stats,
                 uint8_t* meta, float* err);
  // The basis search's products over `count` rows x[n * ld + d] (d < D; k <= 8):
  // out[j * D + d] = fma chain over n in order of (w[n * k + j], x[n][d]), from out's value;
  void (*accumulate)(const float* x, uint64_t ld, uint32_t count, const float* w, uint32_t k,
                     uint32_t D, float* out);
  // y[n * k + j] = Tree16 of 16 lanes (d mod 16) of fma(x[n][d], s[j * D + d], .).
  void (*dot)(const float* x, uint64_t ld, uint32_t count, const float* s, uint32_t k, uint32_t D,
              float* y);
  // Writes `width` (>= 1) planes of ceil(T / 8) bytes at `out`: bit t of plane p = bit p of
  // codes[t] + 2^(width - 1).
  void (*planes)(const int16_t* codes, uint32_t T, uint32_t width, uint8_t* out);
  // The sample's loads: out[c] = float(x[c]) and sums[c] = sums[c] + out[c] for c < n; returns
  // Tree16 of 16 lanes (c mod 16) of fma(out, out, .) (not finite when an element is not).
  float (*load)(DType dtype, const uint16_t* x, uint64_t n, float* out, float* sums);
  // xc[d] = x[d] - m[d] and var[d] = var[d] + xc[d] * xc[d] (d < D, no fma); returns Tree16 of
  // 16 lanes (d mod 16) of fma(xc, xc, .).
  float (*centre)(const float* x, const float* m, uint32_t D, float* xc, float* var);
};
const RowKernels& RowKernelsRef();
// Bytes of a row's data given its meta byte (RowBytes for the encoder's heads).
inline uint64_t RowBytesOf(const RowHead& hd, uint8_t meta) {
  return RowDataBytes(hd.D, hd.outliers, hd.extra, meta & 15);
}
// The AVX-512 kernels when the CPU has them and head_dim is a multiple of 32, else null.
const RowKernels* RowKernelsAvx512(uint32_t head_dim);
// The AVX2 kernels (kvpool_rows_avx2.cc) when the CPU has AVX2, FMA and F16C and head_dim is a
// multiple of 32 up to kAvx2MaxHeadDim, else null: for CPUs without AVX-512.
const RowKernels* RowKernelsAvx2(uint32_t head_dim);
// The fast CPU path's kernels for head_dim: AVX-512, else AVX2, else the reference's.
const RowKernels& CpuRowKernels(uint32_t head_dim);

// The bytes of output in which the mode 4 encoder writes a segment of `shape` in place (its
// worst case and a row's stores past it); given less it writes through a scratch and copies.
uint64_t RowsBufferBytes(const SegmentShape& shape);

// The encoder of mode 4 (kvpool_rows_encoder.cc): `fast` for a value segment's token classes
// from its keys' elements (when their payload does not carry them), `rows` for everything
// else. InvalidArgument for non-finite elements (EncodeSegment then stores them raw).
absl::StatusOr<uint64_t> EncodeRows(const SegmentShape& shape, const CodecParams& params,
                                    const uint16_t* in, const LayerKeys& keys,
                                    const FastKernels& fast, const RowKernels& rows, uint8_t* out,
                                    uint64_t capacity);

// The class map (nibbles, [tokens][kv_heads]) of a mode 4 key payload for a value segment of
// `shape`, or nullptr when it has none; false when the payload is malformed up to the map
// (KeyClasses for this mode).
bool RowKeyClassMap(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                    const uint8_t** map);

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_ROWS_H_
