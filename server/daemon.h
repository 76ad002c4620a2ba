// Daemon: assembles kvpoold's parts (block store, metrics and its /metrics exposer, the gRPC
// server with the KvPool, health and reflection services) and owns their lifetimes.
// Create() returns a serving daemon; Shutdown() drains in-flight requests.
// Thread-safe.
#ifndef KVPOOL_SERVER_DAEMON_H_
#define KVPOOL_SERVER_DAEMON_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "common/executor.h"
#include "prometheus/exposer.h"
#include "server/config.h"
#include "server/grpc/kvpool_service.h"
#include "server/metrics.h"
#include "server/store/block_store.h"

namespace kvpool::server {

class Daemon {
 public:
  // Validates the options, creates the data dir, starts serving. InvalidArgument for bad
  // options, Unavailable when an address cannot be bound, PermissionDenied etc. for the data
  // dir. Nothing keeps running after a failure.
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(const DaemonOptions& options);

  // Shuts down with a 10 s drain if Shutdown was not called, then stops /metrics.
  ~Daemon();

  // Actual addresses (the OS-picked port when 0 was asked for). metrics_address() is "" when
  // metrics are disabled.
  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& metrics_address() const { return metrics_address_; }

  // Marks health NOT_SERVING, stops accepting calls, and waits up to `drain` for the calls in
  // flight to finish (gRPC cancels the rest at the deadline). Returns once no call is in flight:
  // it does not wait for idle client connections to close (an idle C++ channel takes ~5 s to
  // acknowledge gRPC's GOAWAY); the destructor does. /metrics serves until the destructor.
  // Blocks. Idempotent.
  void Shutdown(absl::Duration drain);

 private:
  Daemon() = default;

  std::unique_ptr<BlockStore> store_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::unique_ptr<Executor> codec_executor_;  // Encodes and decodes; outlives service and server.
  std::unique_ptr<KvPoolService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::thread grpc_shutdown_;  // Runs grpc::Server::Shutdown, which also waits for connections.
  std::string grpc_address_;
  std::string metrics_address_;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_DAEMON_H_
