#include "server/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/byte_size.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "kernels/codec.h"
#include "common/status_util.h"

namespace kvpool::server {
namespace {

constexpr absl::string_view kDefaultYaml =
    R"(# kvpoold configuration (embedded defaults). Flags override these.
listen: 127.0.0.1:7470          # gRPC address; port 0 lets the OS pick
metrics_listen: 127.0.0.1:7471  # Prometheus /metrics address; "" disables
host_memory: 1GiB               # host-DRAM tier capacity; LRU eviction beyond it
data_dir: kvpool-data           # on-disk state
log_level: info                 # debug | info | warning | error
encode_threads: 0               # threads encoding puts and decoding server-side gets; 0 = one per core
gpu_encode: auto                # with a GPU: auto (kvpool default/entropy on the CPU) | always | never
plan_reuse: 32                  # kvpool: segments of a layer's K or V per plan (1 = plan each segment)
codec:                          # how segments are stored when a put does not say
  codec: kvpool                 # raw | kivi (bits, group) | packkv (budget, bits, group) | kvpool (budget, profile)
  budget: 0.02                  # relative L2 error per segment (attention-output error ~0.015)
model_codecs: {}                # per model id, e.g. {llama-3-8b: {codec: kivi, bits: 4}}
fusion:                         # joint encoding of similar segments across blocks (README: Fusion)
  mode: off                     # off | online (each put against the index) | batch (within a put)
  threshold: 0.95               # minimum cosine between a member and its representative
  budget: 0.05                  # maximum relative L2 error of a fused segment as read back
  skip_layers: [0, 1, -2, -1]   # layers never fused; negative counts from the end
model_fusion: {}                # per model id, e.g. {llama-3-8b: {mode: online, budget: 0.03}}
limits:
  max_keys_per_request: 4096    # more keys in one request: INVALID_ARGUMENT
  max_request_bytes: 1GiB       # larger put: RESOURCE_EXHAUSTED
  max_message_bytes: 8MiB       # gRPC message limit; larger messages: RESOURCE_EXHAUSTED
  chunk_bytes: 1MiB             # data bytes per Get stream message
)";

// `where` names the map ("" for the top level, "limits" below it).
absl::Status CheckKeys(const YAML::Node& node, absl::string_view where,
                       const std::set<std::string>& allowed) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        where.empty() ? std::string("config must be a map of keys to values")
                      : absl::StrCat("config key '", where, "' must be a map"));
  }
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    if (!allowed.count(key)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown config key '", where.empty() ? "" : absl::StrCat(where, "."), key, "'"));
    }
  }
  return absl::OkStatus();
}

// The scalar at `node` as T; InvalidArgument naming `name` when it is not one.
template <typename T>
absl::StatusOr<T> Scalar(const YAML::Node& node, absl::string_view name) {
  if (!node.IsScalar()) {
    return absl::InvalidArgumentError(absl::StrCat("config key '", name, "' must be a scalar"));
  }
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat("config key '", name, "' has a bad value '", node.Scalar(), "'"));
  }
}

absl::Status SetString(const YAML::Node& node, absl::string_view name, std::string* out) {
  if (!node) return absl::OkStatus();
  if (node.IsNull()) {
    out->clear();
    return absl::OkStatus();
  }
  auto v = Scalar<std::string>(node, name);
  if (!v.ok()) return v.status();
  *out = *v;
  return absl::OkStatus();
}

absl::Status SetSize(const YAML::Node& node, absl::string_view name, uint64_t* out) {
  if (!node) return absl::OkStatus();
  auto text = Scalar<std::string>(node, name);
  if (!text.ok()) return text.status();
  auto v = ParseByteSize(*text);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", v.status().message()));
  *out = *v;
  return absl::OkStatus();
}

// An integer in [lo, hi] at `name`, when the key is there.
absl::Status SetIntIn(const YAML::Node& node, absl::string_view name, int lo, int hi, int* out) {
  if (!node) return absl::OkStatus();
  KVPOOL_ASSIGN_OR_RETURN(const int v, Scalar<int>(node, name));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("config key '", name, "' must be in [", lo, ", ", hi, "]"));
  }
  *out = v;
  return absl::OkStatus();
}

