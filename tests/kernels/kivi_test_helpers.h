// Helpers shared by the kivi codec's tests (kivi_test.cc, kivi_cuda_kernels_test.cc).
#ifndef KVPOOL_TESTS_KERNELS_KIVI_TEST_HELPERS_H_
#define KVPOOL_TESTS_KERNELS_KIVI_TEST_HELPERS_H_

#include <cstdint>

#include "common/encoded_segment.h"

namespace kvpool::kernels::kivi_test {

// kivi's parameters: bits per code and the group size.
inline CodecParams Kivi(uint8_t bits, uint16_t group) {
  CodecParams p;
  p.codec = CodecId::kKivi;
  p.bits = bits;
  p.group = group;
  return p;
}

// A test shape: tokens x kv_heads x head_dim with a group size.
struct ShapeCase {
  uint32_t tokens, heads, dim;
  uint16_t group;
};

}  // namespace kvpool::kernels::kivi_test

#endif  // KVPOOL_TESTS_KERNELS_KIVI_TEST_HELPERS_H_
