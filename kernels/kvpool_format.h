// Internal to the kvpool codec: constants of the payload format (documented in kvpool_ref.cc)
// and the pieces shared by the reference and the fast CPU path, so that both write the same
// payload and decode bit-identically. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KVPOOL_FORMAT_H_
#define KVPOOL_KERNELS_KVPOOL_FORMAT_H_

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/encoded_segment.h"
#include "kernels/codec.h"
#include "kernels/host_device.h"
#include "kernels/kvpool_entropy.h"

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint32_t kPack = 16;           // Tokens per pack (one column, one width).
inline constexpr uint32_t kMaxRank = 8;         // Low-rank directions per head, at most.
inline constexpr uint32_t kMaxWidth = 15;       // Bits per zigzag code, at most (a nibble).
inline constexpr uint32_t kHeaderBytes = 8;     // mode, flags, 2 reserved, f32 step.
inline constexpr uint32_t kDirectionBytes = 8;  // f32 coefficient step, f32 basis scale.
inline constexpr uint8_t kModeRaw = 0;
inline constexpr uint8_t kModeCoded = 1;    // Pack streams (bit planes).
// Entropy-coded streams (kvpool_entropy.h), means and basis too. Mode 2 (means and basis as
// fixed-width numbers) is retired: decoders reject it like any unknown mode.
inline constexpr uint8_t kModeEntropy = 3;
inline constexpr uint8_t kFlagPacked = kKvpoolPackedMode;  // CodecParams::flags: write mode 1.
// CodecParams::flags: weight every token equally (no token classes).
inline constexpr uint8_t kFlagEqualTokens = 8;
// CodecParams::flags: the fast profile (kvpool_fast.cc): mode 1 without low-rank directions,
// token classes, a step from one estimate; encodes and decodes at memory speed.
inline constexpr uint8_t kFlagFast = kKvpoolFastProfile;
// CodecParams::flags: the entropy profile, mode 3 (the default before mode 4).
inline constexpr uint8_t kFlagEntropy = kKvpoolEntropyProfile;
// Header byte 1 (modes 1 and 3): a token class map follows the direction entries.
inline constexpr uint8_t kHeadClasses = 1;
// Token weighting strength: a token whose key lies z times the head's mean squared distance
// from the keys' mean gets class round(2 * kTokenWeighting * z / ln 2), i.e. a residual step
// exp(-kTokenWeighting * z / 2) relative to z = 0 (kvpool_analysis.cc, TokenClasses).
inline constexpr double kTokenWeighting = 0.7;
inline constexpr uint32_t kClasses = 16;

// The residual step multiplier of token class k < 16: 2^(-k / 4), exact in float (a quarter
// power of two times a power of two), so that every path computes the same steps.
// No table, so that device code keeps it in registers.
constexpr float ClassScale(uint32_t k) {
  const uint32_t q = k & 3;
  float s = q == 0 ? 1.0f : q == 1 ? 0.840896415f : q == 2 ? 0.707106781f : 0.594603557f;
  for (uint32_t i = 0; i < (k >> 2); ++i) s *= 0.5f;
  return s;
}
inline constexpr float kCoefStepFactor = 3.f;  // Coefficient step / first residual step.
// Mode 3: residual variance assumed by the mean and basis steps, in first steps^2 / 12.
inline constexpr double kSideVariance = 8.0;
inline constexpr double kRankThreshold = 4.0;  // Keep a direction above 4x mean variance.

// Bytes of one direction's entry: mode 1 holds its int8 basis codes there too.
inline uint64_t DirectionBytes(uint8_t mode, uint32_t head_dim) {
  return kDirectionBytes + (mode == kModeCoded ? head_dim : 0);
}

inline uint32_t Groups(uint32_t tokens) { return (tokens + kPack - 1) / kPack; }

// The step search of the fast profile and of the CUDA encoder (kvpool_fast.cc,
// kvpool_cuda_kernels.cuh). The estimate pass samples every 8th group of 16 tokens (every 4th
// below 16 groups, none below 8): its error predicts the full pass's within a few percent on
// the data measured.
inline uint32_t EstimateStride(uint32_t groups) { return groups >= 16 ? 8 : 4; }
// The means come from every 4th group from 8 groups (128 tokens) on, else from all: a mean
// off by the sampling error (a 64th of a channel's variance at 256 tokens) costs the residual
// about as much energy, a fraction of a per cent of the bytes, and saves a pass over the input.
inline uint32_t MeanStride(uint32_t groups) { return groups >= 8 ? 4 : 1; }
// Aim this fraction of the allowed error: the sampled estimate misses the full pass's error by
// a few per cent, and a miss costs a second full pass (3 % of the segments measured at 0.92,
// 9 % at 0.955, for 0.5 % of the bytes).
inline constexpr double kFastAim = 0.92;
inline uint32_t ZigZag(int32_t q) { return (uint32_t(q) << 1) ^ uint32_t(q >> 31); }
inline int32_t UnZigZag(uint32_t u) { return int32_t(u >> 1) ^ -int32_t(u & 1); }

