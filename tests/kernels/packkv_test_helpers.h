// Helpers shared by the packkv codec's tests (packkv_test.cc, packkv_cuda_kernels_test.cc).
#ifndef KVPOOL_TESTS_KERNELS_PACKKV_TEST_HELPERS_H_
#define KVPOOL_TESTS_KERNELS_PACKKV_TEST_HELPERS_H_

#include <cstdint>

#include "common/encoded_segment.h"

namespace kvpool::kernels::packkv_test {

// packkv's parameters: the error budget, token re-ordering (flag bit 0), the largest bit width
// and the pack size in tokens.
inline CodecParams Params(float budget, bool reorder = false, uint8_t bits = 8,
                          uint16_t group = 16) {
  CodecParams p;
  p.codec = CodecId::kPackKv;
  p.budget = budget;
  p.flags = reorder ? 1 : 0;
  p.bits = bits;
  p.group = group;
  return p;
}

}  // namespace kvpool::kernels::packkv_test

#endif  // KVPOOL_TESTS_KERNELS_PACKKV_TEST_HELPERS_H_
