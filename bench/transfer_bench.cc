#include "bench/transfer_bench.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "bench/redis_client.h"
#include "client/client.h"
#include "common/block_key.h"
#include "common/ready_file.h"
#include "common/status_macros.h"
#include "common/subprocess.h"

namespace kvpool::bench {
namespace {

// Llama-3-8B's cache shape with 16-token blocks: 32 x 2 x 16 x 8 x 128 x 2 B = 2 MiB.
const KvSpec kSpec{"bench-llama-3-8b", 32, 8, 128, DType::kFp16, 16};

// Median GB/s of `rounds` runs of `fn`, each moving `bytes`.
absl::StatusOr<double> MedianGbps(uint32_t rounds, uint64_t bytes,
                                  const std::function<absl::Status()>& fn) {
  std::vector<double> rates;
  for (uint32_t r = 0; r < rounds; ++r) {
    const absl::Time t0 = absl::Now();
    KVPOOL_RETURN_IF_ERROR(fn());
    rates.push_back(bytes / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

// A TCP port that was free a moment ago (for redis-server, which cannot report an OS-picked one).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

struct Services {
  std::unique_ptr<Subprocess> kvpoold;
  std::unique_ptr<Subprocess> redis;
  std::string dir;
  std::string server;
  std::string redis_address;
  ~Services() {
    if (kvpoold) kvpoold->Signal(SIGTERM).IgnoreError();
    if (redis) redis->Signal(SIGTERM).IgnoreError();
    if (kvpoold) kvpoold->Wait(absl::Seconds(10)).IgnoreError();
    if (redis) redis->Wait(absl::Seconds(10)).IgnoreError();
    if (!dir.empty()) RunCommand({"rm", "-rf", dir}, absl::Seconds(10), nullptr).IgnoreError();
  }
};

absl::Status StartServices(const TransferOptions& o, Services* s) {
  char tmpl[] = "/tmp/kvpool-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  s->dir = tmpl;
  s->server = o.server;
  if (s->server.empty()) {
    Subprocess::Options d;
    d.argv = {ExecutableDir() + "/kvpoold", "--listen=127.0.0.1:0", "--metrics-listen=off",
              "--host-memory=4GiB", "--data-dir=" + s->dir + "/data",
              "--ready-file=" + s->dir + "/ready.json", "--log-level=warning"};
    KVPOOL_ASSIGN_OR_RETURN(s->kvpoold, Subprocess::Start(d));
    KVPOOL_RETURN_IF_ERROR(WaitForFile(s->dir + "/ready.json", absl::Seconds(30), s->kvpoold.get()));
    KVPOOL_ASSIGN_OR_RETURN(ReadyInfo info, ReadReadyFile(s->dir + "/ready.json"));
    s->server = info.grpc;
  }
  s->redis_address = o.redis;
  if (s->redis_address.empty()) {
    const int port = FreePort();
    Subprocess::Options r;
    r.argv = {"redis-server", "--bind", "127.0.0.1", "--port", absl::StrCat(port), "--save", "",
              "--appendonly", "no", "--dir", s->dir, "--proto-max-bulk-len", "1gb"};
    r.stdout_path = s->dir + "/redis.log";
    auto redis = Subprocess::Start(r);
    if (!redis.ok()) return redis.status();
    s->redis = std::move(*redis);
    s->redis_address = absl::StrCat("127.0.0.1:", port);
    // redis-server has no ready file: retry connecting, bounded.
    for (int i = 0;; ++i) {
      auto c = RedisClient::Connect(s->redis_address);
      if (c.ok() && (*c)->Ping().ok()) break;
      if (!s->redis->Running()) {
        return absl::UnavailableError("redis-server exited (is it installed? scripts/install-deps.sh)");
      }
      if (i > 500) return absl::UnavailableError("redis-server did not start within 5 s");
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunTransfer(const TransferOptions& o) {
  if (o.blocks == 0 || o.batch == 0 || o.rounds == 0) {
    return absl::InvalidArgumentError("--blocks, --batch and --rounds must be positive");
  }
  Services services;
  KVPOOL_RETURN_IF_ERROR(StartServices(o, &services));
  const uint64_t bb = kSpec.BlockBytes();
  const uint64_t total = uint64_t{o.blocks} * bb;
  std::string data(total, '\0');
  std::mt19937_64 rng(42);
  for (size_t i = 0; i + 8 <= data.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(&data[i], &v, 8);
  }
  std::vector<uint32_t> tokens(uint64_t{o.blocks} * kSpec.tokens_per_block);
  for (uint32_t& t : tokens) t = rng() % 32000;
  KVPOOL_ASSIGN_OR_RETURN(std::vector<BlockKey> keys, ComputeBlockKeys(tokens, 16));
  const auto bytes = [&](uint64_t first, uint64_t n) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()) + first * bb,
                                     n * bb);
  };

  // Anchor: memcpy of the same bytes, block by block.
  std::string dst(bb, '\0');
  KVPOOL_ASSIGN_OR_RETURN(double memcpy_gbps, MedianGbps(o.rounds, total, [&] {
    for (uint64_t i = 0; i < o.blocks; ++i) std::memcpy(dst.data(), data.data() + i * bb, bb);
    return absl::OkStatus();
  }));

  client::ClientOptions copts;
  copts.server = services.server;
  KVPOOL_ASSIGN_OR_RETURN(auto client, client::Client::Create(copts));
  KVPOOL_RETURN_IF_ERROR(client->WaitUntilReady(absl::Seconds(10)));
  const client::Namespace ns{kSpec.model_id, kSpec.tokens_per_block};
  auto delete_all = [&] { return client->Delete(ns, keys).status(); };
  KVPOOL_RETURN_IF_ERROR(delete_all());
  // kvpool put, one block per call: delete first so every round stores anew.
  double put1 = 0, putb = 0;
  {
    std::vector<double> rates;
    for (uint32_t r = 0; r < o.rounds; ++r) {
      KVPOOL_RETURN_IF_ERROR(delete_all());
      const absl::Time t0 = absl::Now();
      for (uint64_t i = 0; i < o.blocks; ++i) {
        KVPOOL_RETURN_IF_ERROR(client->Put(kSpec, {&keys[i], 1}, bytes(i, 1)).status());
      }
      rates.push_back(total / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
    }
    std::sort(rates.begin(), rates.end());
    put1 = rates[rates.size() / 2];
    rates.clear();
    for (uint32_t r = 0; r < o.rounds; ++r) {
      KVPOOL_RETURN_IF_ERROR(delete_all());
      const absl::Time t0 = absl::Now();
      for (uint64_t i = 0; i < o.blocks; i += o.batch) {
        const uint64_t n = std::min<uint64_t>(o.batch, o.blocks - i);
        KVPOOL_RETURN_IF_ERROR(client->Put(kSpec, {&keys[i], n}, bytes(i, n)).status());
      }
      rates.push_back(total / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
    }
    std::sort(rates.begin(), rates.end());
    putb = rates[rates.size() / 2];
  }
  KVPOOL_ASSIGN_OR_RETURN(double get1, MedianGbps(o.rounds, total, [&]() -> absl::Status {
    for (uint64_t i = 0; i < o.blocks; ++i) {
      KVPOOL_ASSIGN_OR_RETURN(client::GetResult g, client->Get(ns, {&keys[i], 1}));
      if (g.data.size() != bb || std::memcmp(g.data.data(), data.data() + i * bb, bb) != 0) {
        return absl::DataLossError("kvpool get returned other bytes");
      }
    }
    return absl::OkStatus();
  }));
  KVPOOL_ASSIGN_OR_RETURN(double getb, MedianGbps(o.rounds, total, [&]() -> absl::Status {
    for (uint64_t i = 0; i < o.blocks; i += o.batch) {
      const uint64_t n = std::min<uint64_t>(o.batch, o.blocks - i);
      KVPOOL_ASSIGN_OR_RETURN(client::GetResult g, client->Get(ns, {&keys[i], n}));
      if (g.data.size() != n * bb) return absl::DataLossError("kvpool get: short");
    }
    return absl::OkStatus();
  }));

  KVPOOL_ASSIGN_OR_RETURN(auto redis, RedisClient::Connect(services.redis_address));
  KVPOOL_ASSIGN_OR_RETURN(double redis_set, MedianGbps(o.rounds, total, [&]() -> absl::Status {
    for (uint64_t i = 0; i < o.blocks; ++i) {
      KVPOOL_RETURN_IF_ERROR(redis->Set(keys[i].Hex(), absl::string_view(data.data() + i * bb, bb)));
    }
    return absl::OkStatus();
  }));
  std::string value;
  KVPOOL_ASSIGN_OR_RETURN(double redis_get, MedianGbps(o.rounds, total, [&]() -> absl::Status {
    for (uint64_t i = 0; i < o.blocks; ++i) {
      KVPOOL_RETURN_IF_ERROR(redis->Get(keys[i].Hex(), &value));
      if (value.size() != bb || std::memcmp(value.data(), data.data() + i * bb, bb) != 0) {
        return absl::DataLossError("Redis GET returned other bytes");
      }
    }
    return absl::OkStatus();
  }));

  if (o.json) {
    std::cout << absl::StrFormat(
        "{\"block_bytes\": %d, \"blocks\": %d, \"rounds\": %d, \"memcpy_gbps\": %.3f, "
        "\"kvpool_put_gbps\": %.3f, \"kvpool_put_batch_gbps\": %.3f, \"kvpool_get_gbps\": %.3f, "
        "\"kvpool_get_batch_gbps\": %.3f, \"redis_set_gbps\": %.3f, \"redis_get_gbps\": %.3f, "
        "\"batch\": %d}\n",
        bb, o.blocks, o.rounds, memcpy_gbps, put1, putb, get1, getb, redis_set, redis_get,
        o.batch);
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "transfer: %d blocks of %d bytes (2 MiB) per round, median of %d rounds, loopback\n"
      "  %-34s %8.2f GB/s\n"
      "  %-34s %8.2f GB/s   (%.2fx Redis SET)\n"
      "  %-34s %8.2f GB/s\n"
      "  %-34s %8.2f GB/s   (%.2fx Redis GET)\n"
      "  %-34s %8.2f GB/s\n"
      "  %-34s %8.2f GB/s\n"
      "  %-34s %8.2f GB/s   (anchor)\n",
      o.blocks, bb, o.rounds, "kvpool put (1 block/call)", put1, "kvpool put (batch)", putb,
      putb / redis_set, "kvpool get (1 block/call)", get1, "kvpool get (batch)", getb,
      getb / redis_get, "Redis SET (1 value/command)", redis_set, "Redis GET (1 value/command)",
      redis_get, "memcpy", memcpy_gbps);
  return absl::OkStatus();
}

}  // namespace kvpool::bench
