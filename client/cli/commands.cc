#include "client/cli/commands.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/layout.h"
#include "client/synthetic.h"
#include "common/block_key.h"
#include "common/byte_size.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "kernels/codec.h"

namespace kvpool::cli {
namespace {

absl::StatusOr<std::unique_ptr<client::Client>> Connect(const CliOptions& o) {
  client::ClientOptions options;
  options.server = o.server;
  options.deadline = o.deadline;
  return client::Client::Create(options);
}

absl::Status RequireNamespace(const CliOptions& o) {
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.tokens_per_block == 0) return absl::InvalidArgumentError("--tokens-per-block is required");
  if (o.token_ids.empty()) return absl::InvalidArgumentError("--token-ids is required");
  return absl::OkStatus();
}

// Token ids from --token-ids and their chained block keys.
absl::StatusOr<std::pair<std::vector<uint32_t>, std::vector<BlockKey>>> LoadKeys(
    const CliOptions& o) {
  KVPOOL_RETURN_IF_ERROR(RequireNamespace(o));
  KVPOOL_ASSIGN_OR_RETURN(NpyArray ids_npy, ReadNpy(o.token_ids));
  KVPOOL_ASSIGN_OR_RETURN(std::vector<uint32_t> ids, NpyToTokenIds(ids_npy));
  KVPOOL_ASSIGN_OR_RETURN(std::vector<BlockKey> keys,
                          ComputeBlockKeys(ids, o.tokens_per_block, o.extra_key));
  if (keys.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(o.token_ids, " has ", ids.size(),
                                                   " token ids, less than one block of ",
                                                   o.tokens_per_block));
  }
  return std::make_pair(std::move(ids), std::move(keys));
}

}  // namespace

absl::StatusOr<CodecParams> CodecFromFlags(const CliOptions& o) {
  KVPOOL_ASSIGN_OR_RETURN(CodecId id, ParseCodecName(o.codec.empty() ? "kvpool" : o.codec));
  if (o.bits > 16 || o.group > 65535) {
    return absl::InvalidArgumentError("--bits or --group out of range");
  }
  CodecParams p;
  p.codec = id;
  p.bits = static_cast<uint8_t>(o.bits);
  p.group = static_cast<uint16_t>(o.group);
  p.budget = o.budget;
  if (!o.profile.empty()) {
    if (id != CodecId::kKvpool) {
      return absl::InvalidArgumentError(absl::StrCat("--", o.profile == "fast" ? "fast" : "profile",
                                                     " is a kvpool profile"));
    }
    KVPOOL_ASSIGN_OR_RETURN(p.flags, KvpoolProfileFlags(o.profile));
  }
  return kernels::NormalizeParams(p);
}

namespace {

client::Namespace Ns(const CliOptions& o) { return client::Namespace{o.model, o.tokens_per_block}; }

double Gbps(uint64_t bytes, absl::Duration d) {
  const double s = absl::ToDoubleSeconds(d);
  return s > 0 ? bytes / s / 1e9 : 0;
}

}  // namespace

absl::Status RunPut(const CliOptions& o) {
  if (o.in.empty()) return absl::InvalidArgumentError("--in KV.npy is required");
  client::PutOptions put_options;
  if (!o.codec.empty()) {
    KVPOOL_ASSIGN_OR_RETURN(put_options.codec, CodecFromFlags(o));
  }
  KVPOOL_ASSIGN_OR_RETURN(auto ids_keys, LoadKeys(o));
  const auto& [ids, keys] = ids_keys;
  KVPOOL_ASSIGN_OR_RETURN(NpyArray kv, ReadNpy(o.in));
  if (kv.shape.size() != 5 || kv.shape[1] != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.in, " must have shape [layers][2][tokens][kv_heads][head_dim]"));
  }
  KvSpec spec;
  spec.model_id = o.model;
  spec.num_layers = static_cast<uint32_t>(kv.shape[0]);
  spec.num_kv_heads = static_cast<uint32_t>(kv.shape[3]);
  spec.head_dim = static_cast<uint32_t>(kv.shape[4]);
  spec.tokens_per_block = o.tokens_per_block;
  if (kv.type == NpyType::kFp16) {
    spec.dtype = DType::kFp16;
  } else if (kv.type == NpyType::kBf16) {
    spec.dtype = DType::kBf16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(o.in, " has dtype ", NpyTypeName(kv.type), "; expected fp16 or bf16"));
  }
  KVPOOL_RETURN_IF_ERROR(ValidateSpec(spec));
  const uint64_t tokens = kv.shape[2];
  if (tokens % o.tokens_per_block != 0) {
    return absl::InvalidArgumentError(absl::StrCat(o.in, " has ", tokens,
                                                   " tokens, not a multiple of --tokens-per-block ",
                                                   o.tokens_per_block));
  }
  if (ids.size() != tokens) {
    return absl::InvalidArgumentError(absl::StrCat(o.token_ids, " has ", ids.size(),
                                                   " token ids but ", o.in, " has ", tokens,
                                                   " tokens"));
  }
  std::string blocks(keys.size() * spec.BlockBytes(), '\0');
  client::SequenceToBlocks(spec, {reinterpret_cast<const uint8_t*>(kv.data.data()), kv.data.size()},
                           tokens, keys.size(),
                           {reinterpret_cast<uint8_t*>(blocks.data()), blocks.size()});
  KVPOOL_ASSIGN_OR_RETURN(auto client, Connect(o));
  const absl::Time start = absl::Now();
  KVPOOL_ASSIGN_OR_RETURN(
      client::PutResult r,
      client->Put(spec, keys, {reinterpret_cast<const uint8_t*>(blocks.data()), blocks.size()},
                  put_options));
  const absl::Duration took = absl::Now() - start;
  std::cout << absl::StrFormat(
      "put %d blocks (%d new, %d already present, %d evicted), %s in %.1f ms (%.2f GB/s)\n",
      keys.size(), r.blocks_stored, r.blocks_already_present, r.blocks_evicted,
      FormatBytes(r.bytes_sent), absl::ToDoubleMilliseconds(took), Gbps(r.bytes_sent, took));
  return absl::OkStatus();
}

