#include "common/checksum.h"

#include <xxhash.h>

namespace kvpool {

uint64_t Checksum64(const void* data, size_t size) { return XXH3_64bits(data, size); }

std::array<uint64_t, 2> Digest128(const void* data, size_t size) {
  const XXH128_hash_t h = XXH3_128bits(data, size);
  return {h.low64, h.high64};
}

}  // namespace kvpool
