// Internal to checksum.cc: XXH3 compiled for AVX2 (checksum_avx2.cc, built with -mavx2 on
// x86-64 only). Call only where the CPU has AVX2. Thread-safe (stateless).
#ifndef KVPOOL_COMMON_CHECKSUM_AVX2_H_
#define KVPOOL_COMMON_CHECKSUM_AVX2_H_

#include <cstddef>
#include <cstdint>

namespace kvpool::internal {

uint64_t Xxh3Avx2(const void* data, size_t size);
void Xxh3_128Avx2(const void* data, size_t size, uint64_t* low, uint64_t* high);

}  // namespace kvpool::internal

#endif  // KVPOOL_COMMON_CHECKSUM_AVX2_H_
