// A SegmentShape in one expression, for the codec tests.
#ifndef KVPOOL_TESTS_UTIL_SEGMENT_SHAPE_H_
#define KVPOOL_TESTS_UTIL_SEGMENT_SHAPE_H_

#include <cstdint>

#include "common/encoded_segment.h"

namespace kvpool::test_util {

inline SegmentShape Shape(uint32_t tokens, uint32_t heads, uint32_t dim, DType dtype = DType::kFp16,
                          SegmentKind kind = SegmentKind::kKey) {
  SegmentShape s;
  s.tokens = tokens;
  s.kv_heads = heads;
  s.head_dim = dim;
  s.dtype = dtype;
  s.kind = kind;
  return s;
}

}  // namespace kvpool::test_util

#endif  // KVPOOL_TESTS_UTIL_SEGMENT_SHAPE_H_