absl::Status RunLookup(const CliOptions& o) {
  KVPOOL_ASSIGN_OR_RETURN(auto ids_keys, LoadKeys(o));
  const auto& keys = ids_keys.second;
  KVPOOL_ASSIGN_OR_RETURN(auto client, Connect(o));
  KVPOOL_ASSIGN_OR_RETURN(client::LookupResult r, client->Lookup(Ns(o), keys));
  const uint64_t hit_tokens = uint64_t{r.hit_prefix_blocks} * o.tokens_per_block;
  if (o.json) {
    std::cout << absl::StrFormat(
        "{\"hit_prefix_tokens\": %d, \"hit_prefix_blocks\": %d, \"blocks\": %d}\n", hit_tokens,
        r.hit_prefix_blocks, keys.size());
  } else {
    std::cout << hit_tokens << "\n";
  }
  return absl::OkStatus();
}

absl::Status RunGet(const CliOptions& o) {
  if (o.out.empty()) return absl::InvalidArgumentError("--out KV.npy is required");
  KVPOOL_ASSIGN_OR_RETURN(auto ids_keys, LoadKeys(o));
  const auto& keys = ids_keys.second;
  KVPOOL_ASSIGN_OR_RETURN(auto client, Connect(o));
  const absl::Time start = absl::Now();
  client::GetOptions get_options;
  get_options.server_decode = o.server_decode;
  KVPOOL_ASSIGN_OR_RETURN(client::GetResult r, client->Get(Ns(o), keys, get_options));
  const absl::Duration took = absl::Now() - start;
  if (r.hit_prefix_blocks == 0) {
    return absl::NotFoundError("miss: the first block of these token ids is not stored");
  }
  const KvSpec& spec = r.spec;
  const uint64_t tokens = uint64_t{r.hit_prefix_blocks} * spec.tokens_per_block;
  NpyArray out;
  out.type = spec.dtype == DType::kBf16 ? NpyType::kBf16 : NpyType::kFp16;
  out.shape = {spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim};
  out.data.assign(r.hit_prefix_blocks * spec.BlockBytes(), '\0');
  // The leading hit run is the first hit_prefix_blocks blocks of `data`.
  client::BlocksToSequence(spec, {reinterpret_cast<const uint8_t*>(r.data.data()), r.data.size()},
                           r.hit_prefix_blocks, tokens,
                           {reinterpret_cast<uint8_t*>(out.data.data()), out.data.size()});
  KVPOOL_RETURN_IF_ERROR(WriteNpy(o.out, out));
  std::cout << absl::StrFormat(
      "got %d of %d blocks (%d tokens), %s (%s on the wire) in %.1f ms (%.2f GB/s) -> %s\n",
      r.hit_prefix_blocks, keys.size(), tokens, FormatBytes(out.data.size()),
      FormatBytes(r.wire_bytes), absl::ToDoubleMilliseconds(took), Gbps(out.data.size(), took),
      o.out);
  return absl::OkStatus();
}

absl::Status RunDelete(const CliOptions& o) {
  KVPOOL_ASSIGN_OR_RETURN(auto ids_keys, LoadKeys(o));
  KVPOOL_ASSIGN_OR_RETURN(auto client, Connect(o));
  KVPOOL_ASSIGN_OR_RETURN(uint32_t deleted, client->Delete(Ns(o), ids_keys.second));
  std::cout << "deleted " << deleted << " of " << ids_keys.second.size() << " blocks\n";
  return absl::OkStatus();
}

