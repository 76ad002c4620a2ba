// Conversions between the generated kvpool.v1 messages and common/ types, shared by the
// server and the client. Thread-safe (stateless).
#ifndef KVPOOL_PROTO_CONVERT_H_
#define KVPOOL_PROTO_CONVERT_H_

#include <vector>

#include "absl/status/statusor.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"
#include "google/protobuf/repeated_field.h"
#include "kvpool/v1/kvpool.pb.h"

namespace kvpool {

// Validates (ValidateSpec) while converting: InvalidArgument naming the bad field.
absl::StatusOr<KvSpec> SpecFromProto(const v1::KvSpec& proto);
void SpecToProto(const KvSpec& spec, v1::KvSpec* proto);

// Parses keys of exactly 32 bytes. InvalidArgument "keys[i] is N bytes, expected 32".
absl::StatusOr<std::vector<BlockKey>> KeysFromProto(
    const google::protobuf::RepeatedPtrField<std::string>& keys);
// A CodecSpec as CodecParams (not yet normalised). NotFound when codec is "" (use the default);
// InvalidArgument for an unknown codec name or out-of-range numbers.
absl::StatusOr<CodecParams> CodecFromProto(const v1::CodecSpec& proto);
void CodecToProto(const CodecParams& params, v1::CodecSpec* proto);

void KeysToProto(const std::vector<BlockKey>& keys,
                 google::protobuf::RepeatedPtrField<std::string>* out);

}  // namespace kvpool

#endif  // KVPOOL_PROTO_CONVERT_H_
