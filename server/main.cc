// kvpoold: the kvpool daemon. The only place that reads flags, config files and signals.
//
//   kvpoold [--config FILE] [--listen HOST:PORT] [--metrics-listen HOST:PORT]
//           [--host-memory SIZE] [--data-dir DIR] [--ready-file PATH] [--log-level L]
//
// Embedded defaults (see --print-default-config) < the config file < flags. Once serving it
// writes the ready file (JSON with the actual addresses); SIGINT/SIGTERM drain in-flight
// requests and exit 0. Exit 1 on bad options or when it cannot start, with a one-line reason.
#include <signal.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <unistd.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/byte_size.h"
#include "common/flag_names.h"
#include "common/logging.h"
#include "common/ready_file.h"
#include "kernels/device.h"
#include "server/config.h"
#include "server/daemon.h"

ABSL_FLAG(std::string, config, "", "YAML config file (flags override it)");
ABSL_FLAG(std::string, listen, "", "gRPC HOST:PORT (port 0 lets the OS pick)");
ABSL_FLAG(std::string, metrics_listen, "", "Prometheus /metrics HOST:PORT (port 0 lets the OS pick; off disables)");
ABSL_FLAG(std::string, host_memory, "", "host-memory tier capacity, e.g. 4GiB");
ABSL_FLAG(std::string, data_dir, "", "folder for on-disk state");
ABSL_FLAG(std::string, ready_file, "", "once serving, write the actual addresses here as JSON");
ABSL_FLAG(std::string, log_level, "", "debug | info | warning | error");
ABSL_FLAG(double, drain_seconds, 30, "how long SIGTERM waits for in-flight requests");
ABSL_FLAG(std::string, fusion, "", "fusion mode for every spec: off | online | batch");
ABSL_FLAG(std::string, fusion_threshold, "", "fusion cosine threshold for every spec, in [-1, 1]");
ABSL_FLAG(std::string, fusion_budget, "", "fusion error budget for every spec (relative L2), in (0, 1)");
ABSL_FLAG(bool, print_default_config, false, "print the embedded default config and exit");

namespace {

int Fail(const std::string& message) {
  std::cerr << "kvpoold: " << message << "\n";
  return 1;
}

// --fusion, --fusion-threshold, --fusion-budget: override the config for every spec.
absl::Status ApplyFusionFlags(kvpool::server::DaemonOptions* o) {
  kvpool::server::FusionPolicy& policy = o->service.fusion;
  std::vector<kvpool::server::FusionOptions*> all = {&policy.default_value};
  for (auto& [model, f] : policy.per_model) all.push_back(&f);
  if (const std::string mode = absl::GetFlag(FLAGS_fusion); !mode.empty()) {
    auto m = kvpool::server::ParseFusionMode(mode);
    if (!m.ok()) return absl::InvalidArgumentError(absl::StrCat("--fusion: ", m.status().message()));
    for (auto* f : all) f->mode = *m;
  }
  const std::pair<const char*, std::string> numbers[] = {
      {"--fusion-threshold", absl::GetFlag(FLAGS_fusion_threshold)},
      {"--fusion-budget", absl::GetFlag(FLAGS_fusion_budget)}};
  for (const auto& [name, text] : numbers) {
    if (text.empty()) continue;
    double v;
    if (!absl::SimpleAtod(text, &v)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": '", text, "' is not a number"));
    }
    for (auto* f : all) (std::string(name) == "--fusion-budget" ? f->budget : f->threshold) = v;
  }
  for (auto* f : all) {
    if (absl::Status s = kvpool::server::ValidateFusionOptions(*f); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("fusion flags: ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyFlags(kvpool::server::DaemonOptions* o) {
  if (!absl::GetFlag(FLAGS_listen).empty()) o->listen = absl::GetFlag(FLAGS_listen);
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    o->metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
    if (o->metrics_listen == "off") o->metrics_listen.clear();
  }
  if (!absl::GetFlag(FLAGS_host_memory).empty()) {
    auto v = kvpool::ParseByteSize(absl::GetFlag(FLAGS_host_memory));
    if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat("--host-memory: ", v.status().message()));
    o->host_memory = *v;
  }
  if (!absl::GetFlag(FLAGS_data_dir).empty()) o->data_dir = absl::GetFlag(FLAGS_data_dir);
  if (!absl::GetFlag(FLAGS_log_level).empty()) o->log_level = absl::GetFlag(FLAGS_log_level);
  return ApplyFusionFlags(o);
}

