// Internal to the kvpool codec's mode 4 encoder (kvpool_rows_encoder.cc): what it decides from
// a sample of a segment's tokens before its full pass, and how it decides each row. Defined in
// kvpool_rows_plan.cc; deterministic, so that both host paths (which differ only in their
// kernels) write the same payload. Not a public API. Thread-compatible.
#ifndef KVPOOL_KERNELS_KVPOOL_ROWS_PLAN_H_
#define KVPOOL_KERNELS_KVPOOL_ROWS_PLAN_H_

#include <emmintrin.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/kvpool_rows.h"

namespace kvpool::kernels::kvpool::internal {

// Tokens n * stride (n < count) of a segment.
struct Sample {
  uint32_t count = 0, stride = 1;
  std::vector<uint16_t> stored;  // [H * D] the means as the dtype (what the payload holds)
  std::vector<float> means;      // [H * D] their values
  std::vector<float> xs;         // [H][count][D] the sampled rows less the means
  std::vector<float> var;        // [H][D] mean square of xs per channel
  std::vector<float> dist;       // [H][count] each row's squared distance from the means
  std::vector<float> raw;        // [count][H * D] the sampled rows as floats (scratch)
  double energy = 0;             // The segment's sum of squares, estimated from the sample.
};

// Loads the sample (RowKernels::load and centre), its means (FastKernels::means) and
// statistics. False when a sampled element is not finite (or too large to square).
bool LoadSample(const SegmentShape& shape, const RowKernels& rk, const FastKernels& fast,
                const uint16_t* in, uint32_t stride, uint32_t count, Sample* sample);

// What the step search knows of a sampled row: its class weight times its regular channels'
// variance, and its residual energy in regular and outlier channels.
struct ModelRow {
  double a = 0, regular = 0, outlier = 0;
};

// The token classes the step search weights the sample's rows by: key segments' from each
// row's distance to the means (ClassOf with the head's per_z), values' from `classes` ([T][H],
// their keys'; empty: all 0).
struct SampleClasses {
  bool keys = false;
  const std::vector<uint8_t>* classes = nullptr;
};

// One head's plan: RowHead's arrays and what the row decisions use.
struct HeadPlan {
  std::vector<float> basis, inv_step;
  AlignedVector<float> chunks;
  std::vector<int8_t> codes;
  AlignedVector<int16_t> pairs;
  std::vector<uint8_t> is_outlier;
  std::vector<uint32_t> outlier, masks;
  float unit = 1;
  double unit2 = 1;
  double per_z = 0;             // Key segments: ClassOf's scale for this head.
  std::vector<ModelRow> model;  // The sample's rows, for the step search.
  RowHead view;
};

// Writes hp's fast-kernel layouts (RowHead::chunks and pairs; empty where D is not a multiple
// of 16) of its first r directions (basis and codes) and its outlier masks (from outlier).
void FastLayouts(uint32_t r, uint32_t D, HeadPlan* hp);

// Plans head h from the sample: basis (rank by the bits it saves), outlier channels and their
// extra planes, the unit, the coefficient step (kCoefStep residual steps at `d_avg`, the
// budget's squared error per element, or at the residual's spread where that is finer), and
// the sample's model rows: each row's residual after the basis, from the basis search's own
// projections, split between regular and outlier channels as the head's variance is.
void PlanHead(const SegmentShape& shape, const RowKernels& rk, const Sample& sample, uint32_t h,
              double d_avg, const SampleClasses& classes, HeadPlan* hp);

// The step search's model: the error the sample's rows (the heads' model rows) would have,
// choosing their planes as RowRule does at a given mu, scaled to all rows.
class StepModel {
 public:
  // `scale`: rows of the segment per sampled row.
  StepModel(const std::vector<HeadPlan>& heads, double scale);
  double Predicted(double mu) const;
  // Heap bytes of its arrays (by their capacities).
  uint64_t Bytes() const {
    return (uint64_t{a_.capacity()} + regular_.capacity() + outlier_.capacity()) * sizeof(double);
  }
  // The smallest mu (to 1/32 of an octave, within 2^+-64) whose prediction is at most `aim`.
  double Solve(double aim) const;

