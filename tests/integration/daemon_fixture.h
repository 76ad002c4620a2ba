// Starts the real kvpoold (built next to the tests) on 127.0.0.1 port 0 with its own temporary
// data dir, waits for its ready file, and stops it with SIGTERM, requiring exit code 0.
#ifndef KVPOOL_TESTS_INTEGRATION_DAEMON_FIXTURE_H_
#define KVPOOL_TESTS_INTEGRATION_DAEMON_FIXTURE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "common/subprocess.h"

namespace kvpool::testing {

class RunningDaemon {
 public:
  // Starts kvpoold with the extra flags (e.g. {"--host-memory=8MiB"}); blocks until it serves.
  static absl::StatusOr<std::unique_ptr<RunningDaemon>> Start(std::vector<std::string> flags = {});
  // SIGTERM + wait if still running; removes the temp dir.
  ~RunningDaemon();

  const std::string& grpc_address() const { return grpc_; }
  const std::string& metrics_address() const { return metrics_; }
  const std::string& dir() const { return dir_; }
  Subprocess& process() { return *process_; }

  // A client connected to this daemon.
  std::unique_ptr<client::Client> NewClient() const;

  // SIGTERM, then the exit code (DeadlineExceeded after `timeout`).
  absl::StatusOr<int> Stop(absl::Duration timeout = absl::Seconds(30));

  // The daemon's log so far (stderr).
  std::string Log() const;

 private:
  std::unique_ptr<Subprocess> process_;
  std::string dir_;
  std::string grpc_;
  std::string metrics_;
};

// HTTP GET http://address/path over a plain socket; returns the body.
absl::StatusOr<std::string> HttpGet(const std::string& address, const std::string& path);

// The value of one sample line ("name{labels} value") in Prometheus text; -1 when absent.
double MetricValue(const std::string& text, const std::string& sample);

// Temporary folder, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string KvpooldPath();
std::string KvpoolCliPath();

}  // namespace kvpool::testing

#endif  // KVPOOL_TESTS_INTEGRATION_DAEMON_FIXTURE_H_
