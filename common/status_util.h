// Error conversions at the edges: gRPC status <-> absl::Status, and adding context.
// Thread-safe (stateless).
#ifndef KVPOOL_COMMON_STATUS_UTIL_H_
#define KVPOOL_COMMON_STATUS_UTIL_H_

#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace kvpool {

// Same code and message. gRPC and absl share the canonical code numbering.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// `status` with "context: " put before its message; OK stays OK.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

// errno as a Status: ENOENT -> NotFound, EACCES -> PermissionDenied, ENOSPC -> ResourceExhausted,
// otherwise Internal; the message is "what: strerror(errno)".
absl::Status FromErrno(int err, absl::string_view what);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_STATUS_UTIL_H_