absl::Status RunStats(const CliOptions& o) {
  KVPOOL_ASSIGN_OR_RETURN(auto client, Connect(o));
  KVPOOL_ASSIGN_OR_RETURN(client::PoolStats s, client->Stats());
  auto ratio = [](uint64_t logical, uint64_t stored) {
    return stored ? double(logical) / stored : 0.0;
  };
  if (o.json) {
    std::string codecs;
    for (const client::CodecUsage& c : s.codecs) {
      absl::StrAppend(&codecs, codecs.empty() ? "" : ", ",
                      absl::StrFormat("{\"codec\": \"%s\", \"segments\": %d, \"logical_bytes\": "
                                      "%d, \"stored_bytes\": %d, \"compression_ratio\": %.4f}",
                                      c.codec, c.segments, c.logical_bytes, c.stored_bytes,
                                      ratio(c.logical_bytes, c.stored_bytes)));
    }
    std::cout << absl::StrFormat(
        "{\"blocks\": %d, \"logical_bytes\": %d, \"stored_bytes\": %d, \"capacity_bytes\": %d, "
        "\"compression_ratio\": %.4f, \"evictions\": %d, \"lookup_hits\": %d, "
        "\"lookup_misses\": %d, \"namespaces\": %d, \"version\": \"%s\", \"segments\": %d, "
        "\"segment_refs\": %d, \"fused_segments\": %d, \"representatives\": %d, "
        "\"fusion_ratio\": %.4f, \"codecs\": [%s]}\n",
        s.blocks, s.logical_bytes, s.stored_bytes, s.capacity_bytes,
        ratio(s.logical_bytes, s.stored_bytes), s.evictions, s.lookup_hits, s.lookup_misses,
        s.namespaces, s.version, s.segments, s.segment_refs, s.fused_segments,
        s.representatives, ratio(s.segment_refs, s.segments), codecs);
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "blocks          %d\nlogical bytes   %s\nstored bytes    %s\ncapacity        %s\n"
      "evictions       %d\nlookup hits     %d\nlookup misses   %d\nnamespaces      %d\n"
      "version         %s\n",
      s.blocks, FormatBytes(s.logical_bytes), FormatBytes(s.stored_bytes),
      FormatBytes(s.capacity_bytes), s.evictions, s.lookup_hits, s.lookup_misses, s.namespaces,
      s.version);
  std::cout << absl::StrFormat(
      "segments        %d stored for %d used (fusion ratio %.2fx), %d fused, %d representatives\n"
      "compression     %.2fx (logical / stored bytes, codec and fusion together)\n",
      s.segments, s.segment_refs, ratio(s.segment_refs, s.segments), s.fused_segments,
      s.representatives, ratio(s.logical_bytes, s.stored_bytes));
  for (const client::CodecUsage& c : s.codecs) {
    std::cout << absl::StrFormat("codec %-9s %d segments, %s -> %s (%.2fx)\n", c.codec,
                                 c.segments, FormatBytes(c.logical_bytes),
                                 FormatBytes(c.stored_bytes), ratio(c.logical_bytes, c.stored_bytes));
  }
  return absl::OkStatus();
}

absl::Status RunGen(const CliOptions& o) {
  if (o.out.empty()) return absl::InvalidArgumentError("--out KV.npy is required");
  client::SyntheticOptions g;
  g.num_layers = o.layers;
  g.num_kv_heads = o.kv_heads;
  g.head_dim = o.head_dim;
  g.tokens = o.tokens;
  KVPOOL_ASSIGN_OR_RETURN(g.dtype, ParseDType(o.dtype));
  g.seed = o.seed;
  g.vocab = o.vocab;
  g.key_rank = o.key_rank;
  g.value_rank = o.value_rank;
  g.noise = o.noise;
  g.outlier_channels = o.outlier_channels;
  if (!(o.noise >= 0 && o.noise <= 1)) return absl::InvalidArgumentError("--noise must be in [0, 1]");
  KvSpec check{"gen", g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, 1};
  KVPOOL_RETURN_IF_ERROR(ValidateSpec(check));
  if (g.tokens == 0) return absl::InvalidArgumentError("--tokens must be positive");
  NpyArray kv;
  kv.type = g.dtype == DType::kBf16 ? NpyType::kBf16 : NpyType::kFp16;
  kv.shape = {g.num_layers, 2, g.tokens, g.num_kv_heads, g.head_dim};
  kv.data = client::SyntheticKv(g);
  KVPOOL_RETURN_IF_ERROR(WriteNpy(o.out, kv));
  std::cout << absl::StrFormat("wrote synthetic KV [%d][2][%d][%d][%d] %s (%s) -> %s\n",
                               g.num_layers, g.tokens, g.num_kv_heads, g.head_dim,
                               DTypeName(g.dtype), FormatBytes(kv.data.size()), o.out);
  if (!o.token_ids.empty()) {
    NpyArray ids;
    ids.type = NpyType::kInt32;
    ids.shape = {g.tokens};
    const std::vector<uint32_t> v = client::SyntheticTokenIds(g.tokens, g.vocab, g.seed);
    ids.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    KVPOOL_RETURN_IF_ERROR(WriteNpy(o.token_ids, ids));
    std::cout << absl::StrFormat("wrote %d token ids -> %s\n", g.tokens, o.token_ids);
  }
  return absl::OkStatus();
}

}  // namespace kvpool::cli