// The validated sections of a coded payload (pointers into it).
struct Parsed {
  uint8_t mode = kModeRaw;
  float step = 0;
  const uint8_t* raw = nullptr;           // kModeRaw: the elements.
  const uint8_t* ranks = nullptr;         // [kv_heads]
  const uint8_t* means = nullptr;         // Mode 1: [kv_heads * head_dim] u16 elements
  float mean_step = 0;                    // Mode 3.
  const uint8_t* directions = nullptr;    // per direction: DirectionBytes(mode, head_dim)
  const uint8_t* classes = nullptr;       // With kHeadClasses: nibbles [tokens][kv_heads]
  uint32_t coef_cols = 0;                 // Sum of ranks.
  const uint8_t* coef_widths = nullptr;   // Mode 1: nibbles [groups][coef_cols]
  const uint8_t* coef_data = nullptr;
  const uint8_t* res_widths = nullptr;    // Mode 1: nibbles [groups][kv_heads * head_dim]
  const uint8_t* res_data = nullptr;
  const uint8_t* end = nullptr;                 // One past the payload's last byte.
  Stream side_stream, coef_stream, res_stream;  // Mode 3.
};

// The residual codes of a coded payload (mode 1 or 2), codes[t * H * D + c] for t < G * 16
// (tokens >= T are 0). DataLoss when an entropy-coded lane is corrupt.
absl::Status DecodeResidualCodes(const SegmentShape& shape, const Parsed& parsed,
                                 std::vector<int32_t>* codes);

// Validates every field against `size`: DataLoss on any inconsistency.
absl::Status ParsePayload(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                          Parsed* parsed);
// The same up to and including the class map (the raw section of a raw payload); *end_of_head:
// the offset after it.
absl::Status ParseHead(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                       Parsed* parsed, uint64_t* end_of_head);

// The token classes ([tokens][kv_heads]; empty: all the same) that a key segment's coded
// payload carries, for a value segment of `shape`; false when the payload carries none (raw
// mode, or malformed up to the class map): the caller then computes them from the keys.
bool KeyClasses(const SegmentShape& shape, absl::Span<const uint8_t> payload,
                std::vector<uint8_t>* classes);

// Dequantised means and low-rank parts, exactly as every decoder computes them: means[c],
// basis[h][j][d] and coefficients[t][col] (col = first column of head h + j), and the first
// column per head.
struct LowRank {
  std::vector<float> means;         // kv_heads * head_dim
  std::vector<float> basis;         // kv_heads * kMaxRank * head_dim
  std::vector<float> coefficients;  // Groups(tokens) * kPack * coef_cols
  std::vector<uint32_t> first_col;  // kv_heads + 1
};
absl::Status DecodeLowRank(const SegmentShape& shape, const Parsed& parsed, LowRank* low_rank);

// The residual step of every token and head, steps[t * kv_heads + h]: step * ClassScale(class)
// (one float multiplication), or the step itself without a class map.
void TokenSteps(const SegmentShape& shape, const Parsed& parsed, std::vector<float>* steps);

// The encoder's token classes (nibbles' values, [tokens][kv_heads]) from a key segment of
// `shape` (its kind aside) as float: by how far each token's key lies from the head's mean
// key, the tokens a query is likely to attend to. Empty when every token would get the same
// class (e.g. one token, constant or non-finite keys).
std::vector<uint8_t> TokenClasses(const SegmentShape& shape, const float* keys);

