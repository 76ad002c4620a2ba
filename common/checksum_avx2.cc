// XXH3 from xxhash.h compiled into this file for AVX2 (CMake gives this file alone -mavx2).
// Everything xxhash.h defines here is static (XXH_INLINE_ALL) and the file uses no C++
// templates or inline functions, so no AVX2 code can leak into a symbol that other files share
// and a CPU without AVX2 would run.
#include "common/checksum_avx2.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvpool::internal {

uint64_t Xxh3Avx2(const void* data, size_t size) { return XXH3_64bits(data, size); }

void Xxh3_128Avx2(const void* data, size_t size, uint64_t* low, uint64_t* high) {
  const XXH128_hash_t h = XXH3_128bits(data, size);
  *low = h.low64;
  *high = h.high64;
}

}  // namespace kvpool::internal
