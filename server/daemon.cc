#include "server/daemon.h"

#include <sys/stat.h>

#include <cerrno>
#include <algorithm>
#include <exception>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/net.h"
#include "kernels/device.h"
#include "common/status_util.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace kvpool::server {
namespace {

absl::Status MakeDirs(const std::string& path) {
  for (size_t pos = 1; pos != std::string::npos;) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return FromErrno(errno, absl::StrCat("cannot create data dir ", prefix));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(const DaemonOptions& options) {
  auto grpc_hp = SplitHostPort(options.listen);
  if (!grpc_hp.ok()) return Annotate(grpc_hp.status(), "--listen");
  if (options.max_message_bytes < 1024 || options.service.chunk_bytes == 0 ||
      options.service.chunk_bytes + 1024 > options.max_message_bytes) {
    return absl::InvalidArgumentError(
        "limits: chunk_bytes must be positive and at least 1 KiB below max_message_bytes");
  }
  if (absl::Status s = MakeDirs(options.data_dir); !s.ok()) return s;

  std::unique_ptr<Daemon> d(new Daemon());
  BlockStore::Options store_options;
  store_options.capacity_bytes = options.host_memory;
  auto store = BlockStore::Create(store_options);
  if (!store.ok()) return Annotate(store.status(), "host tier");
  d->store_ = std::move(*store);
  d->metrics_ = std::make_unique<Metrics>();

  if (!options.metrics_listen.empty()) {
    auto hp = SplitHostPort(options.metrics_listen);
    if (!hp.ok()) return Annotate(hp.status(), "--metrics-listen");
    try {
      d->exposer_ = std::make_unique<prometheus::Exposer>(options.metrics_listen);
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("cannot serve /metrics on ", options.metrics_listen, ": ", e.what()));
    }
    d->exposer_->RegisterCollectable(d->metrics_->registry());
    const std::vector<int> ports = d->exposer_->GetListeningPorts();
    d->metrics_address_ = absl::StrCat(hp->host, ":", ports.empty() ? hp->port : ports[0]);
  }

  const int encode_threads = options.encode_threads > 0
                                 ? options.encode_threads
                                 : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  auto encoder = Executor::Create(encode_threads);
  if (!encoder.ok()) return Annotate(encoder.status(), "encode_threads");
  d->codec_executor_ = std::move(*encoder);
  ServiceOptions service_options = options.service;
  KVPOOL_LOG(INFO) << "plan_reuse: " << service_options.plan_reuse
                   << (service_options.plan_reuse > 1
                           ? " segments of a layer's K or V per kvpool plan"
                           : ": every kvpool segment plans afresh");
  if (kernels::DeviceCount() > 0 && service_options.gpu_encode_policy == GpuEncode::kNever) {
    KVPOOL_LOG(INFO) << "gpu_encode: never: puts encode and fuse on the CPU";
  } else if (kernels::DeviceCount() > 0) {
    // Kernels that disagree with the host paths never touch stored data.
    const absl::Status check = kernels::SelfCheckCudaCodecs();
    service_options.gpu_encode = check.ok();
    if (!check.ok()) {
      KVPOOL_LOG(ERROR) << "CUDA codecs failed their self-check, encoding on the CPU: " << check;
    } else if (service_options.gpu_encode_policy == GpuEncode::kAuto) {
      KVPOOL_LOG(INFO) << "gpu_encode: auto: puts encode on the GPU, but those with kvpool's "
                          "default or entropy profile on the CPU ('always' encodes the default "
                          "profile on the GPU as the CPU's mode 4, untimed and without plan "
                          "reuse, and the entropy profile as payload mode 1, about half the "
                          "ratio)";
    } else {
      KVPOOL_LOG(INFO) << "gpu_encode: always: every put with a CUDA encoder encodes on the GPU "
                          "(kvpool's default profile as mode 4 without plan reuse, its entropy "
                          "profile as payload mode 1)";
      if (const absl::Status rows = kernels::SelfCheckCudaRowsEncoder(); !rows.ok()) {
        KVPOOL_LOG(ERROR) << "kvpool's mode 4 GPU encoder failed its self-check, the default "
                             "profile encodes on the CPU: "
                          << rows;
      }
    }
  }
  d->service_ = std::make_unique<KvPoolService>(service_options, d->store_.get(),
                                                d->metrics_.get(), d->codec_executor_.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(d->service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  d->server_ = builder.BuildAndStart();
  if (d->server_ == nullptr || bound_port == 0) {
    if (d->server_) d->server_->Shutdown();
    d->server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen,
                                               " (address in use or not local?)"));
  }
  d->grpc_address_ = absl::StrCat(grpc_hp->host, ":", bound_port);
  grpc::HealthCheckServiceInterface* health = d->server_->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(v1::KvPool::service_full_name(), true);
  return d;
}

Daemon::~Daemon() {
  Shutdown(absl::Seconds(10));
  if (grpc_shutdown_.joinable()) grpc_shutdown_.join();
  exposer_.reset();  // Stopping civetweb takes ~1 s; /metrics stays up until here.
}

void Daemon::Shutdown(absl::Duration drain) {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (server_ != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    const absl::Time deadline = absl::Now() + drain;
    grpc_shutdown_ = std::thread([this, deadline] {
      server_->Shutdown(absl::ToChronoTime(deadline));
      server_->Wait();
    });
    // Calls gRPC accepted just before the shutdown may reach their handler a moment later:
    // give them kDispatchGrace to show up in the in-flight count.
    constexpr absl::Duration kDispatchGrace = absl::Milliseconds(100);
    absl::SleepFor(std::min(kDispatchGrace, drain));
    service_->WaitUntilIdle(deadline);
  }
}

}  // namespace kvpool::server
