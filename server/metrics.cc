#include "server/metrics.h"

#include <string>

#include "absl/strings/ascii.h"
#include "prometheus/counter.h"

namespace kvpool::server {
namespace {

// grpc::StatusCode as its canonical name ("OK", "INVALID_ARGUMENT", ...).
const char* CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",           "CANCELLED",        "UNKNOWN",         "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",  "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",        "UNAVAILABLE",     "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  // 50 us .. ~13 s, factor 2.
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 50e-6; v < 15; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& lookups = prometheus::BuildCounter()
                      .Name("kvpool_lookups_total")
                      .Help("Block keys looked up, by result")
                      .Register(*registry_);
  lookup_hits_ = &lookups.Add({{"result", "hit"}});
  lookup_misses_ = &lookups.Add({{"result", "miss"}});
  auto counter = [this](const std::string& name, const std::string& help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Add({});
  };
  auto gauge = [this](const std::string& name, const std::string& help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_).Add({});
  };
  blocks_put_ = counter("kvpool_put_blocks_total", "Blocks received by Put");
  bytes_put_ = counter("kvpool_put_bytes_total", "Block bytes received by Put");
  blocks_got_ = counter("kvpool_get_blocks_total", "Blocks served by Get");
  bytes_got_ = counter("kvpool_get_bytes_total", "Block bytes sent by Get (encoded unless server-decoded)");
  evictions_ = counter("kvpool_evictions_total", "Blocks evicted from the host tier");
  evicted_bytes_ = counter("kvpool_evicted_bytes_total", "Bytes evicted from the host tier");
  deletes_ = counter("kvpool_deleted_blocks_total", "Blocks removed by Delete");
  checksum_failures_ = counter("kvpool_checksum_failures_total",
                               "Stored segments that failed their checksum on read");
  calls_in_flight_ = gauge("kvpool_grpc_calls_in_flight",
                           "gRPC calls being handled (SIGTERM drains them before exiting)");
  blocks_ = gauge("kvpool_blocks", "Blocks stored");
  logical_bytes_ = gauge("kvpool_logical_bytes", "Bytes the stored blocks decode to");
  stored_bytes_ = gauge("kvpool_stored_bytes", "Bytes the stored blocks occupy in the host tier");
  capacity_bytes_ = gauge("kvpool_capacity_bytes", "Host tier capacity in bytes");
  segments_ = gauge("kvpool_segments", "Distinct encoded segments stored (content-addressed)");
  segment_refs_ = gauge("kvpool_segment_refs", "Segments the stored blocks use (blocks x 2 x layers)");
  fused_segments_ =
      gauge("kvpool_fused_segments", "Segments of stored blocks that use a fusion representative");
  representatives_ = gauge("kvpool_fusion_representatives", "Key segments in the fusion index");
  fusion_ratio_ = gauge("kvpool_fusion_ratio",
                        "Segments the blocks use / distinct segments stored (1 without sharing)");
  auto gauge_family = [this](const std::string& name, const std::string& help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
  };
  codec_segments_ = gauge_family("kvpool_codec_segments", "Segments stored, by codec");
  auto& plans = prometheus::BuildCounter()
                    .Name("kvpool_codec_plan_segments_total")
                    .Help(
                        "kvpool segments coded with a plan of their own (planned), their "
                        "stream's (reused), or planned afresh after their stream's missed "
                        "(replaced)")
                    .Register(*registry_);
  plan_segments_[0] = &plans.Add({{"outcome", "planned"}});
  plan_segments_[1] = &plans.Add({{"outcome", "reused"}});
  plan_segments_[2] = &plans.Add({{"outcome", "replaced"}});
  plan_cache_bytes_ = gauge("kvpool_codec_plan_cache_bytes",
                            "Heap bytes of the plans the daemon's plan caches hold (outside "
                            "host_memory)");
  codec_logical_bytes_ =
      gauge_family("kvpool_codec_logical_bytes", "Bytes the stored segments decode to, by codec");
  codec_stored_bytes_ =
      gauge_family("kvpool_codec_stored_bytes", "Bytes the stored segments occupy, by codec");
  compression_ratio_ = gauge_family("kvpool_compression_ratio",
                                    "Logical bytes / stored bytes of the stored segments, by codec");
  requests_ = &prometheus::BuildCounter()
                   .Name("kvpool_requests_total")
                   .Help("gRPC requests finished, by method and status code")
                   .Register(*registry_);
  latency_ = &prometheus::BuildHistogram()
                  .Name("kvpool_request_duration_seconds")
                  .Help("gRPC request latency, by method")
                  .Register(*registry_);
}

