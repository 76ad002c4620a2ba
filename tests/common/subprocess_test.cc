// Tests for common/subprocess.h: exit codes, output capture, deadlines, kill on destruction,
// waiting for files. The children are real processes (sh, sleep, cat, true).
#include "common/subprocess.h"

#include <signal.h>
#include <stdlib.h>

#include <cerrno>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

// Long enough never to expire on a loaded machine; tests that reach it have failed anyway.
constexpr absl::Duration kLong = absl::Seconds(30);

class SubprocessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/subprocess_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::unique_ptr<Subprocess> StartOrDie(const Subprocess::Options& options) {
    auto p = Subprocess::Start(options);
    EXPECT_THAT(p, IsOk());
    return p.ok() ? std::move(*p) : nullptr;
  }
  static std::unique_ptr<Subprocess> StartOrDie(std::vector<std::string> argv) {
    Subprocess::Options options;
    options.argv = std::move(argv);
    return StartOrDie(options);
  }

  // True when no process (not even a zombie) has this pid.
  static bool Gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

  std::string dir_;
};

TEST_F(SubprocessTest, RunCommandReturnsExitCodeAndOutput) {
  std::string output;
  auto code = RunCommand({"sh", "-c", "echo hi; exit 3"}, kLong, &output);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 3);
  EXPECT_EQ(output, "hi\n");
}

TEST_F(SubprocessTest, RunCommandCapturesStderrToo) {
  std::string output;
  auto code = RunCommand({"sh", "-c", "echo out; echo err >&2"}, kLong, &output);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0);
  EXPECT_EQ(output, "out\nerr\n");
}

TEST_F(SubprocessTest, RunCommandWithoutOutput) {
  auto code = RunCommand({"sh", "-c", "echo ignored"}, kLong, nullptr);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0);
}

TEST_F(SubprocessTest, RunCommandOfMissingProgramExits127) {
  std::string output;
  auto code = RunCommand({"kvpool-no-such-program-for-tests"}, kLong, &output);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 127);
}

TEST_F(SubprocessTest, RunCommandPastDeadlineIsDeadlineExceeded) {
  const absl::Time start = absl::Now();
  std::string output;
  EXPECT_THAT(
      RunCommand({"sh", "-c", "echo started; exec sleep 5"}, absl::Milliseconds(100), &output),
      StatusIs(absl::StatusCode::kDeadlineExceeded));
  // It was killed rather than waited for (a loose bound: the child would take 5 s).
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

TEST_F(SubprocessTest, EmptyArgvIsInvalidArgument) {
  EXPECT_THAT(Subprocess::Start({}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunCommand({}, kLong, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(SubprocessTest, WaitReturnsExitCode) {
  auto p = StartOrDie({"sh", "-c", "exit 7"});
  ASSERT_NE(p, nullptr);
  EXPECT_GT(p->pid(), 0);
  auto code = p->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 7);
  EXPECT_FALSE(p->Running());
  // A second Wait returns the same code at once.
  code = p->Wait(absl::ZeroDuration());
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 7);
}

TEST_F(SubprocessTest, WaitDeadlineThenDestructorKills) {
  auto p = StartOrDie({"sleep", "5"});
  ASSERT_NE(p, nullptr);
  const pid_t pid = p->pid();
  EXPECT_THAT(p->Wait(absl::Milliseconds(50)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr(std::to_string(pid))));
  EXPECT_TRUE(p->Running());
  EXPECT_FALSE(Gone(pid));
  p.reset();  // SIGKILL and reap.
  EXPECT_TRUE(Gone(pid));
}

TEST_F(SubprocessTest, KilledBySignalIs128PlusSignal) {
  auto p = StartOrDie({"sleep", "5"});
  ASSERT_NE(p, nullptr);
  ASSERT_THAT(p->Signal(SIGTERM), IsOk());
  auto code = p->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 128 + SIGTERM);
  EXPECT_THAT(p->Signal(SIGTERM), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(SubprocessTest, MissingProgramIsReportedByWait) {
  auto p = StartOrDie({"/nonexistent/kvpool-test-binary"});
  ASSERT_NE(p, nullptr);
  auto code = p->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 127);
}

TEST_F(SubprocessTest, RedirectsStdoutAndStderrToFiles) {
  Subprocess::Options options;
  options.argv = {"sh", "-c", "echo to-out; echo to-err >&2"};
  options.stdout_path = dir_ + "/out.txt";
  options.stderr_path = dir_ + "/err.txt";
  auto p = StartOrDie(options);
  ASSERT_NE(p, nullptr);
  auto code = p->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0);
  auto out = ReadFileToString(options.stdout_path);
  auto err = ReadFileToString(options.stderr_path);
  ASSERT_THAT(out, IsOk());
  ASSERT_THAT(err, IsOk());
  EXPECT_EQ(*out, "to-out\n");
  EXPECT_EQ(*err, "to-err\n");
}

TEST_F(SubprocessTest, StdinFromFileAndDefaultDevNull) {
  const std::string in_path = dir_ + "/in.txt";
  ASSERT_THAT(WriteStringToFile(in_path, "line one\nline two\n"), IsOk());
  Subprocess::Options options;
  options.argv = {"cat"};
  options.stdin_path = in_path;
  options.stdout_path = dir_ + "/cat.txt";
  auto p = StartOrDie(options);
  ASSERT_NE(p, nullptr);
  ASSERT_THAT(p->Wait(kLong), IsOk());
  auto out = ReadFileToString(options.stdout_path);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, "line one\nline two\n");

  // Without stdin_path, cat reads /dev/null and exits at once instead of waiting on our stdin.
  options.stdin_path = "";
  auto q = StartOrDie(options);
  ASSERT_NE(q, nullptr);
  auto code = q->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0);
  out = ReadFileToString(options.stdout_path);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, "");
}