 private:
  const std::vector<HeadPlan>& heads_;
  double scale_;
  uint32_t count_;
  std::vector<double> a_, regular_, outlier_;  // Per head: sorted a, prefix sums.
};

// How one head's rows choose their meta byte in a full pass at mu: b planes minimising
// b + mu * 2^(k/2) * (model error per channel) for a row of token class k, and the scale index
// nearest the row's spread (b = 0 rows with outlier channels: the outliers'), as thresholds on
// the row's regular and outlier energies.
// Each threshold list has kMaxPlanes entries and a last one that is NaN (x >= NaN is false for
// every x), so that it is counted four at a time.
inline constexpr uint32_t kRuleSlots = 16;
static_assert(kRuleSlots == kMaxPlanes + 1, "one NaN slot after the thresholds");
struct RowRule {
  float planes[kClasses][kRuleSlots];  // Plane p + 1 when regular >= planes[k][p].
  float scale[kRuleSlots];             // Scale index j + 1 when regular >= scale[j].
  float outlier_scale[kRuleSlots];     // The same for b = 0 rows, on the outlier energy.
  uint32_t cap;                        // 15 - E.
};
void MakeRowRule(const HeadPlan& hp, double mu, RowRule* rule);

// How many of a rule's kRuleSlots thresholds t[p] satisfy x >= t[p]: four SSE2 compares, their
// sign masks counted by a nibble table.
inline uint32_t CountAtMost(const float* t, float x) {
  static constexpr uint8_t kBits[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
  const __m128 v = _mm_set1_ps(x);
  uint32_t n = 0;
  for (uint32_t p = 0; p < kRuleSlots; p += 4) {
    n += kBits[_mm_movemask_ps(_mm_cmpge_ps(v, _mm_loadu_ps(t + p)))];
  }
  return n;
}

inline uint8_t ChooseMeta(const RowRule& rule, const RowStats& st, uint8_t cls) {
  uint32_t b = CountAtMost(rule.planes[cls], st.regular);
  b = b < rule.cap ? b : rule.cap;
  const uint32_t j =
      b > 0 ? CountAtMost(rule.scale, st.regular) : CountAtMost(rule.outlier_scale, st.outlier);
  return uint8_t(b | (j << 4));
}

// The segment's tokens the encoder plans from: every `stride`-th, `count` of them (at most 64).
void SampleTokens(uint32_t tokens, uint32_t* stride, uint32_t* count);

// What one full pass measured: every row's squared error and energy summed in double, head
// after head, token after token; its rows' bytes; false `finite` when a row's energy is not
// finite (then nothing else is defined).
struct PassResult {
  bool finite = true;
  double err = 0, energy = 0;
  uint64_t rows_bytes = 0;
};

// One full pass of the mode 4 encoder at `mu` over a segment, given its heads' plans and, for
// value rows, the classes its keys gave ([T][H]; empty: all 0): every row's meta into
// metas[h * T + t], key rows' classes as the payload's nibbles into `classes` (when
// `key_classes`), coefficient codes into coefs[(h * kMaxRank + j) * T + t] (j < rank), and
// the rows' planes. The CPU's pass (kvpool_rows_encoder.cc) writes the planes at `rows`, row
// after row; the GPU's (kvpool_rows_cuda_encoder.cuh) keeps them on the device until the
// encoder has accepted a pass. Both compute the reference's operations in its order, so one
// plan and mu give the same bytes.
class RowsPass {
 public:
  virtual ~RowsPass() = default;
  virtual absl::Status Run(const std::vector<HeadPlan>& heads, double mu, bool key_classes,
                           const std::vector<uint8_t>& given, uint8_t* classes, uint8_t* metas,
                           int16_t* coefs, uint8_t* rows, PassResult* result) = 0;
};

// The CPU's pass over the segment `in` with the row kernels `rk` (EncodeRows's).
std::unique_ptr<RowsPass> MakeCpuRowsPass(const SegmentShape& shape, const uint16_t* in,
                                          const RowKernels& rk);

// Where EncodeRowsWith's payload keeps its rows.
struct RowsSpan {
  uint64_t rows_at = 0, rows_end = 0;
};

// EncodeRows with a pass of the caller's: plans (from the sampled tokens of `in`: SampleTokens;
// and a value's classes from `keys`), runs `pass` until a pass meets the budget, and writes the
// payload into `out`, all but the rows section `*span` (which `pass` holds). Returns its size,
// or 0 when the segment is to be stored raw (the caller writes it: `in` may hold no more than
// the sample); InvalidArgument for non-finite elements.
absl::StatusOr<uint64_t> EncodeRowsWith(const SegmentShape& shape, const CodecParams& params,
                                        const uint16_t* in, const LayerKeys& keys,
                                        const FastKernels& fast, const RowKernels& rk,
                                        RowsPass& pass, uint8_t* out, uint64_t capacity,
                                        RowsSpan* span);

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_ROWS_PLAN_H_