// A codec map {codec, bits, group, budget, flags, profile} at `where`, normalised.
absl::StatusOr<CodecParams> CodecValue(const YAML::Node& node, const std::string& where) {
  KVPOOL_RETURN_IF_ERROR(
      CheckKeys(node, where, {"codec", "bits", "group", "budget", "flags", "profile"}));
  if (!node["codec"]) return absl::InvalidArgumentError(absl::StrCat(where, ".codec is required"));
  KVPOOL_ASSIGN_OR_RETURN(std::string name, Scalar<std::string>(node["codec"], where + ".codec"));
  auto id = ParseCodecName(name);
  if (!id.ok()) return Annotate(id.status(), where + ".codec");
  CodecParams p;
  p.codec = *id;
  if (node["bits"]) {
    KVPOOL_ASSIGN_OR_RETURN(uint32_t bits, Scalar<uint32_t>(node["bits"], where + ".bits"));
    p.bits = static_cast<uint8_t>(std::min<uint32_t>(bits, 255));
  }
  if (node["group"]) {
    KVPOOL_ASSIGN_OR_RETURN(uint32_t group, Scalar<uint32_t>(node["group"], where + ".group"));
    p.group = static_cast<uint16_t>(std::min<uint32_t>(group, 65535));
  }
  if (node["budget"]) {
    KVPOOL_ASSIGN_OR_RETURN(p.budget, Scalar<float>(node["budget"], where + ".budget"));
  }
  if (node["flags"]) {
    KVPOOL_ASSIGN_OR_RETURN(uint32_t flags, Scalar<uint32_t>(node["flags"], where + ".flags"));
    p.flags = static_cast<uint8_t>(flags & 0xff);
  }
  if (node["profile"]) {
    KVPOOL_ASSIGN_OR_RETURN(std::string profile,
                            Scalar<std::string>(node["profile"], where + ".profile"));
    auto flags = KvpoolProfileFlags(profile);
    if (p.codec != CodecId::kKvpool || !flags.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ".profile must be 'default', 'fast' or 'entropy', and only for codec kvpool; got '",
          profile, "'"));
    }
    p.flags |= *flags;
  }
  auto normalized = kernels::NormalizeParams(p);
  if (!normalized.ok()) return Annotate(normalized.status(), where);
  return *normalized;
}

// A fusion map {mode, threshold, budget, skip_layers, max_candidates} at `where`, on top of
// `base`.
absl::StatusOr<FusionOptions> FusionValue(const YAML::Node& node, const std::string& where,
                                          FusionOptions base) {
  KVPOOL_RETURN_IF_ERROR(
      CheckKeys(node, where, {"mode", "threshold", "budget", "skip_layers", "max_candidates"}));
  FusionOptions f = std::move(base);
  if (node["mode"]) {
    // YAML 1.1 reads a bare off as a boolean; take its text.
    KVPOOL_ASSIGN_OR_RETURN(std::string mode, Scalar<std::string>(node["mode"], where + ".mode"));
    if (mode == "false") mode = "off";
    auto m = ParseFusionMode(mode);
    if (!m.ok()) return Annotate(m.status(), where + ".mode");
    f.mode = *m;
  }
  if (node["threshold"]) {
    KVPOOL_ASSIGN_OR_RETURN(f.threshold, Scalar<double>(node["threshold"], where + ".threshold"));
  }
  if (node["budget"]) {
    KVPOOL_ASSIGN_OR_RETURN(f.budget, Scalar<double>(node["budget"], where + ".budget"));
  }
  if (node["max_candidates"]) {
    KVPOOL_ASSIGN_OR_RETURN(f.max_candidates,
                            Scalar<uint32_t>(node["max_candidates"], where + ".max_candidates"));
  }
  if (const YAML::Node skip = node["skip_layers"]) {
    if (!skip.IsSequence()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config key '", where, ".skip_layers' must be a list of layer numbers"));
    }
    f.skip_layers.clear();
    for (const auto& item : skip) {
      KVPOOL_ASSIGN_OR_RETURN(int32_t layer, Scalar<int32_t>(item, where + ".skip_layers"));
      f.skip_layers.push_back(layer);
    }
  }
  if (absl::Status s = ValidateFusionOptions(f); !s.ok()) return Annotate(s, where);
  return f;
}

