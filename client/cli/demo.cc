// `kvpool demo`: a short serving-shaped workload against a running kvpoold. Requests share a
// system-prompt prefix and each adds its own blocks. Prefill: look up the prefix, put only the
// missing blocks. Decode: look up again and get every block, checking each byte.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/cli/commands.h"
#include "client/client.h"
#include "client/layout.h"
#include "client/synthetic.h"
#include "common/half.h"
#include "common/block_key.h"
#include "common/byte_size.h"
#include "common/status_macros.h"

namespace kvpool::cli {
namespace {

// Deterministic block bytes derived from the key, so the decode side can check them.
void FillBlock(const BlockKey& key, uint8_t* out, uint64_t n) {
  uint64_t seed;
  std::memcpy(&seed, key.bytes.data(), sizeof(seed));
  std::mt19937_64 rng(seed);
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(out + i, &v, 8);
  }
  for (; i < n; ++i) out[i] = static_cast<uint8_t>(rng());
}

// Relative L2 error of fp16 blocks `b` against `a`.
double RelL2(const std::string& a, const std::string& b) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(a.data());
  const uint16_t* y = reinterpret_cast<const uint16_t*>(b.data());
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size() / 2 && i < b.size() / 2; ++i) {
    const double d = double(Fp16ToFloat(y[i])) - Fp16ToFloat(x[i]);
    err += d * d;
    ref += double(Fp16ToFloat(x[i])) * Fp16ToFloat(x[i]);
  }
  return ref > 0 ? std::sqrt(err / ref) : 0;
}

