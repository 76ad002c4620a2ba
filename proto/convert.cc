#include "proto/convert.h"

#include "absl/strings/str_cat.h"

namespace kvpool {

absl::StatusOr<KvSpec> SpecFromProto(const v1::KvSpec& proto) {
  KvSpec spec;
  spec.model_id = proto.model_id();
  spec.num_layers = proto.num_layers();
  spec.num_kv_heads = proto.num_kv_heads();
  spec.head_dim = proto.head_dim();
  switch (proto.dtype()) {
    case v1::DTYPE_FP16:
      spec.dtype = DType::kFp16;
      break;
    case v1::DTYPE_BF16:
      spec.dtype = DType::kBf16;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.dtype ", static_cast<int>(proto.dtype()), " is unknown (expected fp16 or bf16)"));
  }
  spec.tokens_per_block = proto.tokens_per_block();
  if (absl::Status s = ValidateSpec(spec); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("spec: ", s.message()));
  }
  return spec;
}

void SpecToProto(const KvSpec& spec, v1::KvSpec* proto) {
  proto->set_model_id(spec.model_id);
  proto->set_num_layers(spec.num_layers);
  proto->set_num_kv_heads(spec.num_kv_heads);
  proto->set_head_dim(spec.head_dim);
  proto->set_dtype(spec.dtype == DType::kBf16 ? v1::DTYPE_BF16 : v1::DTYPE_FP16);
  proto->set_tokens_per_block(spec.tokens_per_block);
}

absl::StatusOr<std::vector<BlockKey>> KeysFromProto(
    const google::protobuf::RepeatedPtrField<std::string>& keys) {
  std::vector<BlockKey> out;
  out.reserve(keys.size());
  for (int i = 0; i < keys.size(); ++i) {
    auto key = BlockKeyFromBytes(keys.Get(i));
    if (!key.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("keys[", i, "] is ", keys.Get(i).size(),
                                                     " bytes, expected ", kBlockKeySize));
    }
    out.push_back(*key);
  }
  return out;
}

absl::StatusOr<CodecParams> CodecFromProto(const v1::CodecSpec& proto) {
  if (proto.codec().empty()) return absl::NotFoundError("no codec given");
  auto id = ParseCodecName(proto.codec());
  if (!id.ok()) return id.status();
  if (proto.bits() > 255 || proto.group() > 65535 || proto.flags() > 255) {
    return absl::InvalidArgumentError("codec bits, group or flags out of range");
  }
  CodecParams p;
  p.codec = *id;
  p.bits = static_cast<uint8_t>(proto.bits());
  p.group = static_cast<uint16_t>(proto.group());
  p.budget = proto.budget();
  p.flags = static_cast<uint8_t>(proto.flags());
  return p;
}

void CodecToProto(const CodecParams& params, v1::CodecSpec* proto) {
  proto->set_codec(std::string(CodecName(params.codec)));
  proto->set_bits(params.bits);
  proto->set_group(params.group);
  proto->set_budget(params.budget);
  proto->set_flags(params.flags);
}

void KeysToProto(const std::vector<BlockKey>& keys,
                 google::protobuf::RepeatedPtrField<std::string>* out) {
  out->Reserve(static_cast<int>(keys.size()));
  for (const BlockKey& k : keys) out->Add(std::string(k.AsStringView()));
}

}  // namespace kvpool