absl::Status Apply(const YAML::Node& root, DaemonOptions* out) {
  if (root.IsNull()) return absl::OkStatus();
  KVPOOL_RETURN_IF_ERROR(CheckKeys(
      root, "",
      {"listen", "metrics_listen", "host_memory", "data_dir", "log_level", "limits", "codec",
       "model_codecs", "encode_threads", "gpu_encode", "plan_reuse", "fusion", "model_fusion"}));
  DaemonOptions o = *out;
  KVPOOL_RETURN_IF_ERROR(SetString(root["listen"], "listen", &o.listen));
  KVPOOL_RETURN_IF_ERROR(SetString(root["metrics_listen"], "metrics_listen", &o.metrics_listen));
  KVPOOL_RETURN_IF_ERROR(SetSize(root["host_memory"], "host_memory", &o.host_memory));
  KVPOOL_RETURN_IF_ERROR(SetString(root["data_dir"], "data_dir", &o.data_dir));
  KVPOOL_RETURN_IF_ERROR(SetString(root["log_level"], "log_level", &o.log_level));
  KVPOOL_RETURN_IF_ERROR(
      SetIntIn(root["encode_threads"], "encode_threads", 0, 1024, &o.encode_threads));
  int plan_reuse = int(o.service.plan_reuse);
  KVPOOL_RETURN_IF_ERROR(SetIntIn(root["plan_reuse"], "plan_reuse", 1, 4096, &plan_reuse));
  o.service.plan_reuse = uint64_t(plan_reuse);
  if (root["gpu_encode"]) {
    KVPOOL_ASSIGN_OR_RETURN(const std::string policy,
                            Scalar<std::string>(root["gpu_encode"], "gpu_encode"));
    if (policy == "auto") {
      o.service.gpu_encode_policy = GpuEncode::kAuto;
    } else if (policy == "always") {
      o.service.gpu_encode_policy = GpuEncode::kAlways;
    } else if (policy == "never") {
      o.service.gpu_encode_policy = GpuEncode::kNever;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "config key 'gpu_encode' must be auto, always or never, not '", policy, "'"));
    }
  }
  if (const YAML::Node codec = root["codec"]) {
    KVPOOL_ASSIGN_OR_RETURN(o.service.codecs.default_value, CodecValue(codec, "codec"));
  }
  if (const YAML::Node models = root["model_codecs"]) {
    if (!models.IsMap()) return absl::InvalidArgumentError("config key 'model_codecs' must be a map");
    for (const auto& kv : models) {
      const std::string model = kv.first.Scalar();
      KVPOOL_ASSIGN_OR_RETURN(o.service.codecs.per_model[model],
                              CodecValue(kv.second, "model_codecs." + model));
    }
  }
  if (const YAML::Node fusion = root["fusion"]) {
    KVPOOL_ASSIGN_OR_RETURN(o.service.fusion.default_value,
                            FusionValue(fusion, "fusion", o.service.fusion.default_value));
  }
  if (const YAML::Node models = root["model_fusion"]) {
    if (!models.IsMap()) return absl::InvalidArgumentError("config key 'model_fusion' must be a map");
    for (const auto& kv : models) {
      const std::string model = kv.first.Scalar();
      KVPOOL_ASSIGN_OR_RETURN(o.service.fusion.per_model[model],
                              FusionValue(kv.second, "model_fusion." + model,
                                          o.service.fusion.default_value));
    }
  }
  if (const YAML::Node limits = root["limits"]) {
    KVPOOL_RETURN_IF_ERROR(CheckKeys(limits, "limits",
                                     {"max_keys_per_request", "max_request_bytes",
                                      "max_message_bytes", "chunk_bytes"}));
    if (limits["max_keys_per_request"]) {
      KVPOOL_ASSIGN_OR_RETURN(
          o.service.max_keys_per_request,
          Scalar<uint32_t>(limits["max_keys_per_request"], "limits.max_keys_per_request"));
    }
    KVPOOL_RETURN_IF_ERROR(SetSize(limits["max_request_bytes"], "limits.max_request_bytes",
                                   &o.service.max_request_bytes));
    KVPOOL_RETURN_IF_ERROR(SetSize(limits["max_message_bytes"], "limits.max_message_bytes",
                                   &o.max_message_bytes));
    KVPOOL_RETURN_IF_ERROR(
        SetSize(limits["chunk_bytes"], "limits.chunk_bytes", &o.service.chunk_bytes));
  }
  *out = std::move(o);
  return absl::OkStatus();
}

}  // namespace

absl::string_view DefaultConfigYaml() { return kDefaultYaml; }

absl::Status ApplyConfigYaml(absl::string_view yaml, DaemonOptions* options) {
  try {
    return Apply(YAML::Load(std::string(yaml)), options);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", e.what()));
  }
}

absl::Status ApplyConfigFile(const std::string& path, DaemonOptions* options) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  return Annotate(ApplyConfigYaml(*text, options), path);
}

}  // namespace kvpool::server
