// Minimal leveled logging to stderr: KVPOOL_LOG(INFO) << "text";
// One line per statement with time, level and source location. Thread-safe: each line is
// written with one write(2).
#ifndef KVPOOL_COMMON_LOGGING_H_
#define KVPOOL_COMMON_LOGGING_H_

#include <sstream>

namespace kvpool {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below `level` are dropped. Default kInfo. Set once at startup (main.cc).
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

namespace internal {
class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace kvpool

#define KVPOOL_LOG_LEVEL_DEBUG ::kvpool::LogLevel::kDebug
#define KVPOOL_LOG_LEVEL_INFO ::kvpool::LogLevel::kInfo
#define KVPOOL_LOG_LEVEL_WARNING ::kvpool::LogLevel::kWarning
#define KVPOOL_LOG_LEVEL_ERROR ::kvpool::LogLevel::kError
#define KVPOOL_LOG(level)                                              \
  if (KVPOOL_LOG_LEVEL_##level < ::kvpool::MinLogLevel()) {            \
  } else                                                               \
    ::kvpool::internal::LogLine(KVPOOL_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#endif  // KVPOOL_COMMON_LOGGING_H_