TEST_F(SubprocessTest, UnopenableRedirectionExits126) {
  Subprocess::Options options;
  options.argv = {"true"};
  options.stdin_path = dir_ + "/missing-input";
  auto p = StartOrDie(options);
  ASSERT_NE(p, nullptr);
  auto code = p->Wait(kLong);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 126);
}

TEST_F(SubprocessTest, WaitForFileIsUnavailableWhenTheProcessExitsFirst) {
  auto p = StartOrDie({"true"});
  ASSERT_NE(p, nullptr);
  EXPECT_THAT(WaitForFile(dir_ + "/never-written", kLong, p.get()),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("never-written")));
}

TEST_F(SubprocessTest, WaitForFileSeesAFileWrittenByALiveProcess) {
  const std::string path = dir_ + "/ready";
  auto p = StartOrDie({"sh", "-c", "echo ready > \"$0\"; exec sleep 30", path});
  ASSERT_NE(p, nullptr);
  EXPECT_THAT(WaitForFile(path, kLong, p.get()), IsOk());
  EXPECT_TRUE(p->Running());
}  // The destructor kills the sleep.

TEST_F(SubprocessTest, WaitForFileOfExistingFile) {
  const std::string path = dir_ + "/exists";
  ASSERT_THAT(WriteStringToFile(path, "x"), IsOk());
  EXPECT_THAT(WaitForFile(path, absl::ZeroDuration()), IsOk());
}

TEST_F(SubprocessTest, WaitForFileIgnoresEmptyFilesUntilTheDeadline) {
  const std::string path = dir_ + "/empty";
  ASSERT_THAT(WriteStringToFile(path, ""), IsOk());
  EXPECT_THAT(WaitForFile(path, absl::Milliseconds(30)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr(path)));
  EXPECT_THAT(WaitForFile(dir_ + "/missing", absl::Milliseconds(30)),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST_F(SubprocessTest, ExecutableDirHoldsThisTest) {
  const std::string dir = ExecutableDir();
  ASSERT_FALSE(dir.empty());
  EXPECT_NE(dir.back(), '/');
  EXPECT_TRUE(std::filesystem::exists(dir + "/subprocess_test")) << dir;
}

}  // namespace
}  // namespace kvpool
