// kvpool::client::Client: the C++ client that serving frameworks link. Puts blocks of KV cache
// into kvpoold, looks up which are stored, gets them back byte for byte, deletes them, and reads
// pool statistics. Bulk bytes move as streamed chunks over gRPC (UCX comes later).
//
// Batch calls take any number of keys; the client splits them into requests of at most
// `max_keys_per_call` keys (and, for Put, `max_put_bytes` bytes), so the daemon's limits are
// never hit by a large batch. Each RPC gets the `deadline` from the options.
//
// Errors are the daemon's gRPC status as absl::Status: InvalidArgument (bad input, names the
// field), ResourceExhausted (over a daemon limit), DataLoss (stored bytes failed a checksum),
// Unavailable (daemon unreachable; retry), DeadlineExceeded.
//
// Thread-safe: one Client may be shared by many threads; calls block until done.
#ifndef KVPOOL_CLIENT_CLIENT_H_
#define KVPOOL_CLIENT_CLIENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/kv_spec.h"

namespace kvpool::v1 {
class KvPool;
}

namespace kvpool::client {

struct ClientOptions {
  std::string server = "127.0.0.1:7470";        // kvpoold's HOST:PORT.
  absl::Duration deadline = absl::Seconds(60);  // Per RPC.
  uint64_t chunk_bytes = uint64_t{1} << 20;     // Data bytes per Put stream message.
  uint32_t max_keys_per_call = 1024;            // Keys per RPC (daemon default limit: 4096).
  uint64_t max_put_bytes = uint64_t{256} << 20; // Data bytes per Put RPC.
  uint64_t max_message_bytes = uint64_t{8} << 20;
  // A get decoded here (not server_decode, not into device memory) whose found blocks come in
  // one call and hold at least this many bytes is written with streaming stores
  // (kernels::StreamingOutput): its bytes go to the caller, not back through this CPU's cache.
  // 0: never. Measured gains: README, Speed.
  uint64_t stream_decoded_gets_from = uint64_t{64} << 20;
};

// The key space of a model at one block size.
struct Namespace {
  std::string model_id;
  uint32_t tokens_per_block = 0;
};

struct LookupResult {
  std::vector<bool> present;       // present[i]: keys[i] is stored.
  uint32_t hit_prefix_blocks = 0;  // Leading run of present keys.
};

struct PutOptions {
  // How the daemon stores the segments; unset: the daemon's configured codec for the model.
  std::optional<CodecParams> codec;
};

struct GetOptions {
  // false (default): the daemon sends encoded segments and the client decodes them (fewer bytes
  // on the wire); true: the daemon decodes and sends canonical block bytes.
  bool server_decode = false;
  // When set: decode the found blocks with the CUDA kernels straight into this device buffer
  // (found blocks in key order, back to back; it must hold keys.size() blocks), and leave
  // GetResult::data empty. Unavailable without a GPU; InvalidArgument with server_decode.
  void* device_dst = nullptr;
  uint64_t device_dst_bytes = 0;
};

struct PutResult {
  uint32_t blocks_stored = 0;
  uint32_t blocks_already_present = 0;
  uint32_t blocks_evicted = 0;
  uint64_t bytes_sent = 0;
};

struct GetResult {
  KvSpec spec;                     // The namespace's spec (empty model_id when unknown).
  std::vector<bool> found;         // found[i]: keys[i]'s block is in `data`.
  uint32_t hit_prefix_blocks = 0;  // Leading run of found keys.
  uint64_t block_bytes = 0;
  std::string data;                // The found blocks, decoded, in key order, concatenated.
  uint64_t wire_bytes = 0;         // Block bytes received (encoded unless server_decode).
};

struct CodecUsage {
  std::string codec;
  uint64_t segments = 0;
  uint64_t logical_bytes = 0;
  uint64_t stored_bytes = 0;
};

struct PoolStats {
  uint64_t blocks = 0;
  uint64_t logical_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t capacity_bytes = 0;
  uint64_t evictions = 0;
  uint64_t lookup_hits = 0;
  uint64_t lookup_misses = 0;
  uint32_t namespaces = 0;
  std::string version;
  std::vector<CodecUsage> codecs;  // Codecs with segments stored now (distinct segments).
  uint64_t segments = 0;           // Distinct encoded segments stored.
  uint64_t segment_refs = 0;       // Segments the stored blocks use.
  uint64_t fused_segments = 0;     // Of those, the ones that use a fusion representative.
  uint64_t representatives = 0;    // Key segments in the online fusion index.
};

class Client {
 public:
  // Creates the channel; does not wait for the daemon (see WaitUntilReady). InvalidArgument for
  // an empty server address.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const ClientOptions& options);
  ~Client();

  // Blocks until the channel is connected or `timeout` passes (Unavailable then).
  absl::Status WaitUntilReady(absl::Duration timeout);

  absl::StatusOr<LookupResult> Lookup(const Namespace& ns, absl::Span<const BlockKey> keys);

  // Stores keys.size() blocks; `data` is the blocks in key order, each spec.BlockBytes() bytes in
  // the canonical layout [layers][2][tokens_per_block][kv_heads][head_dim]. InvalidArgument when
  // data.size() != keys.size() * spec.BlockBytes() (checked before sending anything). A batch
  // larger than one request is sent as several puts; each is all-or-nothing.
  absl::StatusOr<PutResult> Put(const KvSpec& spec, absl::Span<const BlockKey> keys,
                                absl::Span<const uint8_t> data, const PutOptions& options = {});

  // The blocks of the keys that are stored, decoded. DataLoss when a segment fails its checksum
  // (on the daemon or here) or does not match the namespace's shape.
  absl::StatusOr<GetResult> Get(const Namespace& ns, absl::Span<const BlockKey> keys,
                                const GetOptions& options = {});

  // Returns how many of the keys were stored (and are now removed).
  absl::StatusOr<uint32_t> Delete(const Namespace& ns, absl::Span<const BlockKey> keys);

  absl::StatusOr<PoolStats> Stats();

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  absl::StatusOr<PutResult> PutOne(const KvSpec& spec, absl::Span<const BlockKey> keys,
                                   absl::Span<const uint8_t> data, const PutOptions& options);
  // One call's worth of keys; `whole` when they are all of the get's (the result is handed
  // to the caller, not appended to another).
  absl::StatusOr<GetResult> GetOne(const Namespace& ns, absl::Span<const BlockKey> keys,
                                   const GetOptions& options, bool whole);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvpool::client

#endif  // KVPOOL_CLIENT_CLIENT_H_
