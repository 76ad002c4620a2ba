// Human byte sizes: parsing "4GiB", "512MiB", "1.5GB", "65536" and printing "2.00 MiB".
// Thread-safe (stateless).
#ifndef KVPOOL_COMMON_BYTE_SIZE_H_
#define KVPOOL_COMMON_BYTE_SIZE_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace kvpool {

// Accepts a number (integer or decimal) and an optional unit: B, K/KB (1000), KiB (1024),
// M/MB, MiB, G/GB, GiB, T/TB, TiB; case-insensitive; spaces between are allowed.
// InvalidArgument naming the text on anything else or on overflow.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);

// "512 B", "1.50 KiB", "2.00 MiB", "3.25 GiB".
std::string FormatBytes(uint64_t bytes);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_BYTE_SIZE_H_
