#include "common/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/npy.h"
#include "common/status_util.h"

namespace kvpool {
namespace {

int ExitCodeFromWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

void RedirectOrDie(const std::string& path, int fd, int flags) {
  int f = ::open(path.c_str(), flags, 0644);
  if (f < 0 || ::dup2(f, fd) < 0) _exit(126);
  ::close(f);
}

// Polling interval while waiting for a child or a file. The waits are for external processes,
// which offer no notification we can block on portably; the interval bounds added latency.
constexpr absl::Duration kPoll = absl::Milliseconds(5);

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(const Options& options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::vector<char*> argv;
  for (const std::string& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return FromErrno(errno, "fork");
  if (pid == 0) {
    // Child: only async-signal-safe calls from here on.
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, nullptr);
    RedirectOrDie(options.stdin_path.empty() ? "/dev/null" : options.stdin_path, STDIN_FILENO,
                  O_RDONLY);
    if (!options.stdout_path.empty()) {
      RedirectOrDie(options.stdout_path, STDOUT_FILENO, O_WRONLY | O_CREAT | O_TRUNC);
    }
    if (!options.stderr_path.empty() && options.stderr_path == options.stdout_path) {
      if (::dup2(STDOUT_FILENO, STDERR_FILENO) < 0) _exit(126);
    } else if (!options.stderr_path.empty()) {
      RedirectOrDie(options.stderr_path, STDERR_FILENO, O_WRONLY | O_CREAT | O_TRUNC);
    }
    ::execvp(argv[0], argv.data());
    _exit(127);
  }
  return std::unique_ptr<Subprocess>(new Subprocess(pid));
}

Subprocess::~Subprocess() {
  if (!exit_code_.has_value()) {
    ::kill(pid_, SIGKILL);
    int status;
    ::waitpid(pid_, &status, 0);
  }
}

absl::Status Subprocess::Signal(int signal) {
  if (exit_code_.has_value()) return absl::FailedPreconditionError("process already exited");
  if (::kill(pid_, signal) != 0) return FromErrno(errno, "kill");
  return absl::OkStatus();
}

bool Subprocess::Running() {
  if (exit_code_.has_value()) return false;
  int status;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_code_ = ExitCodeFromWaitStatus(status);
    return false;
  }
  return true;
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (Running()) {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("pid ", pid_, " still running after ",
                                                      absl::FormatDuration(timeout)));
    }
    absl::SleepFor(kPoll);
  }
  return *exit_code_;
}

absl::StatusOr<int> RunCommand(const std::vector<std::string>& argv, absl::Duration timeout,
                               std::string* output) {
  char tmpl[] = "/tmp/kvpool-run-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  if (fd < 0) return FromErrno(errno, "mkstemp");
  ::close(fd);
  const std::string out_path = tmpl;
  Subprocess::Options options;
  options.argv = argv;
  options.stdout_path = out_path;
  options.stderr_path = out_path;
  auto proc = Subprocess::Start(options);
  if (!proc.ok()) {
    ::unlink(out_path.c_str());
    return proc.status();
  }
  absl::StatusOr<int> code = (*proc)->Wait(timeout);
  if (!code.ok()) (*proc)->Signal(SIGKILL).IgnoreError();
  if (output != nullptr) {
    auto text = ReadFileToString(out_path);
    *output = text.ok() ? *text : "";
  }
  ::unlink(out_path.c_str());
  return code;
}

absl::Status WaitForFile(const std::string& path, absl::Duration timeout, Subprocess* alive) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && st.st_size > 0) return absl::OkStatus();
    if (alive != nullptr && !alive->Running()) {
      // It may have written the file just before exiting: look once more.
      if (::stat(path.c_str(), &st) == 0 && st.st_size > 0) return absl::OkStatus();
      return absl::UnavailableError(absl::StrCat("process exited before writing ", path));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("no ", path, " after ",
                                                      absl::FormatDuration(timeout)));
    }
    absl::SleepFor(kPoll);
  }
}

std::string ExecutableDir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace kvpool
