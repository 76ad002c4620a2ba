// Checksums and digests of stored bytes: XXH3-64 and XXH3-128 (fast, non-cryptographic; catches
// corruption, not attacks). Debian's libxxhash is built for SSE2 (16-18 GB/s on the development
// VM); where the CPU has AVX2 the same functions run from an AVX2 build (checksum_avx2.cc,
// about 3x faster in cache, 2x from memory). XXH3's values do not depend on the vector width,
// so both give the same results. Thread-safe (stateless).
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

namespace internal {

// Whether Checksum64 and Digest128 run the AVX2 build (the CPU has AVX2 and the build is for
// x86-64).
bool ChecksumUsesAvx2();

}  // namespace internal
}  // namespace kvpool

#endif  // KVPOOL_COMMON_CHECKSUM_H_
