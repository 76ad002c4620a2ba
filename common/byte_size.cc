#include "common/byte_size.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvpool {

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t i = 0;
  while (i < t.size() && (absl::ascii_isdigit(t[i]) || t[i] == '.')) ++i;
  absl::string_view number = t.substr(0, i);
  std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(t.substr(i)));
  double value;
  if (number.empty() || !absl::SimpleAtod(number, &value) || value < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad byte size '", text, "'"));
  }
  double mult;
  if (unit.empty() || unit == "b") {
    mult = 1;
  } else if (unit == "k" || unit == "kb") {
    mult = 1e3;
  } else if (unit == "kib") {
    mult = 1024.0;
  } else if (unit == "m" || unit == "mb") {
    mult = 1e6;
  } else if (unit == "mib") {
    mult = 1024.0 * 1024;
  } else if (unit == "g" || unit == "gb") {
    mult = 1e9;
  } else if (unit == "gib") {
    mult = 1024.0 * 1024 * 1024;
  } else if (unit == "t" || unit == "tb") {
    mult = 1e12;
  } else if (unit == "tib") {
    mult = 1024.0 * 1024 * 1024 * 1024;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("bad byte size unit '", unit, "' in '", text, "' (use B, KiB, MiB, GiB, ...)"));
  }
  uint64_t integer;
  if (number.find('.') == absl::string_view::npos && absl::SimpleAtoi(number, &integer)) {
    // Exact integer arithmetic; every multiplier is an integer.
    const uint64_t m = static_cast<uint64_t>(mult);
    if (integer != 0 && m > UINT64_MAX / integer) {
      return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' overflows"));
    }
    return integer * m;
  }
  const double bytes = std::round(value * mult);
  if (bytes >= 1.8e19) return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' overflows"));
  return static_cast<uint64_t>(bytes);
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return absl::StrFormat("%.2f %s", v, kUnits[u]);
}

}  // namespace kvpool
