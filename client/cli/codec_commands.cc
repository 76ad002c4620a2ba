// `kvpool codec encode | decode | eval`: codecs on .npy files, without a daemon.
#include <cstring>
#include <iostream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/cli/commands.h"
#include "client/kv_codec.h"
#include "common/byte_size.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "kernels/quality.h"

namespace kvpool::cli {
namespace {

constexpr uint32_t kDefaultEvalBlockTokens = 256;

// KV.npy as a shape and its elements.
absl::StatusOr<std::pair<client::KvShape, std::vector<uint16_t>>> LoadKv(const std::string& path) {
  KVPOOL_ASSIGN_OR_RETURN(NpyArray kv, ReadNpy(path));
  if (kv.shape.size() != 5 || kv.shape[1] != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " must have shape [layers][2][tokens][kv_heads][head_dim]"));
  }
  if (kv.type != NpyType::kFp16 && kv.type != NpyType::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " has dtype ", NpyTypeName(kv.type), "; expected fp16 or bf16"));
  }
  client::KvShape shape{static_cast<uint32_t>(kv.shape[0]), static_cast<uint32_t>(kv.shape[2]),
                        static_cast<uint32_t>(kv.shape[3]), static_cast<uint32_t>(kv.shape[4]),
                        kv.type == NpyType::kBf16 ? DType::kBf16 : DType::kFp16};
  KVPOOL_RETURN_IF_ERROR(
      ValidateSpec(KvSpec{"check", shape.layers, shape.kv_heads, shape.head_dim, shape.dtype, 1}));
  std::vector<uint16_t> elements(shape.Elements());
  std::memcpy(elements.data(), kv.data.data(), kv.data.size());
  return std::make_pair(shape, std::move(elements));
}

absl::Status CheckPlanReuse(const CliOptions& o) {
  if (o.plan_reuse == 0) {
    return absl::InvalidArgumentError("--plan-reuse must be at least 1 (1: a plan per segment)");
  }
  return absl::OkStatus();
}

uint32_t BlockTokens(const CliOptions& o, uint32_t tokens) {
  const uint32_t tpb = o.tokens_per_block ? o.tokens_per_block : kDefaultEvalBlockTokens;
  return std::max<uint32_t>(1, std::min(tpb, tokens));
}


std::string Describe(const CodecParams& p) {
  switch (p.codec) {
    case CodecId::kRaw:
      return "raw";
    case CodecId::kKivi:
      return absl::StrFormat("kivi-%d g%d", p.bits, p.group);
    case CodecId::kPackKv:
      return absl::StrFormat("packkv e=%.3g", p.budget);
    case CodecId::kKvpool:
      return absl::StrFormat("kvpool%s e=%.3g", KvpoolProfileSuffix(p), p.budget);
  }
  return "?";
}

// The codecs `eval` compares: the one the flags name, or the standard set.
absl::StatusOr<std::vector<CodecParams>> EvalSet(const CliOptions& o) {
  std::vector<CodecParams> set;
  if (!o.codec.empty()) {
    KVPOOL_ASSIGN_OR_RETURN(CodecParams p, CodecFromFlags(o));
    set.push_back(p);
    return set;
  }
  set.push_back(CodecParams{CodecId::kRaw});
  for (uint8_t bits : {8, 4, 2}) set.push_back(CodecParams{CodecId::kKivi, bits, 0, 32});
  for (float budget : {0.01f, 0.05f}) {
    set.push_back(CodecParams{CodecId::kPackKv, 8, 0, 16, budget});
  }
  for (absl::string_view b : absl::StrSplit(o.budgets, ',', absl::SkipEmpty())) {
    float budget;
    if (!absl::SimpleAtof(b, &budget)) {
      return absl::InvalidArgumentError(absl::StrCat("bad --budgets entry '", b, "'"));
    }
    KVPOOL_ASSIGN_OR_RETURN(const uint8_t flags, KvpoolProfileFlags(o.profile));
    set.push_back(CodecParams{CodecId::kKvpool, 0, flags, 0, budget});
  }
  for (CodecParams& p : set) {
    KVPOOL_ASSIGN_OR_RETURN(p, kernels::NormalizeParams(p));
  }
  return set;
}

}  // namespace

absl::Status RunCodecEncode(const CliOptions& o) {
  if (o.in.empty() || o.out.empty()) return absl::InvalidArgumentError("--in and --out are required");
  KVPOOL_RETURN_IF_ERROR(CheckPlanReuse(o));
  KVPOOL_ASSIGN_OR_RETURN(auto kv, LoadKv(o.in));
  KVPOOL_ASSIGN_OR_RETURN(CodecParams params, CodecFromFlags(o));
  const absl::Time t0 = absl::Now();
  KVPOOL_ASSIGN_OR_RETURN(client::EncodedKv encoded,
                          client::EncodeKv(kv.first, kv.second, BlockTokens(o, kv.first.tokens),
                                           params, kernels::Path::kCpu, o.plan_reuse));
  const absl::Duration took = absl::Now() - t0;
  KVPOOL_RETURN_IF_ERROR(WriteStringToFile(o.out, client::SerializeKvz(encoded)));
  const uint64_t in_bytes = kv.second.size() * 2;
  std::cout << absl::StrFormat("%s: %s -> %s (%.2fx, %d segments) in %.1f ms -> %s\n",
                               Describe(params), FormatBytes(in_bytes),
                               FormatBytes(encoded.EncodedBytes()),
                               double(in_bytes) / encoded.EncodedBytes(), encoded.segments.size(),
                               absl::ToDoubleMilliseconds(took), o.out);
  return absl::OkStatus();
}

