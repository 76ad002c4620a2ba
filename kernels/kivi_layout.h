// Internal to the kivi codec: the payload layout (documented in kivi_ref.cc) and the parameter
// check, shared by the reference, the AVX2 path and the CUDA launchers so that all three agree.
// Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KIVI_LAYOUT_H_
#define KVPOOL_KERNELS_KIVI_LAYOUT_H_

#include <cstdint>

#include "common/encoded_segment.h"

namespace kvpool::kernels::kivi::internal {

struct Layout {
  uint64_t groups = 0;        // n: keys ceil(T/G)*H*D, values T*H*ceil(D/G).
  uint64_t codes_offset = 0;  // P: 4n rounded up to 16.
  uint64_t size = 0;          // P + ceil(E*b/8).
};

inline uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

inline bool ValidParams(const CodecParams& p) {
  return (p.bits == 2 || p.bits == 4 || p.bits == 8) && p.group > 0;
}

// REQUIRES: ValidParams(p).
inline Layout ComputeLayout(const SegmentShape& shape, const CodecParams& p) {
  Layout l;
  const uint64_t heads_dims = uint64_t{shape.kv_heads} * shape.head_dim;
  l.groups = shape.kind == SegmentKind::kKey
                 ? CeilDiv(shape.tokens, p.group) * heads_dims
                 : uint64_t{shape.tokens} * shape.kv_heads * CeilDiv(shape.head_dim, p.group);
  l.codes_offset = CeilDiv(4 * l.groups, 16) * 16;
  l.size = l.codes_offset + CeilDiv(shape.Elements() * p.bits, 8);
  return l;
}

}  // namespace kvpool::kernels::kivi::internal

#endif  // KVPOOL_KERNELS_KIVI_LAYOUT_H_
