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

void KeysToProto(const std::vector<BlockKey>& keys,
                 google::protobuf::RepeatedPtrField<std::string>* out) {
  out->Reserve(static_cast<int>(keys.size()));
  for (const BlockKey& k : keys) out->Add(std::string(k.AsStringView()));
}

}  // namespace kvpool
