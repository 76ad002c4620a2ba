#include "bench/redis_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/net.h"
#include "common/status_util.h"

namespace kvpool::bench {

absl::StatusOr<std::unique_ptr<RedisClient>> RedisClient::Connect(const std::string& address) {
  auto fd = ConnectTcp(address);
  if (!fd.ok()) return Annotate(fd.status(), "Redis");
  return std::unique_ptr<RedisClient>(new RedisClient(*fd));
}

RedisClient::~RedisClient() { ::close(fd_); }

absl::Status RedisClient::SendCommand(std::initializer_list<absl::string_view> args) {
  std::string header = absl::StrCat("*", args.size(), "\r\n");
  // Small arguments go in one buffer; the large value is sent from its own memory.
  for (absl::string_view a : args) {
    absl::StrAppend(&header, "$", a.size(), "\r\n");
    if (a.size() < 4096) {
      header.append(a.data(), a.size());
      header += "\r\n";
      continue;
    }
    for (absl::string_view part : {absl::string_view(header), a, absl::string_view("\r\n")}) {
      for (size_t off = 0; off < part.size();) {
        const ssize_t n = ::send(fd_, part.data() + off, part.size() - off, MSG_NOSIGNAL);
        if (n <= 0) return FromErrno(errno, "Redis send");
        off += n;
      }
    }
    header.clear();
  }
  for (size_t off = 0; off < header.size();) {
    const ssize_t n = ::send(fd_, header.data() + off, header.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return FromErrno(errno, "Redis send");
    off += n;
  }
  return absl::OkStatus();
}

absl::Status RedisClient::ReadExact(char* out, size_t n) {
  const size_t buffered = std::min(n, buffer_.size() - pos_);
  std::memcpy(out, buffer_.data() + pos_, buffered);
  pos_ += buffered;
  for (size_t got = buffered; got < n;) {
    const ssize_t r = ::recv(fd_, out + got, n - got, 0);
    if (r <= 0) return absl::UnavailableError("Redis connection closed");
    got += r;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> RedisClient::ReadLine() {
  for (;;) {
    const size_t end = buffer_.find("\r\n", pos_);
    if (end != std::string::npos) {
      std::string line = buffer_.substr(pos_, end - pos_);
      pos_ = end + 2;
      return line;
    }
    buffer_.erase(0, pos_);
    pos_ = 0;
    char chunk[4096];
    const ssize_t r = ::recv(fd_, chunk, sizeof(chunk), 0);
    if (r <= 0) return absl::UnavailableError("Redis connection closed");
    buffer_.append(chunk, r);
  }
}

absl::Status RedisClient::Set(absl::string_view key, absl::string_view value) {
  if (absl::Status s = SendCommand({"SET", key, value}); !s.ok()) return s;
  auto line = ReadLine();
  if (!line.ok()) return line.status();
  if (*line != "+OK") return absl::InternalError(absl::StrCat("Redis SET: ", *line));
  return absl::OkStatus();
}

absl::Status RedisClient::Get(absl::string_view key, std::string* value) {
  if (absl::Status s = SendCommand({"GET", key}); !s.ok()) return s;
  auto line = ReadLine();
  if (!line.ok()) return line.status();
  int64_t len = 0;
  if (line->empty() || (*line)[0] != '$' || !absl::SimpleAtoi(line->substr(1), &len)) {
    return absl::InternalError(absl::StrCat("Redis GET: ", *line));
  }
  if (len < 0) return absl::NotFoundError(absl::StrCat("Redis GET: no key ", key));
  value->resize(len + 2);
  if (absl::Status s = ReadExact(value->data(), len + 2); !s.ok()) return s;
  value->resize(len);
  return absl::OkStatus();
}

absl::Status RedisClient::Ping() {
  if (absl::Status s = SendCommand({"PING"}); !s.ok()) return s;
  auto line = ReadLine();
  if (!line.ok()) return line.status();
  return *line == "+PONG" ? absl::OkStatus() : absl::InternalError(*line);
}

}  // namespace kvpool::bench
