// Tests for common/executor.h.
#include "common/executor.h"

#include <atomic>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::StatusIs;

TEST(ExecutorTest, RunsEveryClosureOnAWorker) {
  auto e = Executor::Create(3);
  ASSERT_TRUE(e.ok());
  std::atomic<int> sum{0};
  absl::Notification last;
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> on_caller{false};
  for (int i = 1; i <= 1000; ++i) {
    (*e)->Schedule([&, i] {
      if (std::this_thread::get_id() == caller) on_caller = true;
      if (sum.fetch_add(i) + i == 500500) last.Notify();
    });
  }
  last.WaitForNotification();
  EXPECT_EQ(sum.load(), 500500);
  EXPECT_FALSE(on_caller.load());
}

TEST(ExecutorTest, DestructorRunsWhatWasQueued) {
  std::atomic<int> ran{0};
  {
    auto e = Executor::Create(1);
    ASSERT_TRUE(e.ok());
    absl::Notification release;
    (*e)->Schedule([&] { release.WaitForNotification(); });
    for (int i = 0; i < 50; ++i) (*e)->Schedule([&] { ++ran; });
    release.Notify();
  }
  EXPECT_EQ(ran.load(), 50);
}

TEST(ExecutorTest, ZeroThreadsIsAnError) {
  EXPECT_THAT(Executor::Create(0), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvpool
