#include "common/npy.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_util.h"

namespace kvpool {
namespace {

constexpr absl::string_view kMagic = "\x93NUMPY";

struct TypeInfo {
  NpyType type;
  absl::string_view descr;
};
constexpr TypeInfo kTypes[] = {
    {NpyType::kFp16, "<f2"},   {NpyType::kBf16, "<V2"},   {NpyType::kFp32, "<f4"},
    {NpyType::kInt32, "<i4"},  {NpyType::kUint32, "<u4"}, {NpyType::kInt64, "<i8"},
};

absl::StatusOr<NpyType> TypeFromDescr(absl::string_view descr) {
  if (descr == "bfloat16" || descr == "|V2") return NpyType::kBf16;
  if (descr == "|u1" || descr == "|i1") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy dtype '", descr, "'"));
  }
  for (const TypeInfo& t : kTypes) {
    if (t.descr == descr) return t.type;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported .npy dtype '", descr, "' (supported: <f2, <V2/bfloat16, <f4, <i4, <u4, <i8)"));
}

// Finds the value of 'key' in a Python dict literal header; returns the raw text of the value.
absl::StatusOr<absl::string_view> HeaderValue(absl::string_view header, absl::string_view key) {
  std::string quoted = absl::StrCat("'", key, "'");
  size_t pos = header.find(quoted);
  if (pos == absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(".npy header has no '", key, "'"));
  }
  pos = header.find(':', pos + quoted.size());
  if (pos == absl::string_view::npos) return absl::InvalidArgumentError("malformed .npy header");
  absl::string_view rest = absl::StripLeadingAsciiWhitespace(header.substr(pos + 1));
  if (rest.empty()) return absl::InvalidArgumentError("malformed .npy header");
  size_t end;
  if (rest[0] == '\'') {
    end = rest.find('\'', 1);
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("malformed .npy header");
    return rest.substr(1, end - 1);
  }
  if (rest[0] == '(') {
    end = rest.find(')');
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("malformed .npy header");
    return rest.substr(1, end - 1);
  }
  end = rest.find_first_of(",}");
  return absl::StripTrailingAsciiWhitespace(rest.substr(0, end));
}

}  // namespace

size_t NpyTypeSize(NpyType type) {
  switch (type) {
    case NpyType::kFp16:
    case NpyType::kBf16:
      return 2;
    case NpyType::kFp32:
    case NpyType::kInt32:
    case NpyType::kUint32:
      return 4;
    case NpyType::kInt64:
      return 8;
  }
  return 0;
}

absl::string_view NpyTypeName(NpyType type) {
  for (const TypeInfo& t : kTypes) {
    if (t.type == type) return t.descr;
  }
  return "?";
}

uint64_t NpyArray::NumElements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view file) {
  if (file.size() < 10 || file.substr(0, kMagic.size()) != kMagic) {
    return absl::InvalidArgumentError("not a .npy file (bad magic)");
  }
  const uint8_t major = static_cast<uint8_t>(file[6]);
  size_t header_len;
  size_t header_start;
  if (major == 1) {
    header_len = static_cast<uint8_t>(file[8]) | (static_cast<uint8_t>(file[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (file.size() < 12) return absl::InvalidArgumentError("truncated .npy header");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(file[8 + i]);
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy version ", major));
  }
  if (header_start + header_len > file.size()) {
    return absl::InvalidArgumentError("truncated .npy header");
  }
  absl::string_view header = file.substr(header_start, header_len);
  NpyArray array;
  auto descr = HeaderValue(header, "descr");
  if (!descr.ok()) return descr.status();
  auto type = TypeFromDescr(*descr);
  if (!type.ok()) return type.status();
  array.type = *type;
  auto fortran = HeaderValue(header, "fortran_order");
  if (!fortran.ok()) return fortran.status();
  if (*fortran != "False") return absl::InvalidArgumentError(".npy in Fortran order is not supported");
  auto shape = HeaderValue(header, "shape");
  if (!shape.ok()) return shape.status();
  for (absl::string_view dim : absl::StrSplit(*shape, ',', absl::SkipWhitespace())) {
    uint64_t d;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(dim), &d)) {
      return absl::InvalidArgumentError(absl::StrCat("bad .npy shape '(", *shape, ")'"));
    }
    array.shape.push_back(d);
  }
  // Count elements and bytes without wrapping: anything past 2^62 bytes cannot be a real file.
  uint64_t elements = 1;
  for (uint64_t d : array.shape) {
    if (d != 0 && elements > (uint64_t{1} << 62) / d) {
      return absl::InvalidArgumentError(absl::StrCat("bad .npy shape '(", *shape, ")': too large"));
    }
    elements *= d;
  }
  if (elements > (uint64_t{1} << 62) / NpyTypeSize(array.type)) {
    return absl::InvalidArgumentError(absl::StrCat("bad .npy shape '(", *shape, ")': too large"));
  }
  const uint64_t expected = elements * NpyTypeSize(array.type);
  absl::string_view payload = file.substr(header_start + header_len);
  if (payload.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(".npy payload is ", payload.size(),
                                                   " bytes, shape and dtype need ", expected));
  }
  array.data.assign(payload.data(), payload.size());
  return array;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  auto bytes = ReadFileToString(path);
  if (!bytes.ok()) return bytes.status();
  auto array = ParseNpy(*bytes);
  if (!array.ok()) return Annotate(array.status(), path);
  return array;
}

absl::StatusOr<std::string> SerializeNpy(const NpyArray& array) {
  if (array.data.size() != array.NumElements() * NpyTypeSize(array.type)) {
    return absl::InvalidArgumentError("NpyArray data size does not match its shape");
  }
  std::string shape = absl::StrJoin(array.shape, ", ");
  if (array.shape.size() == 1) shape += ",";
  std::string header = absl::StrCat("{'descr': '", NpyTypeName(array.type),
                                    "', 'fortran_order': False, 'shape': (", shape, "), }");
  // Pad with spaces so that magic + length + header + '\n' is a multiple of 64.
  size_t prefix = 10;
  size_t total = prefix + header.size() + 1;
  bool v3 = false;
  if (total + (64 - total % 64) % 64 - prefix > 65535) {
    v3 = true;
    prefix = 12;
    total = prefix + header.size() + 1;
  }
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out(kMagic.data(), kMagic.size());
  out.push_back(static_cast<char>(v3 ? 3 : 1));
  out.push_back(0);
  const size_t len = header.size();
  out.push_back(static_cast<char>(len & 0xff));
  out.push_back(static_cast<char>((len >> 8) & 0xff));
  if (v3) {
    out.push_back(static_cast<char>((len >> 16) & 0xff));
    out.push_back(static_cast<char>((len >> 24) & 0xff));
  }
  out += header;
  out += array.data;
  return out;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array) {
  auto bytes = SerializeNpy(array);
  if (!bytes.ok()) return bytes.status();
  return WriteStringToFile(path, *bytes);
}

absl::StatusOr<std::vector<uint32_t>> NpyToTokenIds(const NpyArray& array) {
  if (array.type != NpyType::kInt32 && array.type != NpyType::kUint32 &&
      array.type != NpyType::kInt64) {
    return absl::InvalidArgumentError(absl::StrCat("token ids must be int32, uint32 or int64, got ",
                                                   NpyTypeName(array.type)));
  }
  const uint64_t n = array.NumElements();
  if (array.data.size() != n * NpyTypeSize(array.type)) {
    return absl::InvalidArgumentError("token id array data does not match its shape");
  }
  std::vector<uint32_t> ids(n);
  const char* p = array.data.data();
  for (uint64_t i = 0; i < n; ++i) {
    int64_t v;
    switch (array.type) {
      case NpyType::kInt32: {
        int32_t x;
        std::memcpy(&x, p + 4 * i, 4);
        v = x;
        break;
      }
      case NpyType::kUint32: {
        uint32_t x;
        std::memcpy(&x, p + 4 * i, 4);
        v = x;
        break;
      }
      case NpyType::kInt64:
        std::memcpy(&v, p + 8 * i, 8);
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "token ids must be int32, uint32 or int64, got ", NpyTypeName(array.type)));
    }
    if (v < 0 || v > 0xffffffffLL) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", v, " at index ", i,
                                                     " is outside [0, 2^32)"));
    }
    ids[i] = static_cast<uint32_t>(v);
  }
  return ids;
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return FromErrno(errno, absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return FromErrno(errno, absl::StrCat("cannot read ", path));
  return std::move(ss).str();
}

absl::Status WriteStringToFile(const std::string& path, absl::string_view contents) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return FromErrno(errno, absl::StrCat("cannot create ", path));
  const size_t written = std::fwrite(contents.data(), 1, contents.size(), f);
  const int err = errno;
  if (std::fclose(f) != 0 || written != contents.size()) {
    return FromErrno(err ? err : EIO, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace kvpool
