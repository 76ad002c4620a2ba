#include "tests/integration/daemon_fixture.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/net.h"
#include "common/npy.h"
#include "common/ready_file.h"
#include "common/status_util.h"

namespace kvpool::testing {

std::string KvpooldPath() { return KVPOOLD_PATH; }
std::string KvpoolCliPath() { return KVPOOL_CLI_PATH; }

TempDir::TempDir() {
  char tmpl[] = "/tmp/kvpool-test-XXXXXX";
  path_ = ::mkdtemp(tmpl);
}
TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

absl::StatusOr<std::unique_ptr<RunningDaemon>> RunningDaemon::Start(std::vector<std::string> flags) {
  auto d = std::unique_ptr<RunningDaemon>(new RunningDaemon());
  char tmpl[] = "/tmp/kvpoold-test-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return FromErrno(errno, "mkdtemp");
  d->dir_ = tmpl;
  const std::string ready = d->dir_ + "/ready.json";
  Subprocess::Options options;
  options.argv = {KvpooldPath(),
                  "--listen=127.0.0.1:0",
                  "--metrics-listen=127.0.0.1:0",
                  "--data-dir=" + d->dir_ + "/data",
                  "--ready-file=" + ready,
                  "--drain-seconds=20"};
  options.argv.insert(options.argv.end(), flags.begin(), flags.end());
  options.stderr_path = d->dir_ + "/kvpoold.log";
  auto process = Subprocess::Start(options);
  if (!process.ok()) return process.status();
  d->process_ = std::move(*process);
  if (absl::Status s = WaitForFile(ready, absl::Seconds(30), d->process_.get()); !s.ok()) {
    return Annotate(s, absl::StrCat("kvpoold did not start; log:\n", d->Log()));
  }
  auto info = ReadReadyFile(ready);
  if (!info.ok()) return info.status();
  d->grpc_ = info->grpc;
  d->metrics_ = info->metrics;
  return d;
}

RunningDaemon::~RunningDaemon() {
  if (process_ != nullptr && process_->Running()) Stop().IgnoreError();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::unique_ptr<client::Client> RunningDaemon::NewClient() const {
  client::ClientOptions options;
  options.server = grpc_;
  options.deadline = absl::Seconds(60);
  return *client::Client::Create(options);
}

absl::StatusOr<int> RunningDaemon::Stop(absl::Duration timeout) {
  if (process_->Running()) {
    if (absl::Status s = process_->Signal(SIGTERM); !s.ok()) return s;
  }
  return process_->Wait(timeout);
}

std::string RunningDaemon::Log() const {
  auto text = ReadFileToString(dir_ + "/kvpoold.log");
  return text.ok() ? *text : "";
}

absl::StatusOr<std::string> HttpGet(const std::string& address, const std::string& path) {
  auto connected = ConnectTcp(address);
  if (!connected.ok()) return connected.status();
  const int fd = *connected;
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", address, "\r\nConnection: close\r\n\r\n");
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) < 0) {
    ::close(fd);
    return FromErrno(errno, "send");
  }
  std::string response;
  char buf[65536];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof(buf), 0)) > 0;) response.append(buf, n);
  ::close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || body == std::string::npos) {
    return absl::InternalError(absl::StrCat("bad HTTP response from ", address));
  }
  return response.substr(body + 4);
}

double MetricValue(const std::string& text, const std::string& sample) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.size() > sample.size() && line.substr(0, sample.size()) == sample &&
        line[sample.size()] == ' ') {
      double v;
      if (absl::SimpleAtod(line.substr(sample.size() + 1), &v)) return v;
    }
  }
  return -1;
}

}  // namespace kvpool::testing
