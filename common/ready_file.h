// The daemon's ready file: once serving, kvpoold writes a JSON object with its actual addresses
// ({"grpc": "127.0.0.1:41234", "metrics": "127.0.0.1:41235", "pid": 123}) so that tests,
// scripts and supervisors started with port 0 know where to connect. Thread-safe (stateless).
#ifndef KVPOOL_COMMON_READY_FILE_H_
#define KVPOOL_COMMON_READY_FILE_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvpool {

struct ReadyInfo {
  std::string grpc;     // host:port of the gRPC service.
  std::string metrics;  // host:port of /metrics ("" when disabled).
  int pid = 0;
};

// Writes atomically (temporary file + rename), so readers never see a partial object.
absl::Status WriteReadyFile(const std::string& path, const ReadyInfo& info);

// Reads what WriteReadyFile wrote. NotFound when absent; InvalidArgument when malformed.
absl::StatusOr<ReadyInfo> ReadReadyFile(const std::string& path);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_READY_FILE_H_
