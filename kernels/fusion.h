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
// double sums in another order: results agree with the reference to rounding). The CUDA path
// (fusion.cu) works on many segments per call: SketchSegmentsOnDevice and FitEncodedOnDevice
// below.
//
// Thread-safe (stateless; the CUDA path keeps one read-only copy of the projections per
// process, on the device current at its first call).
#ifndef KVPOOL_KERNELS_FUSION_H_
#define KVPOOL_KERNELS_FUSION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
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

// FitScaled for a decision against `budget`, cheaper: the same cosine and scale, and a
// rel_error on the same side of `budget` as FitScaled's (<= budget exactly when FitScaled's
// is). When the error of the unrounded scale * r, plus a bound on what rounding to the element
// type can add or take away, already decides, rel_error is that upper (accept) or lower
// (reject) bound and the read-back pass is skipped; else it is FitScaled's exact value.
Fit FitWithin(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
              double budget, Path path);

// SketchSegment of each segment (same bits as one call per segment on the same path), with
// the projection rows loaded once for several segments: what the fuser uses per block.
std::vector<Sketch> SketchSegments(DType dtype,
                                   absl::Span<const absl::Span<const uint16_t>> segments,
                                   Path path);

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

// --- The CUDA path (fusion.cu). Host memory in and out, staged through one device allocation
// per call; all work runs on `stream` (nullptr: a stream of the call's own) and the call
// synchronises that stream before returning (blocks: run it on an executor). Unavailable
// without CUDA or a device.

// The sketches of many segments in one launch, each bit for bit SketchSegment(kRef)'s (the
// products of float projections and float samples are exact in double and summed in the same
// order). InvalidArgument when a segment is too large to sample (2^53 elements or more).
absl::StatusOr<std::vector<Sketch>> SketchSegmentsOnDevice(
    DType dtype, absl::Span<const absl::Span<const uint16_t>> segments,
    cudaStream_t stream = nullptr);

// One exact check for the device: host elements `x` against a stored representative, given as
// its whole encoded segment, decoded on the device. x must outlive the call.
struct FitRequest {
  absl::Span<const uint16_t> x;
  absl::string_view representative;  // Whole encoded segment (common/encoded_segment.h).
  SegmentShape shape;                // What x is and the representative must be.
};

// FitScaled for every request, on the GPU: the same definition, sums in another order, so the
// results equal the reference's to rounding. x spans and representatives that repeat (same
// pointer and size) are copied and decoded once. Errors: InvalidArgument when x's size is not
// shape's or the requests mix dtypes; DataLoss when a representative does not parse, fails its
// checksum or has another shape; Unimplemented when its codec has no CUDA decoder.
absl::StatusOr<std::vector<Fit>> FitEncodedOnDevice(absl::Span<const FitRequest> requests,
                                                    cudaStream_t stream = nullptr);

// Checks the CUDA fusion kernels (and first the codecs': SelfCheckCudaCodecs) against the host
// paths once, on a fixed case: the sketch must be the reference's bit for bit, the fit equal
// to rounding. The first call runs it (blocks: milliseconds), later calls return its result.
// OK when they agree; Unavailable without CUDA or a device; Internal otherwise.
absl::Status SelfCheckCudaFusion();

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_FUSION_H_