absl::Status ApplyLogLevel(const std::string& level) {
  using kvpool::LogLevel;
  if (level == "debug") kvpool::SetMinLogLevel(LogLevel::kDebug);
  else if (level == "info") kvpool::SetMinLogLevel(LogLevel::kInfo);
  else if (level == "warning") kvpool::SetMinLogLevel(LogLevel::kWarning);
  else if (level == "error") kvpool::SetMinLogLevel(LogLevel::kError);
  else return absl::InvalidArgumentError(absl::StrCat("unknown log level '", level, "'"));
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvpool daemon: a disaggregated KV-cache store");
  std::vector<std::string> args = kvpool::NormalizeFlagNames(argc, argv);
  std::vector<char*> arg_ptrs = kvpool::ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), arg_ptrs.data());
  if (absl::GetFlag(FLAGS_print_default_config)) {
    std::cout << kvpool::server::DefaultConfigYaml();
    return 0;
  }

  kvpool::server::DaemonOptions options;
  if (absl::Status s = kvpool::server::ApplyConfigYaml(kvpool::server::DefaultConfigYaml(), &options);
      !s.ok()) {
    return Fail(absl::StrCat("embedded config: ", s.ToString()));
  }
  if (!absl::GetFlag(FLAGS_config).empty()) {
    if (absl::Status s = kvpool::server::ApplyConfigFile(absl::GetFlag(FLAGS_config), &options);
        !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  if (absl::Status s = ApplyFlags(&options); !s.ok()) return Fail(std::string(s.message()));
  if (absl::Status s = ApplyLogLevel(options.log_level); !s.ok()) return Fail(std::string(s.message()));

  // Block the stop signals in every thread (gRPC's threads inherit this mask); the main thread
  // takes them with sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto daemon = kvpool::server::Daemon::Create(options);
  if (!daemon.ok()) return Fail(std::string(daemon.status().message()));
  KVPOOL_LOG(INFO) << "kvpoold " << KVPOOL_VERSION << " serving gRPC on "
                   << (*daemon)->grpc_address() << ", /metrics on "
                   << ((*daemon)->metrics_address().empty() ? "(off)"
                                                            : (*daemon)->metrics_address())
                   << ", host tier " << kvpool::FormatBytes(options.host_memory) << ", data dir "
                   << options.data_dir << "; " << kvpool::kernels::DescribeDevices();

  const std::string ready_file = absl::GetFlag(FLAGS_ready_file);
  if (!ready_file.empty()) {
    kvpool::ReadyInfo info{(*daemon)->grpc_address(), (*daemon)->metrics_address(),
                           static_cast<int>(getpid())};
    if (absl::Status s = kvpool::WriteReadyFile(ready_file, info); !s.ok()) {
      (*daemon)->Shutdown(absl::ZeroDuration());
      return Fail(std::string(s.message()));
    }
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  KVPOOL_LOG(INFO) << "received " << (sig == SIGINT ? "SIGINT" : "SIGTERM")
                   << ", draining in-flight requests";
  (*daemon)->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  KVPOOL_LOG(INFO) << "drained, exiting";
  // Every request is answered and nothing is buffered (logs are written unbuffered), so skip
  // the slow teardown of the /metrics web server and gRPC's globals (~2.5 s together).
  std::fflush(nullptr);
  _exit(0);
}