// The encoder's analysis: means, low-rank basis and coefficients written into `head` (the
// payload up to the coefficient pack stream) and the prediction every decoder will form.
// "Pack-major" arrays hold element (token 16 * g + i, column c) at ((g * H * D) + c) * 16 + i,
// tokens >= T as 0: pack k = g * H * D + c is 16 contiguous values.
struct Analysis {
  std::vector<uint8_t> head;        // Payload bytes up to and including the basis.
  std::vector<int32_t> coef_codes;  // [G * 16][coef_cols] (tokens >= T: 0).
  uint32_t coef_cols = 0;
  std::vector<float> x;             // The input as float, [tokens][kv_heads][head_dim].
  std::vector<float> xp;            // The input as float, pack-major.
  std::vector<float> kx;            // A value segment's keys as float (for its classes).
  std::vector<float> prediction;    // Pack-major.
  std::vector<uint8_t> classes;     // Token classes [T][H]; empty: all class 0, no map.
  std::vector<float> scale;         // ClassScale per token and head: [G][H][16] (16 tokens).
  uint32_t head_dim = 0;            // Pack k's scales: scale[(k / head_dim) * 16 ..].
  double energy = 0;                // Sum of x^2.
  bool finite = true;
  float first_step = 0;
  // Scratch of FinishEncode, kept so that a reused Analysis allocates nothing.
  std::vector<uint16_t> codes, best_codes, zz;
  std::vector<uint8_t> payload;
};

using QuantizeFnPtr = bool (*)(const Analysis& a, DType dtype, uint64_t packs, uint32_t stride,
                               float step, uint16_t* codes, double* err);

// The encoder's inner loops. The reference's are plain loops; the fast CPU path's compute the
// same operations in the same order (float, multiply then add), so both write the same payload.
struct EncodeKernels {
  // x[i] = float(in[i]) for i < n; *energy = sum of x^2 in double, in 8 partial sums (i mod 8)
  // combined as ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)). False when an element is not finite.
  bool (*load)(DType dtype, const uint16_t* in, uint64_t n, float* x, double* energy);
  // For rows t_n = n * stride (n < count) of `rows` (row pitch ld) and s[j][D] (j < k):
  // y[n * k + j] = rows[t_n] . s[j], in 8 partial sums (d mod 8) combined as above.
  void (*dot)(const float* rows, uint64_t ld, uint32_t count, uint32_t stride, const float* s,
              uint32_t k, uint32_t D, float* y);
  // out[j][d] = out[j][d] + w[n * k + j] * rows[t_n][d], for n = 0, 1, .. in order.
  void (*accumulate)(const float* rows, uint64_t ld, uint32_t count, uint32_t stride,
                     const float* w, uint32_t k, uint32_t D, float* out);
  // The prediction of one head, pack-major from `pred` (its first column): p = m[d]; for
  // j < r: p = p + cf[j * G * 16 + t] * basis[j * D + d]. Tokens >= T get 0.
  void (*predict)(uint32_t T, uint64_t HD, uint32_t D, uint32_t r, const float* m,
                  const float* cf, const float* basis, float* pred);
  // xp = x pack-major.
  void (*to_packs)(const float* x, uint32_t T, uint64_t HD, float* xp);
  // One quantisation pass over packs k = 0, stride, 2 * stride, .. < packs at `step`: with
  // s = step * scale of the element's token and head, code q = nearbyint((xp - p) * (1 / s)),
  // decoded p + q * s; zigzag u16 codes written pack-major when `codes` is
  // not null, and the squared error of the decoded elements in 8 partial sums (token mod 8),
  // combined as above. False when a code exceeds kMaxCode or the error is not finite.
  QuantizeFnPtr quantize;
  // Writes the pack stream of zigzag u16 pack-major codes (widths, then bit planes) at `out`,
  // which has room for PackBound(packs) bytes; returns its size.
  uint64_t (*pack)(const uint16_t* codes, uint64_t packs, uint8_t* out);
};
const EncodeKernels& RefKernels();
inline uint64_t PackBound(uint64_t packs) { return (packs + 1) / 2 + packs * 32 + 32; }

// Symmetric eigen-decomposition of a small k x k matrix (cyclic Jacobi, until the
// off-diagonal's squares fall below `tolerance` times the diagonal's): a -> diagonal, v ->
// eigenvectors in columns. kvpool_analysis.cc.
void Jacobi(int k, std::vector<double>* a, std::vector<double>* v, double tolerance = 1e-24);
// Sign (+-1) of the sketch entry for token t, sketch row j. kvpool_analysis.cc.
double Omega(uint32_t t, uint32_t j);

// Token classes (mode 3 without kFlagEqualTokens): TokenClasses of the segment itself for
// keys; for values those `keys.payload` carries (KeyClasses), else TokenClasses of
// `keys.elements` (none when null).
void Analyze(const SegmentShape& shape, const CodecParams& params, const uint16_t* in,
             const LayerKeys& keys, const EncodeKernels& kernels, Analysis* analysis);

