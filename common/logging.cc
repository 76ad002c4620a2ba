#include "common/logging.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvpool {
namespace {
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
constexpr char kLevelChar[] = {'D', 'I', 'W', 'E'};
}  // namespace

void SetMinLogLevel(LogLevel level) { g_min_level.store(static_cast<int>(level)); }
LogLevel MinLogLevel() { return static_cast<LogLevel>(g_min_level.load()); }

namespace internal {

LogLine::LogLine(LogLevel level, const char* file, int line) : level_(level) {
  const char* base = std::strrchr(file, '/');
  stream_ << kLevelChar[static_cast<int>(level)]
          << absl::FormatTime("%m%d %H:%M:%E3S ", absl::Now(), absl::UTCTimeZone())
          << (base ? base + 1 : file) << ':' << line << "] ";
}

LogLine::~LogLine() {
  stream_ << '\n';
  const std::string s = stream_.str();
  ssize_t ignored = ::write(STDERR_FILENO, s.data(), s.size());
  (void)ignored;
}

}  // namespace internal
}  // namespace kvpool
