// A minimal Redis (RESP2) client for the baseline: SET and GET of binary values over one TCP
// connection, blocking. Enough to measure what LMCache users get from a plain Redis; not a
// general client. Thread-compatible (one connection, one caller at a time).
#ifndef KVPOOL_BENCH_REDIS_CLIENT_H_
#define KVPOOL_BENCH_REDIS_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvpool::bench {

class RedisClient {
 public:
  // Connects to HOST:PORT (IPv4). Unavailable when nothing listens there.
  static absl::StatusOr<std::unique_ptr<RedisClient>> Connect(const std::string& address);
  ~RedisClient();

  absl::Status Set(absl::string_view key, absl::string_view value);
  // The value into *value; NotFound for a missing key.
  absl::Status Get(absl::string_view key, std::string* value);
  absl::Status Ping();

 private:
  explicit RedisClient(int fd) : fd_(fd) {}
  absl::Status SendCommand(std::initializer_list<absl::string_view> args);
  absl::StatusOr<std::string> ReadLine();
  absl::Status ReadExact(char* out, size_t n);

  int fd_;
  std::string buffer_;  // Received, not yet consumed.
  size_t pos_ = 0;
};

}  // namespace kvpool::bench

#endif  // KVPOOL_BENCH_REDIS_CLIENT_H_
