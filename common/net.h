// Small TCP helpers for the daemon's address handling, the benchmarks' Redis client and the
// tests' HTTP scrapes. Thread-safe (stateless).
#ifndef KVPOOL_COMMON_NET_H_
#define KVPOOL_COMMON_NET_H_

#include <string>
#include <utility>

#include "absl/status/statusor.h"

namespace kvpool {

struct HostPort {
  std::string host;
  int port = 0;
};

// "HOST:PORT" (port 0-65535; the host is everything before the last ':'). InvalidArgument
// naming the address otherwise.
absl::StatusOr<HostPort> SplitHostPort(const std::string& address);

// A connected, blocking IPv4 TCP socket to HOST:PORT with TCP_NODELAY; the caller owns (closes)
// the descriptor. InvalidArgument for a bad address, Unavailable when the connect fails.
absl::StatusOr<int> ConnectTcp(const std::string& address);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_NET_H_