void Metrics::AddLookups(uint64_t hits, uint64_t misses) {
  lookup_hits_->Increment(static_cast<double>(hits));
  lookup_misses_->Increment(static_cast<double>(misses));
}
void Metrics::AddPut(uint64_t blocks, uint64_t bytes) {
  blocks_put_->Increment(static_cast<double>(blocks));
  bytes_put_->Increment(static_cast<double>(bytes));
}
void Metrics::AddGet(uint64_t blocks, uint64_t bytes) {
  blocks_got_->Increment(static_cast<double>(blocks));
  bytes_got_->Increment(static_cast<double>(bytes));
}
void Metrics::AddEvictions(uint64_t blocks, uint64_t bytes) {
  evictions_->Increment(static_cast<double>(blocks));
  evicted_bytes_->Increment(static_cast<double>(bytes));
}
void Metrics::AddDeletes(uint64_t blocks) { deletes_->Increment(static_cast<double>(blocks)); }
void Metrics::AddChecksumFailure() { checksum_failures_->Increment(); }

void Metrics::ObserveRequest(absl::string_view method, grpc::StatusCode code, double seconds) {
  const std::string m(method);
  requests_->Add({{"method", m}, {"code", CodeName(code)}}).Increment();
  static const prometheus::Histogram::BucketBoundaries kBuckets = LatencyBuckets();
  latency_->Add({{"method", m}}, kBuckets).Observe(seconds);
}

void Metrics::SetCodecState(absl::string_view codec, uint64_t segments, uint64_t logical_bytes,
                            uint64_t stored_bytes) {
  const prometheus::Labels labels{{"codec", std::string(codec)}};
  codec_segments_->Add(labels).Set(static_cast<double>(segments));
  codec_logical_bytes_->Add(labels).Set(static_cast<double>(logical_bytes));
  codec_stored_bytes_->Add(labels).Set(static_cast<double>(stored_bytes));
  compression_ratio_->Add(labels).Set(
      stored_bytes ? static_cast<double>(logical_bytes) / stored_bytes : 0.0);
}

void Metrics::SetCallsInFlight(int calls) { calls_in_flight_->Set(calls); }

void Metrics::SetStoreState(uint64_t blocks, uint64_t logical_bytes, uint64_t stored_bytes,
                            uint64_t capacity_bytes) {
  blocks_->Set(static_cast<double>(blocks));
  logical_bytes_->Set(static_cast<double>(logical_bytes));
  stored_bytes_->Set(static_cast<double>(stored_bytes));
  capacity_bytes_->Set(static_cast<double>(capacity_bytes));
}

void Metrics::SetFusionState(uint64_t segments, uint64_t segment_refs, uint64_t fused_refs,
                             uint64_t representatives) {
  segments_->Set(static_cast<double>(segments));
  segment_refs_->Set(static_cast<double>(segment_refs));
  fused_segments_->Set(static_cast<double>(fused_refs));
  representatives_->Set(static_cast<double>(representatives));
  fusion_ratio_->Set(segments > 0 ? double(segment_refs) / double(segments) : 0.0);
}

void Metrics::SetPlanCacheBytes(uint64_t bytes) {
  plan_cache_bytes_->Set(static_cast<double>(bytes));
}

void Metrics::SetPlanCounts(uint64_t planned, uint64_t reused, uint64_t replaced) {
  const uint64_t totals[3] = {planned, reused, replaced};
  absl::MutexLock lock(&plan_mu_);
  for (int i = 0; i < 3; ++i) {
    if (totals[i] > plan_seen_[i]) {
      plan_segments_[i]->Increment(static_cast<double>(totals[i] - plan_seen_[i]));
      plan_seen_[i] = totals[i];
    }
  }
}

}  // namespace kvpool::server