// The target relative L2 error for this kind (the budget, scaled for keys by `extra`).
double TargetError(const SegmentShape& shape, const CodecParams& params);

// Appends a pack stream ([groups][cols] codes, zigzag) to `out`. False when a code needs more
// than kMaxWidth bits.
bool AppendPacks(const std::vector<int32_t>& codes, uint32_t groups, uint32_t cols,
                 std::vector<uint8_t>* out);

inline constexpr float kMaxCode = 16383.f;  // |code| that still fits kMaxWidth bits.
static_assert(kMaxZigZagCode == 2 * uint32_t(kMaxCode), "entropy streams hold every code");
inline constexpr int kMaxSearch = 12;         // Full quantisation passes before falling back to raw.

// The step search and the payload: a step whose measured error meets the target (chosen with
// estimates on a subsample of packs, then checked on all), raw mode when none does or when
// coding does not pay.
absl::StatusOr<uint64_t> FinishEncode(const SegmentShape& shape, const CodecParams& params,
                                      const uint16_t* in, const EncodeKernels& kernels,
                                      Analysis* a, uint8_t* out, uint64_t capacity);

// Token class of a squared distance from the head's mean key, given per_z =
// 2 * kTokenWeighting / ln 2 * tokens / (sum of the head's squared distances).
// Clamped first (a NaN to the top class too), then rounded to nearest even by adding and
// subtracting 1.5 * 2^52: nearbyint's result without its library call (a baseline x86-64 build
// calls nearbyint, which saves and restores the floating-point environment) or a branch.
KVPOOL_HD uint8_t ClassOf(double dist, double per_z) {
  const double x = dist * per_z, top = kClasses - 1;
  const double z = x < top ? x : top;
  return uint8_t((z + 0x1.8p52) - 0x1.8p52);
}

// The fast profile's inner loops (kvpool_fast.cc defines them; the fast CPU path computes the
// same float operations in the same order, so both write the same payload). Elements are read
// from the input as the dtype, tokens t < T, columns c = h * D + d < H * D.
struct FastKernels {
  // Over the groups g = 0, stride, 2 * stride, .. (tokens 16 g .. 16 g + 15, those < T):
  // sums[c] = sum of x, sq[c] = sum of x * x (float, token by token). False when one of those
  // elements is not finite.
  bool (*stats)(DType dtype, const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride,
                float* sums, float* sq);
  // stored[c] = to_dtype(sums[c] / n) (round to nearest even), m[c] = its float value.
  void (*means)(DType dtype, const float* sums, uint32_t n, uint64_t HD, uint16_t* stored,
                float* m);
  // dist[t * H + h] = sum over d of (x - m[h * D + d])^2: float, 16 partial sums (d mod 16)
  // combined by Tree16.
  void (*distances)(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                    const float* m, float* dist);
  // One quantisation pass over the groups g = 0, stride, 2 * stride, .. (16 tokens each):
  // element (t, c) with s = steps[(g * H + h) * 16 + t % 16] and inv = 1 / s gets the code
  // q = nearbyint((x - m[c]) * inv) and decodes to y = to_dtype(m[c] + q * s), as every
  // decoder computes it; the squared errors e = y - x add up as a = fma(e, e, a) in 64 float
  // partial sums a[c mod 4][token mod 16] per group, columns in order; per token lane
  // l = (a0 + a1) + (a2 + a3), then Tree16 of the 16 lanes is added to *err in double, groups
  // in order (4 chains keep the adds' latency off the critical path). The energy x * x adds
  // up into *energy the same way (b = fma(x, x, b)). Tokens >= T: code 0, no error, no
  // energy. With `out` (stride 1) writes the residual pack stream there (room for
  // PackBound(G * H * D) bytes) and returns its size; without, returns 0. kQuantizeFailed
  // when a code exceeds kMaxCode or is NaN (an element or a mean not finite).
  uint64_t (*quantize)(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                       const float* m, const float* steps, uint32_t stride, uint8_t* out,
                       double* err, double* energy);
};
inline constexpr uint64_t kQuantizeFailed = ~uint64_t{0};
const FastKernels& FastRefKernels();
// AVX-512 (F, BW, VL, VBMI, GFNI) kernels when the CPU has them (CpuHasAvx512()), else AVX2's
// (FastKernelsAvx2), else the reference's. kvpool_avx512.cc.
const FastKernels& FastCpuKernels();
// AVX2 (FMA, F16C) kernels, the reference's payloads byte for byte; nullptr without AVX2.
// kvpool_fast_avx2.cc.
const FastKernels* FastKernelsAvx2();
// The decoded means m of `in` (the dtype's values of column sum / n over the groups MeanStride
// samples, n tokens; `stored` the elements) and the sampled energy scaled to all T tokens; false
// when a sampled element is not finite. kvpool_fast.cc.
bool DecodedMeans(const SegmentShape& shape, const uint16_t* in, const FastKernels& kn,
                  std::vector<float>* sums, std::vector<float>* sq, std::vector<float>* m,
                  std::vector<uint16_t>* stored, double* energy);
