// Checksums of stored bytes: XXH3-64 (fast, non-cryptographic; catches corruption, not
// attacks). Thread-safe (stateless).
#ifndef KVPOOL_COMMON_CHECKSUM_H_
#define KVPOOL_COMMON_CHECKSUM_H_

#include <cstddef>
#include <cstdint>

namespace kvpool {

uint64_t Checksum64(const void* data, size_t size);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_CHECKSUM_H_
