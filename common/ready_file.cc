#include "common/ready_file.h"

#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "common/status_util.h"

namespace kvpool {
namespace {

// Value of "key" in the flat JSON object written below (string or integer value).
std::string JsonField(const std::string& json, const std::string& key) {
  const std::string quoted = absl::StrCat("\"", key, "\"");
  size_t pos = json.find(quoted);
  if (pos == std::string::npos) return "";
  pos = json.find(':', pos + quoted.size());
  if (pos == std::string::npos) return "";
  ++pos;
  while (pos < json.size() && json[pos] == ' ') ++pos;
  if (pos < json.size() && json[pos] == '"') {
    const size_t end = json.find('"', pos + 1);
    return end == std::string::npos ? "" : json.substr(pos + 1, end - pos - 1);
  }
  const size_t end = json.find_first_of(",}", pos);
  return json.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
}

}  // namespace

absl::Status WriteReadyFile(const std::string& path, const ReadyInfo& info) {
  const std::string json = absl::StrCat("{\"grpc\": \"", info.grpc, "\", \"metrics\": \"",
                                        info.metrics, "\", \"pid\": ", info.pid, "}\n");
  const std::string tmp = absl::StrCat(path, ".tmp");
  if (absl::Status s = WriteStringToFile(tmp, json); !s.ok()) return s;
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return FromErrno(errno, absl::StrCat("rename ", tmp, " -> ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<ReadyInfo> ReadReadyFile(const std::string& path) {
  auto json = ReadFileToString(path);
  if (!json.ok()) return json.status();
  ReadyInfo info;
  info.grpc = JsonField(*json, "grpc");
  info.metrics = JsonField(*json, "metrics");
  if (info.grpc.empty() || !absl::SimpleAtoi(JsonField(*json, "pid"), &info.pid)) {
    return absl::InvalidArgumentError(absl::StrCat("malformed ready file ", path, ": ", *json));
  }
  return info;
}

}  // namespace kvpool
