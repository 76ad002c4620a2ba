#include "common/kv_spec.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace kvpool {

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  if (lower == "fp16" || lower == "float16" || lower == "half") return DType::kFp16;
  if (lower == "bf16" || lower == "bfloat16") return DType::kBf16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "' (expected fp16 or bf16)"));
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
      return "fp16";
    case DType::kBf16:
      return "bf16";
  }
  return "unknown";
}

uint64_t KvSpec::SegmentElements() const {
  return uint64_t{tokens_per_block} * num_kv_heads * head_dim;
}
uint64_t KvSpec::SegmentBytes() const { return SegmentElements() * DTypeSize(dtype); }
uint64_t KvSpec::BlockBytes() const { return SegmentsPerBlock() * SegmentBytes(); }

bool KvSpec::operator==(const KvSpec& o) const {
  return model_id == o.model_id && num_layers == o.num_layers && num_kv_heads == o.num_kv_heads &&
         head_dim == o.head_dim && dtype == o.dtype && tokens_per_block == o.tokens_per_block;
}

std::string KvSpec::DebugString() const {
  return absl::StrCat("model=", model_id, " layers=", num_layers, " kv_heads=", num_kv_heads,
                      " head_dim=", head_dim, " dtype=", DTypeName(dtype),
                      " tokens_per_block=", tokens_per_block);
}

absl::Status ValidateModelId(absl::string_view model_id) {
  if (model_id.empty()) return absl::InvalidArgumentError("model_id is empty");
  if (model_id.size() > kMaxModelIdLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("model_id is ", model_id.size(), " characters, limit ", kMaxModelIdLength));
  }
  for (char c : model_id) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError("model_id must be printable ASCII without spaces");
    }
  }
  return absl::OkStatus();
}

namespace {
absl::Status CheckRange(absl::string_view field, uint64_t value, uint64_t max) {
  if (value >= 1 && value <= max) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " = ", value, " is out of range [1, ", max, "]"));
}
}  // namespace

absl::Status ValidateSpec(const KvSpec& spec) {
  if (absl::Status s = ValidateModelId(spec.model_id); !s.ok()) return s;
  if (absl::Status s = CheckRange("num_layers", spec.num_layers, kMaxLayers); !s.ok()) return s;
  if (absl::Status s = CheckRange("num_kv_heads", spec.num_kv_heads, kMaxKvHeads); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRange("head_dim", spec.head_dim, kMaxHeadDim); !s.ok()) return s;
  if (absl::Status s = CheckRange("tokens_per_block", spec.tokens_per_block, kMaxTokensPerBlock);
      !s.ok()) {
    return s;
  }
  if (spec.dtype != DType::kFp16 && spec.dtype != DType::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown dtype ", static_cast<int>(spec.dtype), " (expected fp16 or bf16)"));
  }
  if (spec.BlockBytes() > kMaxBlockBytes) {
    return absl::InvalidArgumentError(absl::StrCat("block of ", spec.BlockBytes(),
                                                   " bytes exceeds the limit of ", kMaxBlockBytes));
  }
  return absl::OkStatus();
}

}  // namespace kvpool