// One synthetic sequence of `blocks` blocks stored with several codecs: what each stores, what
// a get moves and how close the decoded cache is.
absl::Status CodecPhase(client::Client& client, const KvSpec& base, uint32_t blocks,
                        uint64_t seed) {
  client::SyntheticOptions g;
  g.num_layers = base.num_layers;
  g.num_kv_heads = base.num_kv_heads;
  g.head_dim = base.head_dim;
  g.tokens = uint64_t{blocks} * base.tokens_per_block;
  g.seed = seed;
  const std::string sequence = client::SyntheticKv(g);
  std::string data(uint64_t{blocks} * base.BlockBytes(), '\0');
  client::SequenceToBlocks(base, {reinterpret_cast<const uint8_t*>(sequence.data()), sequence.size()},
                           g.tokens, blocks, {reinterpret_cast<uint8_t*>(data.data()), data.size()});
  const std::vector<uint32_t> tokens = client::SyntheticTokenIds(g.tokens, 32000, seed);
  KVPOOL_ASSIGN_OR_RETURN(std::vector<BlockKey> keys, ComputeBlockKeys(tokens, base.tokens_per_block));
  std::cout << absl::StrFormat("codecs: one synthetic %d-block sequence (%s), stored three ways\n",
                               blocks, FormatBytes(data.size()));
  const CodecParams codecs[] = {CodecParams{CodecId::kRaw}, CodecParams{CodecId::kKivi, 4, 0, 32},
                                CodecParams{CodecId::kKvpool, 0, 0, 0, 0.05f}};
  for (const CodecParams& codec : codecs) {
    KvSpec spec = base;
    spec.model_id = absl::StrCat(base.model_id, "-", CodecName(codec.codec));
    client::PutOptions put;
    put.codec = codec;
    absl::Time t0 = absl::Now();
    KVPOOL_RETURN_IF_ERROR(
        client.Put(spec, keys, {reinterpret_cast<const uint8_t*>(data.data()), data.size()}, put)
            .status());
    const absl::Duration put_time = absl::Now() - t0;
    t0 = absl::Now();
    KVPOOL_ASSIGN_OR_RETURN(client::GetResult got,
                            client.Get({spec.model_id, spec.tokens_per_block}, keys));
    const absl::Duration get_time = absl::Now() - t0;
    std::cout << absl::StrFormat(
        "  %-14s %9s on the wire (%5.2fx)  rel L2 error %.4f  put %4.0f ms  get %4.0f ms\n",
        codec.codec == CodecId::kKivi ? "kivi-4" : codec.codec == CodecId::kKvpool ? "kvpool e=0.05" : "raw",
        FormatBytes(got.wire_bytes), double(data.size()) / got.wire_bytes, RelL2(data, got.data),
        absl::ToDoubleMilliseconds(put_time), absl::ToDoubleMilliseconds(get_time));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunDemo(const CliOptions& o) {
  // Llama-3-8B's cache shape: 32 layers, 8 KV heads of 128; 16-token blocks are 2 MiB.
  KvSpec spec{"demo-llama-3-8b", 32, 8, 128, DType::kFp16, 16};
  const uint64_t block_bytes = spec.BlockBytes();
  client::ClientOptions options;
  options.server = o.server;
  options.deadline = o.deadline;
  KVPOOL_ASSIGN_OR_RETURN(auto client, client::Client::Create(options));
  KVPOOL_RETURN_IF_ERROR(client->WaitUntilReady(absl::Seconds(10)));
  const client::Namespace ns{spec.model_id, spec.tokens_per_block};
  // This phase checks every byte, so it stores raw; the codec phase below shows compression.
  client::PutOptions raw;
  raw.codec = CodecParams{CodecId::kRaw};
  std::cout << absl::StrFormat(
      "demo: %d requests, each %d shared + %d own blocks of %s (%s), stored raw\n", o.requests,
      o.shared_blocks, o.unique_blocks, FormatBytes(block_bytes), spec.DebugString());

  std::mt19937_64 rng(o.seed);
  std::vector<uint32_t> system_prompt(uint64_t{o.shared_blocks} * spec.tokens_per_block);
  for (uint32_t& t : system_prompt) t = rng() % 32000;
  uint64_t put_blocks = 0, put_bytes = 0, reused = 0, got_bytes = 0, lookups = 0, hits = 0;
  absl::Duration put_time, get_time;
  std::string buffer;
  const bool tty = isatty(STDOUT_FILENO);
  for (uint32_t r = 0; r < o.requests; ++r) {
    std::vector<uint32_t> tokens = system_prompt;
    for (uint64_t i = 0; i < uint64_t{o.unique_blocks} * spec.tokens_per_block; ++i) {
      tokens.push_back(rng() % 32000);
    }
    KVPOOL_ASSIGN_OR_RETURN(std::vector<BlockKey> keys,
                            ComputeBlockKeys(tokens, spec.tokens_per_block));
    // Prefill: reuse the stored prefix, compute (here: synthesise) and put the rest.
    KVPOOL_ASSIGN_OR_RETURN(client::LookupResult hit, client->Lookup(ns, keys));
    lookups += keys.size();
    hits += hit.hit_prefix_blocks;
    reused += hit.hit_prefix_blocks;
    const std::vector<BlockKey> missing(keys.begin() + hit.hit_prefix_blocks, keys.end());
    buffer.resize(missing.size() * block_bytes);
    for (size_t i = 0; i < missing.size(); ++i) {
      FillBlock(missing[i], reinterpret_cast<uint8_t*>(buffer.data()) + i * block_bytes,
                block_bytes);
    }
    absl::Time t0 = absl::Now();
    KVPOOL_ASSIGN_OR_RETURN(
        client::PutResult put,
        client->Put(spec, missing, {reinterpret_cast<const uint8_t*>(buffer.data()), buffer.size()},
                    raw));
    put_time += absl::Now() - t0;
    put_blocks += missing.size();
    put_bytes += put.bytes_sent;
    // Decode: fetch the whole sequence and check every byte.
    t0 = absl::Now();
    KVPOOL_ASSIGN_OR_RETURN(client::GetResult got, client->Get(ns, keys));
    get_time += absl::Now() - t0;
    if (got.hit_prefix_blocks != keys.size()) {
      return absl::InternalError(absl::StrFormat("request %d: only %d of %d blocks came back", r,
                                                 got.hit_prefix_blocks, keys.size()));
    }
    std::string expected(block_bytes, '\0');
    for (size_t i = 0; i < keys.size(); ++i) {
      FillBlock(keys[i], reinterpret_cast<uint8_t*>(expected.data()), block_bytes);
      if (got.data.compare(i * block_bytes, block_bytes, expected) != 0) {
        return absl::DataLossError(absl::StrFormat("request %d block %d: bytes differ", r, i));
      }
    }
    got_bytes += got.data.size();
    const uint32_t every = std::max<uint32_t>(1, o.requests / 4);
    if (!tty && (r + 1) % every != 0 && r + 1 != o.requests) continue;
    std::cout << absl::StrFormat("%s  request %d/%d: prefix hit %d/%d blocks", tty ? "\r" : "", r + 1, o.requests,
                                 hit.hit_prefix_blocks, keys.size())
              << (tty ? "" : "\n") << std::flush;
  }
  if (tty) std::cout << "\n";
  KVPOOL_RETURN_IF_ERROR(CodecPhase(*client, spec, 12, o.seed));
  KVPOOL_ASSIGN_OR_RETURN(client::PoolStats stats, client->Stats());
  auto rate = [](uint64_t bytes, absl::Duration d) {
    const double s = absl::ToDoubleSeconds(d);
    return s > 0 ? bytes / s / 1e9 : 0.0;
  };
  std::cout << absl::StrFormat(
      "summary:\n"
      "  put      %d blocks, %s in %.2f s (%.2f GB/s)\n"
      "  reused   %d blocks from the pool instead of recomputing them\n"
      "  lookups  %d keys, %d hits (%.1f%%)\n"
      "  get      %s in %.2f s (%.2f GB/s), every byte verified\n"
      "  pool     %d blocks, %s stored for %s of KV (capacity %s)\n",
      put_blocks, FormatBytes(put_bytes), absl::ToDoubleSeconds(put_time),
      rate(put_bytes, put_time), reused, lookups, hits, lookups ? 100.0 * hits / lookups : 0.0,
      FormatBytes(got_bytes), absl::ToDoubleSeconds(get_time), rate(got_bytes, get_time),
      stats.blocks, FormatBytes(stats.stored_bytes), FormatBytes(stats.logical_bytes),
      FormatBytes(stats.capacity_bytes));
  return absl::OkStatus();
}

}  // namespace kvpool::cli
