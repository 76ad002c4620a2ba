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

// A path's kernels for one dtype: FastKernels' less the dtype (means: false when a mean is not
// finite, the reference's then) and its packs decoder from decoded means and per-token steps.
struct FastDtypeKernels {
  bool (*stats)(const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride, float* sums,
                float* sq);
  bool (*means)(const float* sums, uint32_t n, uint64_t HD, uint16_t* stored, float* m);
  void (*distances)(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D, const float* m,
                    float* dist);
  uint64_t (*quantize)(const uint16_t* in, uint32_t T, uint32_t H, uint32_t D, const float* m,
                       const float* steps, uint32_t stride, uint8_t* out, double* err,
                       double* energy);
  void (*decode_packs)(const SegmentShape& shape, const Parsed& parsed, const float* means,
                       const float* token_steps, uint16_t* out);
};

// kByDtype[0] for fp16, [1] for bf16. Stats and means need H * D a multiple of kColumns;
// distances, quantisation and decoding head_dim a multiple of 16.
template <uint64_t kColumns, const FastDtypeKernels* kByDtype>
struct FastEntries {
  static const FastDtypeKernels& Of(DType dtype) { return kByDtype[dtype == DType::kBf16]; }

  static bool Stats(DType dtype, const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride,
                    float* sums, float* sq) {
    if (HD % kColumns != 0) return FastRefKernels().stats(dtype, in, T, HD, stride, sums, sq);
    return Of(dtype).stats(in, T, HD, stride, sums, sq);
  }

  static void Means(DType dtype, const float* sums, uint32_t n, uint64_t HD, uint16_t* stored,
                    float* m) {
    const bool done = HD % kColumns == 0 && Of(dtype).means(sums, n, HD, stored, m);
    if (!done) FastRefKernels().means(dtype, sums, n, HD, stored, m);
  }

  static void Distances(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                        const float* m, float* dist) {
    if (D % 16 != 0) return FastRefKernels().distances(dtype, in, T, H, D, m, dist);
    Of(dtype).distances(in, T, H, D, m, dist);
  }

  static uint64_t Quantize(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                           const float* m, const float* steps, uint32_t stride, uint8_t* out,
                           double* err, double* energy) {
    if (D % 16 != 0) {
      return FastRefKernels().quantize(dtype, in, T, H, D, m, steps, stride, out, err, energy);
    }
    return Of(dtype).quantize(in, T, H, D, m, steps, stride, out, err, energy);
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
    Of(shape.dtype).decode_packs(shape, parsed, means.data(), steps.data(), out);
    return true;
  }
};

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_FAST_ENTRY_H_
