// A fixed pool of worker threads running queued closures in FIFO order, for work that must not
// run on gRPC callback threads (encoding, CUDA syncs, disk). Thread-safe. The destructor runs
// every closure already queued, then joins the workers.
#ifndef KVPOOL_COMMON_EXECUTOR_H_
#define KVPOOL_COMMON_EXECUTOR_H_

#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace kvpool {

class Executor {
 public:
  // InvalidArgument when threads is 0.
  static absl::StatusOr<std::unique_ptr<Executor>> Create(int threads);
  ~Executor();

  // Queues `fn` to run on a worker. Never blocks. REQUIRES: not called after destruction began.
  void Schedule(std::function<void()> fn);

  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  Executor() = default;
  void Work();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvpool

#endif  // KVPOOL_COMMON_EXECUTOR_H_
