// Checksums and digests of stored bytes: XXH3-64 and XXH3-128 (fast, non-cryptographic; catches corruption, not
// attacks). Thread-safe (stateless).
#ifndef KVPOOL_COMMON_CHECKSUM_H_
#define KVPOOL_COMMON_CHECKSUM_H_

#include <array>
#include <cstddef>
#include <cstdint>

namespace kvpool {

uint64_t Checksum64(const void* data, size_t size);

// XXH3-128 as {low, high}: the content digest that names stored segments (equal digests are
// confirmed by comparing bytes, so a collision never shares wrong content).
std::array<uint64_t, 2> Digest128(const void* data, size_t size);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_CHECKSUM_H_
