// Daemon configuration: the options every component takes, their embedded defaults, and the
// YAML config file format (`kvpoold --config FILE`; flags override it). Only main.cc reads
// files, flags and the environment; components take these structs. Thread-compatible.
#ifndef KVPOOL_SERVER_CONFIG_H_
#define KVPOOL_SERVER_CONFIG_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "server/grpc/kvpool_service.h"

namespace kvpool::server {

struct DaemonOptions {
  std::string listen = "127.0.0.1:7470";          // gRPC HOST:PORT; port 0 lets the OS pick.
  std::string metrics_listen = "127.0.0.1:7471";  // /metrics HOST:PORT; "" disables it.
  uint64_t host_memory = uint64_t{1} << 30;       // Host tier capacity in bytes.
  std::string data_dir = "kvpool-data";           // Folder for on-disk state (SSD tier, later).
  std::string log_level = "info";                 // debug | info | warning | error.
  uint64_t max_message_bytes = uint64_t{8} << 20; // gRPC message size limit (both ways).
  int encode_threads = 0;                          // Put encoders; 0 = one per core.
  ServiceOptions service;                         // Request limits.
};

// The embedded default config as YAML (what `kvpoold --print-default-config` prints).
absl::string_view DefaultConfigYaml();

// Applies a YAML document on top of `options`. InvalidArgument naming the key for unknown
// keys, wrong types and bad sizes; nothing is applied then.
absl::Status ApplyConfigYaml(absl::string_view yaml, DaemonOptions* options);

// Reads FILE and applies it (NotFound etc. when unreadable).
absl::Status ApplyConfigFile(const std::string& path, DaemonOptions* options);

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_CONFIG_H_
