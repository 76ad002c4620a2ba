// The encoded-segment format: a self-describing, versioned, checksummed byte string holding one
// segment (one layer's K or V of one block, [tokens][kv_heads][head_dim]) as a codec wrote it.
//
// Layout (little-endian), 64-byte header then the payload:
//   0  4  magic "KVSG"
//   4  1  format version (1)
//   5  1  codec id (0 raw, 1 kivi, 2 packkv, 3 kvpool)
//   6  1  dtype of the decoded elements (1 fp16, 2 bf16)
//   7  1  kind (0 key, 1 value)
//   8  4  tokens            12  4  kv_heads          16  4  head_dim
//  20  4  reserved, 0
//  24 16  codec parameters (see CodecParams)
//  40  8  payload size in bytes
//  48  8  XXH3-64 of the header (with this field zero) and the payload
//  56  8  reserved, 0
//  64  .  payload (codec-specific; see kernels/<codec>.h)
//
// Parsing never reads outside the given bytes. Thread-safe (stateless).
#ifndef KVPOOL_COMMON_ENCODED_SEGMENT_H_
#define KVPOOL_COMMON_ENCODED_SEGMENT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/kv_spec.h"

namespace kvpool {

inline constexpr uint32_t kSegmentMagic = 0x4753564b;  // "KVSG" little-endian.
inline constexpr uint8_t kSegmentVersion = 1;
inline constexpr size_t kSegmentHeaderBytes = 64;

enum class CodecId : uint8_t { kRaw = 0, kKivi = 1, kPackKv = 2, kKvpool = 3 };
inline constexpr int kNumCodecs = 4;
enum class SegmentKind : uint8_t { kKey = 0, kValue = 1 };

// "raw", "kivi", "packkv", "kvpool"; InvalidArgument for others.
absl::StatusOr<CodecId> ParseCodecName(absl::string_view name);
absl::string_view CodecName(CodecId codec);

// Codec parameters, 16 bytes on the wire:
//   0 1 bits (kivi: 2, 4 or 8; packkv: max bits; others 0)
//   1 1 flags (bit 0: packkv token re-ordering; kvpool: bit 2 packed mode, bit 3 equal token
//       weights, bit 4 the fast profile, bit 5 the entropy profile; kernels/kvpool_ref.cc)
//   2 2 group size (kivi: G, default 32; packkv: pack size, 16)
//   4 4 error budget, float32 (packkv, kvpool: relative L2 per segment)
//   8 8 reserved, 0 (codec-specific extensions)
// CodecParams::flags of kvpool's fast profile (kernels/kvpool_fast.cc).
inline constexpr uint8_t kKvpoolFastProfile = 16;
// CodecParams::flags of kvpool's packed payload (mode 1, kernels/kvpool_ref.cc).
inline constexpr uint8_t kKvpoolPackedMode = 4;
// CodecParams::flags of kvpool's entropy profile (payload mode 3, kernels/kvpool_ref.cc).
inline constexpr uint8_t kKvpoolEntropyProfile = 32;

struct CodecParams {
  CodecId codec = CodecId::kRaw;
  uint8_t bits = 0;
  uint8_t flags = 0;
  uint16_t group = 0;
  float budget = 0;
  uint64_t extra = 0;

  bool operator==(const CodecParams& o) const {
    return codec == o.codec && bits == o.bits && flags == o.flags && group == o.group &&
           budget == o.budget && extra == o.extra;
  }
};

// True for kvpool's fast profile.
inline bool IsKvpoolFastProfile(const CodecParams& p) {
  return p.codec == CodecId::kKvpool && (p.flags & kKvpoolFastProfile) != 0;
}

// kvpool's profiles by name: "default" (or "": payload mode 4, rows), "fast" (mode 1 without
// low-rank parts), "entropy" (mode 3): their CodecParams::flags; InvalidArgument for others.
absl::StatusOr<uint8_t> KvpoolProfileFlags(absl::string_view name);
// "", "-fast" or "-entropy": the suffix tools print after "kvpool" for these flags.
absl::string_view KvpoolProfileSuffix(const CodecParams& p);

// True for kvpool's default profile (payload mode 4: no fast, packed or entropy flag).
inline bool IsKvpoolRowsMode(const CodecParams& p) {
  constexpr uint8_t kOtherModes = kKvpoolFastProfile | kKvpoolEntropyProfile | kKvpoolPackedMode;
  return p.codec == CodecId::kKvpool && (p.flags & kOtherModes) == 0;
}

struct SegmentShape {
  uint32_t tokens = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;
  SegmentKind kind = SegmentKind::kKey;

  uint64_t Elements() const { return uint64_t{tokens} * kv_heads * head_dim; }
  uint64_t Bytes() const { return Elements() * DTypeSize(dtype); }
};

struct SegmentHeader {
  CodecParams params;
  SegmentShape shape;
  uint64_t payload_bytes = 0;
  uint64_t checksum = 0;
};

// Writes header + payload. REQUIRES: the shape's dims are at most the KvSpec limits.
std::string SerializeSegment(const SegmentHeader& header, absl::string_view payload);

// The same without copying the payload: `segment` holds kSegmentHeaderBytes of space followed
// by the payload already written; fills the header (payload size = the rest) and checksum.
void FinishSegmentInPlace(const SegmentHeader& header, std::string* segment);

// Parses and checks an encoded segment: DataLoss for a bad magic, a size that does not match
// the payload size, or a checksum mismatch; InvalidArgument for an unknown version, codec,
// dtype or kind, or a shape outside the KvSpec limits. On success *payload views the payload
// inside `bytes`.
absl::StatusOr<SegmentHeader> ParseSegment(absl::string_view bytes, absl::string_view* payload);

// The same checks without the checksum, for segments used only as a hint that cannot change
// what a reader decodes (a value's encoder taking its key segment's token classes, which move
// bits between tokens while the encoder still measures its own error).
absl::StatusOr<SegmentHeader> ParseSegmentUnverified(absl::string_view bytes,
                                                     absl::string_view* payload);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_ENCODED_SEGMENT_H_