// Token classes [T][H] of the keys `keys` given their decoded means km (FastKernels::distances,
// then ClassOf per head); empty when all are equal. kvpool_fast.cc.
void FastClasses(const SegmentShape& shape, const uint16_t* keys, const float* km,
                 const FastKernels& kn, std::vector<float>* dist, std::vector<uint8_t>* classes);
// What the encoders that find non-finite elements themselves return for them (the fast
// profile's and mode 4's: EncoderDetectsNonFinite); EncodeSegment then stores the segment with
// the raw codec. kvpool_fast.cc.
absl::Status NonFinite();
// Decodes a mode 1 payload without low-rank directions (the fast profile's) with AVX-512;
// false (nothing written) when the payload or the CPU does not qualify.
bool DecodePacksAvx512(const SegmentShape& shape, const Parsed& parsed, uint16_t* out);
// The same with AVX2 (kvpool_fast_avx2.cc).
bool DecodePacksAvx2(const SegmentShape& shape, const Parsed& parsed, uint16_t* out);
// Decodes a mode 3 (entropy-coded) payload with AVX-512: the entropy streams as DecodeStream
// decodes them, the reconstruction 16 channels per vector in the reference's order of float
// operations (bit-identical). Unimplemented (nothing written) when the payload or the CPU does
// not qualify (head_dim a multiple of 16); DataLoss when a stream is corrupt.
absl::Status DecodeEntropyAvx512(const SegmentShape& shape, const Parsed& parsed, uint16_t* out);
// Tree16: for k = 8, 4, 2, 1: l[i] = l[i] + l[i + k] (i < k); the result is l[0].
inline float Tree16(float* l) {
  for (int k = 8; k > 0; k >>= 1)
    for (int i = 0; i < k; ++i) l[i] = l[i] + l[i + k];
  return l[0];
}

// The fast profile's encoder (kvpool_fast.cc), with the given kernels; a value segment's
// classes as Analyze's.
absl::StatusOr<uint64_t> FastEncode(const SegmentShape& shape, const CodecParams& params,
                                    const uint16_t* in, const LayerKeys& keys,
                                    const FastKernels& kernels, uint8_t* out, uint64_t capacity);

uint16_t Load16(const uint8_t* p);
inline void PutF32(std::vector<uint8_t>* out, float f) {
  uint8_t b[4];
  std::memcpy(b, &f, 4);
  out->insert(out->end(), b, b + 4);
}

// Size of a raw-mode payload.
uint64_t RawPayloadBytes(const SegmentShape& shape);
// Writes the mode 0 payload of `in` (InvalidArgument when capacity is short); returns its size.
absl::StatusOr<uint64_t> WriteRawPayload(const SegmentShape& shape, const uint16_t* in,
                                         uint8_t* out, uint64_t capacity);

float ToFloat(DType dtype, uint16_t h);
uint16_t FromFloat(DType dtype, float f);

// The instance of a kernel template for a rank known at run time: ForRank(r, pick) returns
// pick(std::integral_constant<uint32_t, r>()) for r <= kMaxRank, e.g.
//   ForRank(rank, [](auto R) { return &Kernel<decltype(R)::value>; })
// with the table of all the ranks' instances built once per call site.
template <typename Pick, size_t... R>
auto RankTable(Pick pick, std::index_sequence<R...>) {
  using Fn = decltype(pick(std::integral_constant<uint32_t, 0>()));
  return std::array<Fn, sizeof...(R)>{pick(std::integral_constant<uint32_t, uint32_t(R)>())...};
}
template <typename Pick>
auto ForRank(uint32_t rank, Pick pick) {
  static const auto table = RankTable(pick, std::make_index_sequence<kMaxRank + 1>());
  return table[rank];
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_FORMAT_H_
