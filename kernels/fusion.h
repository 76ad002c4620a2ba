// Fusion math (joint encoding of segments): the sketch that proposes candidate representatives,
// the exact check that decides, the scale a fused member is read back with, and the batch
// grouping. The decisions themselves (which segment joins which group, what is stored) live in
// server/store/fuser.h; this unit only computes.
//
// A fused member is read back as to_dtype(scale * r[i]) for every element r[i] of its
// representative's decoded values (float multiply, round to nearest even): FitScaled measures
// the error of exactly those values, so a member is accepted only on what readers will get.
//
// Paths: kRef (plain loops, double sums: the definition) and kCpu (AVX2/F16C when present,
// double sums in another order: results agree with the reference to rounding). kCuda is not
// built yet: the host paths serve.
//
// Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_FUSION_H_
#define KVPOOL_KERNELS_FUSION_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/kv_spec.h"
#include "kernels/codec.h"

namespace kvpool::kernels {

inline constexpr uint32_t kSketchBits = 128;
inline constexpr uint32_t kSketchSamples = 1024;  // Elements a sketch looks at, evenly spaced.

// Sign bits of kSketchBits fixed Gaussian projections (seeded once, the same in every process)
// of a segment's sample. Two segments at angle theta differ in about theta / pi of the bits.
struct Sketch {
  uint64_t bits[2] = {0, 0};
  bool operator==(const Sketch& o) const { return bits[0] == o.bits[0] && bits[1] == o.bits[1]; }
};
int HammingDistance(const Sketch& a, const Sketch& b);

// The largest Hamming distance at which two segments may still have cosine >= `threshold`
// (the expected distance at that cosine plus four standard deviations, at most kSketchBits).
int SketchRadius(double threshold);

// The sample a sketch is computed from: min(n, kSketchSamples) elements, element
// floor(k * n / count) for k < count, as float. Segments of one shape sample the same positions,
// so their samples' cosine estimates the segments' cosine.
std::vector<float> SampleSegment(DType dtype, absl::Span<const uint16_t> x);

Sketch SketchSegment(DType dtype, absl::Span<const uint16_t> x, Path path);

struct Fit {
  double cosine = 0;          // <x, r> / (|x| |r|); 0 when either is zero.
  float scale = 0;            // Least squares: <x, r> / <r, r>, rounded to float.
  double rel_error = INFINITY;  // |to_dtype(scale * r) - x| / |x|; infinity when x or r is 0
                                // or a value is not finite (such segments never fuse).
};

// The exact check of x against a representative's decoded values r (same size and dtype).
Fit FitScaled(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r, Path path);

// x[i] = to_dtype(scale * x[i]): how a reader turns a representative into a member.
void ScaleElements(DType dtype, absl::Span<uint16_t> x, float scale, Path path);

// Batch grouping (the seed paper's recursive merge): every sample starts as its own group with
// centroid = its unit vector; repeatedly the two groups whose centroids have the highest
// cosine, if at least `threshold`, merge (centroid: normalised sum of the members' unit
// vectors). Returns the groups (indices ascending, groups ordered by first index). O(n^2) memory
// and O(n^2 * merges) time in the number of samples: for one put's blocks.
std::vector<std::vector<uint32_t>> GroupByCosine(absl::Span<const std::vector<float>> samples,
                                                 double threshold);

// The representative of a group: the normalised mean of the members' unit vectors, stored at
// the members' mean norm (so fp16 keeps its precision), rounded to dtype. REQUIRES: every
// member and `out` have the same size; at least one member is non-zero and finite.
void Representative(DType dtype, absl::Span<const absl::Span<const uint16_t>> members,
                    absl::Span<uint16_t> out);

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_FUSION_H_
