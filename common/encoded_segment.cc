#include "common/encoded_segment.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"

namespace kvpool {
namespace {

template <typename T>
void Put(std::string* out, size_t offset, T value) {
  std::memcpy(out->data() + offset, &value, sizeof(T));
}

template <typename T>
T Get(absl::string_view bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

constexpr size_t kChecksumOffset = 48;

uint64_t SegmentChecksum(absl::string_view header, absl::string_view payload) {
  std::string h(header.substr(0, kSegmentHeaderBytes));
  std::memset(h.data() + kChecksumOffset, 0, 8);
  // Chain the two parts: checksum(header) seeds nothing in XXH3's simple API, so hash the
  // header's digest together with the payload's.
  const uint64_t parts[2] = {Checksum64(h.data(), h.size()),
                             Checksum64(payload.data(), payload.size())};
  return Checksum64(parts, sizeof(parts));
}

}  // namespace

absl::StatusOr<uint8_t> KvpoolProfileFlags(absl::string_view name) {
  if (name.empty() || name == "default") return uint8_t{0};
  if (name == "fast") return kKvpoolFastProfile;
  if (name == "entropy") return kKvpoolEntropyProfile;
  return absl::InvalidArgumentError(
      absl::StrCat("kvpool profile must be 'default', 'fast' or 'entropy', got '", name, "'"));
}

absl::string_view KvpoolProfileSuffix(const CodecParams& p) {
  if (p.codec != CodecId::kKvpool) return "";
  if (p.flags & kKvpoolFastProfile) return "-fast";
  if (p.flags & kKvpoolEntropyProfile) return "-entropy";
  return "";
}

absl::StatusOr<CodecId> ParseCodecName(absl::string_view name) {
  if (name == "raw") return CodecId::kRaw;
  if (name == "kivi") return CodecId::kKivi;
  if (name == "packkv") return CodecId::kPackKv;
  if (name == "kvpool") return CodecId::kKvpool;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown codec '", name, "' (raw, kivi, packkv, kvpool)"));
}

absl::string_view CodecName(CodecId codec) {
  switch (codec) {
    case CodecId::kRaw:
      return "raw";
    case CodecId::kKivi:
      return "kivi";
    case CodecId::kPackKv:
      return "packkv";
    case CodecId::kKvpool:
      return "kvpool";
  }
  return "unknown";
}

std::string SerializeSegment(const SegmentHeader& header, absl::string_view payload) {
  std::string out(kSegmentHeaderBytes, '\0');
  out.append(payload.data(), payload.size());
  FinishSegmentInPlace(header, &out);
  return out;
}

void FinishSegmentInPlace(const SegmentHeader& header, std::string* segment) {
  std::string& out = *segment;
  const absl::string_view payload = absl::string_view(out).substr(kSegmentHeaderBytes);
  std::memset(out.data(), 0, kSegmentHeaderBytes);
  Put<uint32_t>(&out, 0, kSegmentMagic);
  Put<uint8_t>(&out, 4, kSegmentVersion);
  Put<uint8_t>(&out, 5, static_cast<uint8_t>(header.params.codec));
  Put<uint8_t>(&out, 6, static_cast<uint8_t>(header.shape.dtype));
  Put<uint8_t>(&out, 7, static_cast<uint8_t>(header.shape.kind));
  Put<uint32_t>(&out, 8, header.shape.tokens);
  Put<uint32_t>(&out, 12, header.shape.kv_heads);
  Put<uint32_t>(&out, 16, header.shape.head_dim);
  Put<uint8_t>(&out, 24, header.params.bits);
  Put<uint8_t>(&out, 25, header.params.flags);
  Put<uint16_t>(&out, 26, header.params.group);
  Put<float>(&out, 28, header.params.budget);
  Put<uint64_t>(&out, 32, header.params.extra);
  Put<uint64_t>(&out, 40, payload.size());
  Put<uint64_t>(&out, kChecksumOffset, SegmentChecksum(out, payload));
}

namespace {

absl::StatusOr<SegmentHeader> Parse(absl::string_view bytes, absl::string_view* payload,
                                    bool verify_checksum) {
  if (bytes.size() < kSegmentHeaderBytes) {
    return absl::DataLossError(
        absl::StrCat("encoded segment is ", bytes.size(), " bytes, shorter than its header"));
  }
  if (Get<uint32_t>(bytes, 0) != kSegmentMagic) {
    return absl::DataLossError("encoded segment has a bad magic");
  }
  SegmentHeader h;
  h.payload_bytes = Get<uint64_t>(bytes, 40);
  if (h.payload_bytes != bytes.size() - kSegmentHeaderBytes) {
    return absl::DataLossError(absl::StrCat("encoded segment says ", h.payload_bytes,
                                            " payload bytes but has ",
                                            bytes.size() - kSegmentHeaderBytes));
  }
  const absl::string_view body = bytes.substr(kSegmentHeaderBytes);
  h.checksum = Get<uint64_t>(bytes, kChecksumOffset);
  if (verify_checksum && SegmentChecksum(bytes, body) != h.checksum) {
    return absl::DataLossError("encoded segment failed its checksum");
  }
  const uint8_t version = Get<uint8_t>(bytes, 4);
  if (version != kSegmentVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("encoded segment format version ", version, " is not supported (1)"));
  }
  const uint8_t codec = Get<uint8_t>(bytes, 5);
  const uint8_t dtype = Get<uint8_t>(bytes, 6);
  const uint8_t kind = Get<uint8_t>(bytes, 7);
  if (codec >= kNumCodecs) {
    return absl::InvalidArgumentError(absl::StrCat("unknown codec id ", codec));
  }
  if (dtype != static_cast<uint8_t>(DType::kFp16) && dtype != static_cast<uint8_t>(DType::kBf16)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype id ", dtype));
  }
  if (kind > 1) return absl::InvalidArgumentError(absl::StrCat("unknown segment kind ", kind));
  h.params.codec = static_cast<CodecId>(codec);
  h.shape.dtype = static_cast<DType>(dtype);
  h.shape.kind = static_cast<SegmentKind>(kind);
  h.shape.tokens = Get<uint32_t>(bytes, 8);
  h.shape.kv_heads = Get<uint32_t>(bytes, 12);
  h.shape.head_dim = Get<uint32_t>(bytes, 16);
  if (h.shape.tokens > kMaxTokensPerBlock || h.shape.kv_heads > kMaxKvHeads ||
      h.shape.head_dim > kMaxHeadDim || h.shape.Bytes() > kMaxBlockBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "encoded segment shape [", h.shape.tokens, "][", h.shape.kv_heads, "][",
        h.shape.head_dim, "] is outside the limits"));
  }
  h.params.bits = Get<uint8_t>(bytes, 24);
  h.params.flags = Get<uint8_t>(bytes, 25);
  h.params.group = Get<uint16_t>(bytes, 26);
  h.params.budget = Get<float>(bytes, 28);
  h.params.extra = Get<uint64_t>(bytes, 32);
  *payload = body;
  return h;
}

}  // namespace

absl::StatusOr<SegmentHeader> ParseSegment(absl::string_view bytes, absl::string_view* payload) {
  return Parse(bytes, payload, /*verify_checksum=*/true);
}

absl::StatusOr<SegmentHeader> ParseSegmentUnverified(absl::string_view bytes,
                                                     absl::string_view* payload) {
  return Parse(bytes, payload, /*verify_checksum=*/false);
}

}  // namespace kvpool
