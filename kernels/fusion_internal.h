// Internal to the fusion math: the pieces the reference (fusion_ref.cc) and the fast CPU path
// (fusion_cpu.cc) share. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_FUSION_INTERNAL_H_
#define KVPOOL_KERNELS_FUSION_INTERNAL_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/half.h"
#include "kernels/fusion.h"

namespace kvpool::kernels::internal {

// The sketch's projections, [kSketchBits][kSketchSamples], row-major.
const std::vector<float>& SketchProjections();
uint64_t SampleCount(uint64_t n);
uint64_t SamplePosition(uint64_t k, uint64_t n, uint64_t count);

Sketch SketchRef(DType dtype, absl::Span<const uint16_t> x);
Sketch SketchCpu(DType dtype, absl::Span<const uint16_t> x);
// The first pass of a fit: <x, r>, <r, r>, <x, x> and max |r[i]|.
struct Sums {
  double xr = 0, rr = 0, xx = 0, rmax = 0;
};
Sums SumsRef(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r);
Sums SumsCpu(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r);
// Sketches of several segments at once (the projection rows are loaded once per group).
void SketchManyCpu(DType dtype, absl::Span<const absl::Span<const uint16_t>> segments,
                   Sketch* out);

// Cosine and scale from the three sums (rel_error stays infinite). False when no error pass is
// due: a sum is not finite or x or r is zero (the fit is then final).
bool FitFromSums(double xr, double rr, double xx, Fit* fit);
// rel_error from the error pass's sum of squares and <x, x>.
double RelError(double err, double xx);
// Cosine, scale and error from the three sums; the error pass runs on the fast path if `fast`.
Fit FinishFit(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r, double xr,
              double rr, double xx, bool fast);
// Sum over i of (to_dtype(scale * r[i]) - x[i])^2.
double ScaledErrorRef(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
                      float scale);
double ScaledErrorCpu(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
                      float scale);
void ScaleRef(DType dtype, absl::Span<uint16_t> x, float scale);
void ScaleCpu(DType dtype, absl::Span<uint16_t> x, float scale);

}  // namespace kvpool::kernels::internal

#endif  // KVPOOL_KERNELS_FUSION_INTERNAL_H_