absl::Status RunCodecDecode(const CliOptions& o) {
  if (o.in.empty() || o.out.empty()) return absl::InvalidArgumentError("--in and --out are required");
  KVPOOL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(o.in));
  KVPOOL_ASSIGN_OR_RETURN(client::EncodedKv encoded, client::ParseKvz(bytes));
  const client::KvShape& s = encoded.shape;
  if (s.Elements() > (uint64_t{1} << 34)) return absl::DataLossError(".kvz shape is too large");
  NpyArray out;
  out.type = s.dtype == DType::kBf16 ? NpyType::kBf16 : NpyType::kFp16;
  out.shape = {s.layers, 2, s.tokens, s.kv_heads, s.head_dim};
  std::vector<uint16_t> elements(s.Elements());
  KVPOOL_RETURN_IF_ERROR(client::DecodeKv(encoded, absl::MakeSpan(elements), kernels::Path::kCpu));
  out.data.assign(reinterpret_cast<const char*>(elements.data()), elements.size() * 2);
  KVPOOL_RETURN_IF_ERROR(WriteNpy(o.out, out));
  std::cout << absl::StrFormat("decoded %d segments -> %s\n", encoded.segments.size(), o.out);
  return absl::OkStatus();
}

absl::Status RunCodecEval(const CliOptions& o) {
  if (o.in.empty()) return absl::InvalidArgumentError("--in KV.npy is required");
  KVPOOL_RETURN_IF_ERROR(CheckPlanReuse(o));
  KVPOOL_ASSIGN_OR_RETURN(auto kv, LoadKv(o.in));
  const client::KvShape& shape = kv.first;
  const uint32_t tpb = BlockTokens(o, shape.tokens);
  KVPOOL_ASSIGN_OR_RETURN(std::vector<CodecParams> set, EvalSet(o));
  const std::vector<float> original = ElementsToFloats(shape.dtype, kv.second);
  const uint64_t in_bytes = kv.second.size() * 2;
  if (!o.json) {
    std::cout << absl::StrFormat(
        "%s: [%d][2][%d][%d][%d] %s, %d-token blocks; attention: %d queries per head, logit "
        "std %.1f\n%-21s %7s %6s %9s %9s %9s %9s %10s\n",
        o.in, shape.layers, shape.tokens, shape.kv_heads, shape.head_dim, DTypeName(shape.dtype),
        tpb, 16, 2.0, "codec", "ratio", "bits", "rel_l2", "key_l2", "value_l2", "max_abs",
        "attn_err");
  } else {
    std::cout << "{\"results\": [";
  }
  for (size_t i = 0; i < set.size(); ++i) {
    KVPOOL_ASSIGN_OR_RETURN(client::EncodedKv encoded,
                            client::EncodeKv(shape, kv.second, tpb, set[i], kernels::Path::kCpu,
                                             o.plan_reuse));
    std::vector<uint16_t> decoded(kv.second.size());
    KVPOOL_RETURN_IF_ERROR(client::DecodeKv(encoded, absl::MakeSpan(decoded), kernels::Path::kCpu));
    const kernels::Quality q =
        kernels::MeasureQuality(original, ElementsToFloats(shape.dtype, decoded), shape.layers,
                                shape.tokens, shape.kv_heads, shape.head_dim);
    const double ratio = double(in_bytes) / encoded.EncodedBytes();
    const double bits = 8.0 * encoded.EncodedBytes() / kv.second.size();
    if (o.json) {
      std::cout << absl::StrFormat(
          "%s{\"codec\": \"%s\", \"name\": \"%s\", \"bits\": %d, \"group\": %d, \"budget\": %g, "
          "\"ratio\": %.4f, \"bits_per_element\": %.4f, \"rel_l2\": %.6g, \"key_rel_l2\": %.6g, "
          "\"value_rel_l2\": %.6g, \"max_abs\": %.6g, \"attn_rel_l2\": %.6g}",
          i ? ", " : "", CodecName(set[i].codec), Describe(set[i]), set[i].bits, set[i].group,
          set[i].budget, ratio, bits, q.rel_l2, q.key_rel_l2, q.value_rel_l2, q.max_abs,
          q.attn_rel_l2);
    } else {
      std::cout << absl::StrFormat("%-21s %6.2fx %6.2f %9.3g %9.3g %9.3g %9.3g %10.3g\n",
                                   Describe(set[i]), ratio, bits, q.rel_l2, q.key_rel_l2,
                                   q.value_rel_l2, q.max_abs, q.attn_rel_l2);
    }
  }
  if (o.json) std::cout << "]}\n";
  return absl::OkStatus();
}

}  // namespace kvpool::cli
