// Starting and stopping child processes (the daemon under test, redis-server for benchmarks,
// the CLI in integration tests). Thread-compatible: one owner per Subprocess.
#ifndef KVPOOL_COMMON_SUBPROCESS_H_
#define KVPOOL_COMMON_SUBPROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvpool {

class Subprocess {
 public:
  struct Options {
    std::vector<std::string> argv;  // argv[0] is the program path (searched in PATH if bare).
    std::string stdout_path;        // Where stdout goes; "" inherits ours.
    std::string stderr_path;        // Where stderr goes; "" inherits ours.
    std::string stdin_path;         // Where stdin comes from; "" means /dev/null.
  };

  // Starts the process. Internal (with errno text) when fork/exec fails; a program that cannot
  // be executed exits 127 and is reported by Wait.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(const Options& options);

  // Kills (SIGKILL) and reaps a child that is still running.
  ~Subprocess();

  pid_t pid() const { return pid_; }

  // Sends `signal`. FailedPrecondition when the process was already reaped.
  absl::Status Signal(int signal);

  // Waits up to `timeout` for exit. Returns the exit code (128 + signal when killed by a
  // signal); DeadlineExceeded when it is still running at the deadline. Blocks.
  absl::StatusOr<int> Wait(absl::Duration timeout);

  // True while the process has not exited (reaps it when it has).
  bool Running();

 private:
  explicit Subprocess(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  std::optional<int> exit_code_;
};

// Runs argv to completion with stdout and stderr captured into `output` (if not null); returns
// the exit code. DeadlineExceeded (after killing it) past `timeout`. Blocks.
absl::StatusOr<int> RunCommand(const std::vector<std::string>& argv, absl::Duration timeout,
                               std::string* output);

// Waits up to `timeout` for a file to exist and be non-empty; DeadlineExceeded otherwise.
// `alive` (optional) is polled too: when it stops running, returns Unavailable at once.
absl::Status WaitForFile(const std::string& path, absl::Duration timeout,
                         Subprocess* alive = nullptr);

// The folder of the running executable (from /proc/self/exe), for finding sibling binaries.
std::string ExecutableDir();

}  // namespace kvpool

#endif  // KVPOOL_COMMON_SUBPROCESS_H_
