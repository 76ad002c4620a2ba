// Reading and writing NumPy .npy files (format versions 1.0-3.0, C order, little-endian) for
// the CLI and tools. Element types: fp16 ('<f2'), bf16 (written as '<V2' raw 2-byte void,
// which numpy loads and ml_dtypes views as bfloat16; 'bfloat16' is accepted on read),
// float32 ('<f4'), int32 ('<i4'), uint32 ('<u4') and int64 ('<i8', read only for token ids).
// Thread-compatible.
#ifndef KVPOOL_COMMON_NPY_H_
#define KVPOOL_COMMON_NPY_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvpool {

enum class NpyType : uint8_t { kFp16, kBf16, kFp32, kInt32, kUint32, kInt64 };

size_t NpyTypeSize(NpyType type);
absl::string_view NpyTypeName(NpyType type);

struct NpyArray {
  NpyType type = NpyType::kFp32;
  std::vector<uint64_t> shape;
  std::string data;  // Raw little-endian elements, C order.

  uint64_t NumElements() const;
};

// Parses a whole .npy file image. InvalidArgument naming the problem for a bad magic, header,
// dtype, Fortran order or a payload whose size does not match the shape.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view file_bytes);
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// Serialises `array` (format 1.0; 3.0 when the header needs it). InvalidArgument when
// data.size() does not match the shape.
absl::StatusOr<std::string> SerializeNpy(const NpyArray& array);
absl::Status WriteNpy(const std::string& path, const NpyArray& array);

// Token ids from an int32/uint32/int64 array of any shape, flattened; InvalidArgument for other
// types and for values outside [0, 2^32).
absl::StatusOr<std::vector<uint32_t>> NpyToTokenIds(const NpyArray& array);

// Reads/writes a whole file. NotFound / PermissionDenied / Internal from errno.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
absl::Status WriteStringToFile(const std::string& path, absl::string_view contents);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_NPY_H_
