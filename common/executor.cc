#include "common/executor.h"

namespace kvpool {

absl::StatusOr<std::unique_ptr<Executor>> Executor::Create(int threads) {
  if (threads <= 0) return absl::InvalidArgumentError("executor needs at least one thread");
  std::unique_ptr<Executor> e(new Executor());
  for (int i = 0; i < threads; ++i) e->workers_.emplace_back([p = e.get()] { p->Work(); });
  return e;
}

Executor::~Executor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

void Executor::Schedule(std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(fn));
}

void Executor::Work() {
  for (;;) {
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // Stopping and drained.
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    fn();
  }
}

}  // namespace kvpool
