#include "server/config.h"

#include <yaml-cpp/yaml.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "common/byte_size.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "common/status_util.h"

namespace kvpool::server {
namespace {

constexpr absl::string_view kDefaultYaml = R"(# kvpoold configuration (embedded defaults). Flags override these.
listen: 127.0.0.1:7470          # gRPC address; port 0 lets the OS pick
metrics_listen: 127.0.0.1:7471  # Prometheus /metrics address; "" disables
host_memory: 1GiB               # host-DRAM tier capacity; LRU eviction beyond it
data_dir: kvpool-data           # on-disk state
log_level: info                 # debug | info | warning | error
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

absl::Status Apply(const YAML::Node& root, DaemonOptions* out) {
  if (root.IsNull()) return absl::OkStatus();
  KVPOOL_RETURN_IF_ERROR(CheckKeys(
      root, "", {"listen", "metrics_listen", "host_memory", "data_dir", "log_level", "limits"}));
  DaemonOptions o = *out;
  KVPOOL_RETURN_IF_ERROR(SetString(root["listen"], "listen", &o.listen));
  KVPOOL_RETURN_IF_ERROR(SetString(root["metrics_listen"], "metrics_listen", &o.metrics_listen));
  KVPOOL_RETURN_IF_ERROR(SetSize(root["host_memory"], "host_memory", &o.host_memory));
  KVPOOL_RETURN_IF_ERROR(SetString(root["data_dir"], "data_dir", &o.data_dir));
  KVPOOL_RETURN_IF_ERROR(SetString(root["log_level"], "log_level", &o.log_level));
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
