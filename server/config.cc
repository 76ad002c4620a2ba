#include "server/config.h"

#include <yaml-cpp/yaml.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "common/byte_size.h"
#include "common/npy.h"
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

absl::Status CheckKeys(const YAML::Node& node, absl::string_view where,
                       const std::set<std::string>& allowed) {
  if (!node.IsMap()) return absl::InvalidArgumentError(absl::StrCat(where, " must be a map"));
  for (const auto& kv : node) {
    const std::string key = kv.first.as<std::string>();
    if (!allowed.count(key)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown config key '", where, key, "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> SizeValue(const YAML::Node& node, absl::string_view name) {
  auto v = ParseByteSize(node.as<std::string>());
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", v.status().message()));
  return *v;
}

absl::Status Apply(const YAML::Node& root, DaemonOptions* out) {
  if (root.IsNull()) return absl::OkStatus();
  if (absl::Status s = CheckKeys(root, "", {"listen", "metrics_listen", "host_memory", "data_dir",
                                            "log_level", "limits"});
      !s.ok()) {
    return s;
  }
  DaemonOptions o = *out;
  if (root["listen"]) o.listen = root["listen"].as<std::string>();
  if (root["metrics_listen"]) {
    o.metrics_listen = root["metrics_listen"].IsNull() ? "" : root["metrics_listen"].as<std::string>();
  }
  if (root["host_memory"]) {
    auto v = SizeValue(root["host_memory"], "host_memory");
    if (!v.ok()) return v.status();
    o.host_memory = *v;
  }
  if (root["data_dir"]) o.data_dir = root["data_dir"].as<std::string>();
  if (root["log_level"]) o.log_level = root["log_level"].as<std::string>();
  if (const YAML::Node limits = root["limits"]) {
    if (absl::Status s = CheckKeys(limits, "limits.", {"max_keys_per_request", "max_request_bytes",
                                                       "max_message_bytes", "chunk_bytes"});
        !s.ok()) {
      return s;
    }
    if (limits["max_keys_per_request"]) {
      o.service.max_keys_per_request = limits["max_keys_per_request"].as<uint32_t>();
    }
    for (auto [name, field] : {std::pair{"max_request_bytes", &o.service.max_request_bytes},
                               std::pair{"max_message_bytes", &o.max_message_bytes},
                               std::pair{"chunk_bytes", &o.service.chunk_bytes}}) {
      if (!limits[name]) continue;
      auto v = SizeValue(limits[name], absl::StrCat("limits.", name));
      if (!v.ok()) return v.status();
      *field = *v;
    }
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
