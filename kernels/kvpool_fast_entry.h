// The entry points of a fast path for kvpool's fast profile (kvpool_avx512.cc,
// kvpool_fast_avx2.cc): FastKernels and the packs decoder from the path's kernels per dtype, each
// taken where the shape fits and the reference's elsewhere, so that every path decides alike. Not a
// public API. Thread-safe (stateless, or thread-local scratch).
#ifndef KVPOOL_KERNELS_KVPOOL_FAST_ENTRY_H_
#define KVPOOL_KERNELS_KVPOOL_FAST_ENTRY_H_

#include <cstring>
#include <vector>

#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {

// K: kColumns (stats and means need H * D a multiple of it; distances, quantise and decode need
// head_dim a multiple of 16) and static templates over kBf16 taking FastKernels' parameters less
// the dtype: Stats, Means (false when a mean is not finite: the reference's then), Distances,
// Quantize; and DecodePacks(shape, parsed, means, token_steps, out).
template <class K>
struct FastEntries {
  static bool Stats(DType dtype, const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride,
                    float* sums, float* sq) {
    if (HD % K::kColumns != 0) return FastRefKernels().stats(dtype, in, T, HD, stride, sums, sq);
    return dtype == DType::kBf16 ? K::template Stats<true>(in, T, HD, stride, sums, sq)
                                 : K::template Stats<false>(in, T, HD, stride, sums, sq);
  }

  static void Means(DType dtype, const float* sums, uint32_t n, uint64_t HD, uint16_t* stored,
                    float* m) {
    const bool done = HD % K::kColumns == 0 &&
                      (dtype == DType::kBf16 ? K::template Means<true>(sums, n, HD, stored, m)
                                             : K::template Means<false>(sums, n, HD, stored, m));
    if (!done) FastRefKernels().means(dtype, sums, n, HD, stored, m);
  }

  static void Distances(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                        const float* m, float* dist) {
    if (D % 16 != 0) return FastRefKernels().distances(dtype, in, T, H, D, m, dist);
    return dtype == DType::kBf16 ? K::template Distances<true>(in, T, H, D, m, dist)
                                 : K::template Distances<false>(in, T, H, D, m, dist);
  }

  static uint64_t Quantize(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                           const float* m, const float* steps, uint32_t stride, uint8_t* out,
                           double* err, double* energy) {
    if (D % 16 != 0) {
      return FastRefKernels().quantize(dtype, in, T, H, D, m, steps, stride, out, err, energy);
    }
    return dtype == DType::kBf16
               ? K::template Quantize<true>(in, T, H, D, m, steps, stride, out, err, energy)
               : K::template Quantize<false>(in, T, H, D, m, steps, stride, out, err, energy);
  }

  static const FastKernels& Kernels() {
    static const FastKernels k = {&Stats, &Means, &Distances, &Quantize};
    return k;
  }

  // A mode 1 payload without low-rank parts (the fast profile's); false, nothing written, for
  // others, for head_dim not a multiple of 16 and when a mean is not finite (NaN must take the
  // reference's conversion).
  static bool DecodePacks(const SegmentShape& shape, const Parsed& parsed, uint16_t* out) {
    if (parsed.mode != kModeCoded || parsed.coef_cols != 0 || shape.head_dim % 16 != 0 ||
        shape.tokens == 0) {
      return false;
    }
    const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
    const uint16_t exp = shape.dtype == DType::kBf16 ? 0x7f80 : 0x7c00;  // All set: not finite.
    thread_local std::vector<float> means, steps;
    means.resize(HD);
    for (uint64_t c = 0; c < HD; ++c) {
      uint16_t m;
      std::memcpy(&m, parsed.means + 2 * c, 2);
      if ((m & exp) == exp) return false;
      means[c] = ToFloat(shape.dtype, m);
    }
    TokenSteps(shape, parsed, &steps);
    if (shape.dtype == DType::kBf16) {
      K::template DecodePacks<true>(shape, parsed, means.data(), steps.data(), out);
    } else {
      K::template DecodePacks<false>(shape, parsed, means.data(), steps.data(), out);
    }
    return true;
  }
};

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_FAST_ENTRY_H_
