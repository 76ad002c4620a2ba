#include "common/checksum.h"

#include <xxhash.h>

#include "common/checksum_avx2.h"

namespace kvpool {

namespace internal {

bool ChecksumUsesAvx2() {
#if KVPOOL_CHECKSUM_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
#else
  return false;
#endif
}

}  // namespace internal

uint64_t Checksum64(const void* data, size_t size) {
#if KVPOOL_CHECKSUM_AVX2
  if (internal::ChecksumUsesAvx2()) return internal::Xxh3Avx2(data, size);
#endif
  return XXH3_64bits(data, size);
}

std::array<uint64_t, 2> Digest128(const void* data, size_t size) {
#if KVPOOL_CHECKSUM_AVX2
  if (internal::ChecksumUsesAvx2()) {
    std::array<uint64_t, 2> d;
    internal::Xxh3_128Avx2(data, size, &d[0], &d[1]);
    return d;
  }
#endif
  const XXH128_hash_t h = XXH3_128bits(data, size);
  return {h.low64, h.high64};
}

}  // namespace kvpool
