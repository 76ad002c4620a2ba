// Internal to the kvpool codec: constants of the payload format (documented in kvpool_ref.cc)
// and the pieces shared by the reference and the fast CPU path, so that both write the same
// payload and decode bit-identically. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KVPOOL_FORMAT_H_
#define KVPOOL_KERNELS_KVPOOL_FORMAT_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/encoded_segment.h"

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint32_t kPack = 16;           // Tokens per pack (one column, one width).
inline constexpr uint32_t kMaxRank = 8;         // Low-rank directions per head, at most.
inline constexpr uint32_t kMaxWidth = 15;       // Bits per zigzag code, at most (a nibble).
inline constexpr uint32_t kHeaderBytes = 8;     // mode, 3 reserved, f32 step.
inline constexpr uint32_t kDirectionBytes = 8;  // f32 coefficient step, f32 basis scale.
inline constexpr uint8_t kModeRaw = 0;
inline constexpr uint8_t kModeCoded = 1;
inline constexpr float kCoefStepFactor = 4.f;  // Coefficient step / first residual step.
inline constexpr double kRankThreshold = 4.0;  // Keep a direction above 4x mean variance.

inline uint32_t Groups(uint32_t tokens) { return (tokens + kPack - 1) / kPack; }
inline uint32_t ZigZag(int32_t q) { return (uint32_t(q) << 1) ^ uint32_t(q >> 31); }
inline int32_t UnZigZag(uint32_t u) { return int32_t(u >> 1) ^ -int32_t(u & 1); }

// The validated sections of a coded payload (pointers into it).
struct Parsed {
  uint8_t mode = kModeRaw;
  float step = 0;
  const uint8_t* raw = nullptr;           // kModeRaw: the elements.
  const uint8_t* ranks = nullptr;         // [kv_heads]
  const uint8_t* means = nullptr;         // [kv_heads * head_dim] u16 elements
  const uint8_t* directions = nullptr;    // per head, per direction: 8 + head_dim bytes
  uint32_t coef_cols = 0;                 // Sum of ranks.
  const uint8_t* coef_widths = nullptr;   // Nibbles [groups][coef_cols]
  const uint8_t* coef_data = nullptr;
  const uint8_t* res_widths = nullptr;    // Nibbles [groups][kv_heads * head_dim]
  const uint8_t* res_data = nullptr;
};

// Validates every field against `size`: DataLoss on any inconsistency.
absl::Status ParsePayload(const SegmentShape& shape, const uint8_t* payload, uint64_t size,
                          Parsed* parsed);

// Dequantised low-rank parts, exactly as every decoder computes them: basis[h][j][d] and
// coefficients[t][col] (col = first column of head h + j), and the first column per head.
struct LowRank {
  std::vector<float> basis;         // kv_heads * kMaxRank * head_dim
  std::vector<float> coefficients;  // Groups(tokens) * kPack * coef_cols
  std::vector<uint32_t> first_col;  // kv_heads + 1
};
void DecodeLowRank(const SegmentShape& shape, const Parsed& parsed, LowRank* low_rank);

// The encoder's analysis: means, low-rank basis and coefficients written into `out` (the
// payload up to the coefficient pack stream) and the prediction every decoder will form.
struct Analysis {
  std::vector<uint8_t> head;        // Payload bytes up to and including the coefficient packs.
  std::vector<float> prediction;    // [tokens][kv_heads][head_dim]
  std::vector<float> x;             // The input as float.
  double energy = 0;                // Sum of x^2.
  bool finite = true;
  float first_step = 0;
};
void Analyze(const SegmentShape& shape, const CodecParams& params, const uint16_t* in,
             Analysis* analysis);

// The target relative L2 error for this kind (the budget, scaled for keys by `extra`).
double TargetError(const SegmentShape& shape, const CodecParams& params);

// Appends a pack stream ([groups][cols] codes, zigzag) to `out`. False when a code needs more
// than kMaxWidth bits.
bool AppendPacks(const std::vector<int32_t>& codes, uint32_t groups, uint32_t cols,
                 std::vector<uint8_t>* out);

inline constexpr float kMaxCode = 16383.f;  // |code| that still fits kMaxWidth bits.
inline constexpr int kMaxSearch = 12;         // Step-search passes before falling back to raw.

// One quantisation pass at `step`: residual codes [Groups(T) * 16][H * D] (padding rows 0) and
// the squared error of the decoded elements, summed in 8 partial sums (element index mod 8)
// combined as ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)). False when a code exceeds kMaxCode.
using QuantizeFn = bool (*)(const SegmentShape&, const Analysis&, float step,
                            std::vector<int32_t>* codes, double* err);
bool QuantizeResidualRef(const SegmentShape& shape, const Analysis& a, float step,
                         std::vector<int32_t>* codes, double* err);

// The step search and the payload: the largest step found whose error meets the target,
// raw mode when none does or when coding does not pay.
absl::StatusOr<uint64_t> FinishEncode(const SegmentShape& shape, const CodecParams& params,
                                      const uint16_t* in, Analysis* a, QuantizeFn quantize,
                                      uint8_t* out, uint64_t capacity);

uint16_t Load16(const uint8_t* p);

// Size of a raw-mode payload.
uint64_t RawPayloadBytes(const SegmentShape& shape);

float ToFloat(DType dtype, uint16_t h);
uint16_t FromFloat(DType dtype, float f);

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_FORMAT_H_
