#include "bench/codec_bench.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "client/synthetic.h"
#include "common/status_macros.h"
#include "kernels/codec.h"
#include "kernels/codec_bench.h"

namespace kvpool::bench {
namespace {

// Synthetic fp16 KV: 16 layers x 8 heads x 128 dims x 2048 tokens, cut into 256-token segments
// (256 segments of 512 KiB, 128 MiB in all: far beyond L2 and most servers' last-level caches,
// as a daemon's working set is, for the codecs and the memcpy anchor alike), in the order a put of
// consecutive blocks hands them to the daemon: block by block, each block's layers, K then V. Every
// segment holds distinct tokens, so that an encoder keeping plans between the segments of a
// stream (kvpool, PlanCache) meets new data in each, as the daemon does; 16 layers, because
// the codecs' speed varies with each layer's random structure.
constexpr uint32_t kLayers = 16, kHeads = 8, kDim = 128, kTokens = 2048, kSegTokens = 256;

// 64-byte aligned storage, as tensors and pinned staging buffers are (a std::vector's large
// blocks start 16 bytes into a page, so every 32-byte access of a row would straddle lines).
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], AlignedFree> AlignedArray(uint64_t n) {
  void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, n * sizeof(T));
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(p));
}

struct Segments {
  SegmentShape key{kSegTokens, kHeads, kDim, DType::kFp16, SegmentKind::kKey};
  static constexpr uint64_t kElements = uint64_t{kSegTokens} * kHeads * kDim;
  uint64_t count = 0;  // Segment i: all[i * kElements ..]; even = key, odd = value.
  std::unique_ptr<uint16_t[], AlignedFree> all;
  const uint16_t* data(uint64_t i) const { return all.get() + i * kElements; }
  SegmentShape shape(uint64_t i) const {
    SegmentShape s = key;
    s.kind = i % 2 ? SegmentKind::kValue : SegmentKind::kKey;
    return s;
  }
  uint64_t bytes() const { return count * kElements * 2; }
  // The stream (layer and kind) of segment i: its PlanCache.
  static uint64_t stream(uint64_t i) { return i % (2 * kLayers); }
};

Segments MakeSegments() {
  client::SyntheticOptions o;
  o.num_layers = kLayers;
  o.num_kv_heads = kHeads;
  o.head_dim = kDim;
  o.tokens = kTokens;
  const std::string kv = client::SyntheticKv(o);
  const uint16_t* e = reinterpret_cast<const uint16_t*>(kv.data());
  Segments s;
  s.count = uint64_t{kTokens / kSegTokens} * kLayers * 2;
  s.all = AlignedArray<uint16_t>(s.count * Segments::kElements);
  const uint64_t row = uint64_t{kHeads} * kDim;
  uint16_t* d = s.all.get();
  for (uint32_t start = 0; start < kTokens; start += kSegTokens) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        const uint16_t* p = e + ((uint64_t{l} * 2 + kind) * kTokens + start) * row;
        std::memcpy(d, p, Segments::kElements * 2);
        d += Segments::kElements;
      }
    }
  }
  return s;
}

// GB/s of `bytes` per call of fn: repeats for at least `seconds`, best of 3 rounds; `before`
// runs before each round (the memcpy anchor, so that it sees the same moments of a noisy
// machine as the codecs).
absl::StatusOr<double> Rate(double seconds, uint64_t bytes, const std::function<absl::Status()>& fn,
                            const std::function<void()>& before = nullptr) {
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    if (before) before();
    const absl::Time t0 = absl::Now();
    uint64_t calls = 0;
    do {
      KVPOOL_RETURN_IF_ERROR(fn());
      ++calls;
    } while (absl::ToDoubleSeconds(absl::Now() - t0) < seconds / 3);
    best = std::max(best, calls * bytes / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
  }
  return best;
}

std::string Name(const CodecParams& p) {
  switch (p.codec) {
    case CodecId::kRaw: return "raw";
    case CodecId::kKivi: return absl::StrFormat("kivi-%d", p.bits);
    case CodecId::kPackKv: return absl::StrFormat("packkv e=%g", p.budget);
    case CodecId::kKvpool:
      return absl::StrFormat("kvpool%s e=%g", KvpoolProfileSuffix(p), p.budget);
  }
  return "?";
}

}  // namespace

absl::Status RunCodecBench(const CodecBenchOptions& o) {
  bool want_ref = false, want_cpu = false, want_cuda = false;
  for (absl::string_view path : absl::StrSplit(o.paths, ',', absl::SkipWhitespace())) {
    path = absl::StripAsciiWhitespace(path);
    if (path != "ref" && path != "cpu" && path != "cuda") {
      return absl::InvalidArgumentError(
          absl::StrFormat("--paths: unknown path \"%s\" (ref, cpu, cuda)", path));
    }
    (path == "ref" ? want_ref : path == "cpu" ? want_cpu : want_cuda) = true;
  }
  if (!want_ref && !want_cpu && !want_cuda) {
    return absl::InvalidArgumentError("--paths: no path given (ref, cpu, cuda)");
  }
  const Segments segs = MakeSegments();
  const uint64_t total_bytes = segs.bytes();
  auto dst = AlignedArray<uint16_t>(segs.count * Segments::kElements);
  auto copy_all = [&] {
    for (uint64_t i = 0; i < segs.count; ++i) {
      std::memcpy(dst.get() + i * Segments::kElements, segs.data(i), Segments::kElements * 2);
    }
    return absl::OkStatus();
  };
  // Anchors: a memcpy measurement (best of 3 short rounds) before each codec round, so that
  // a codec's best round and its anchor's best come from the same moments of a noisy machine;
  // `local` is the best of those before one codec measurement, memcpy_gbps the run's best.
  KVPOOL_ASSIGN_OR_RETURN(double memcpy_gbps, Rate(o.seconds, total_bytes, copy_all));
  double local = 0;
  auto anchor = [&] {
    absl::StatusOr<double> r = Rate(o.seconds / 3, total_bytes, copy_all);
    if (!r.ok()) return;
    local = std::max(local, *r);
    memcpy_gbps = std::max(memcpy_gbps, *r);
  };
  std::vector<CodecParams> set = {CodecParams{CodecId::kRaw},
                                  CodecParams{CodecId::kKivi, 2, 0, 32},
                                  CodecParams{CodecId::kKivi, 4, 0, 32},
                                  CodecParams{CodecId::kPackKv, 8, 0, 16, 0.02f},
                                  CodecParams{CodecId::kKvpool, 0, 0, 0, 0.02f},
                                  CodecParams{CodecId::kKvpool, 0, 0, 0, 0.05f},
                                  CodecParams{CodecId::kKvpool, 0, 0, 0, 0.2f},
                                  CodecParams{CodecId::kKvpool, 0, 0, 0, 0.2f},
                                  CodecParams{CodecId::kKvpool, 0, kKvpoolEntropyProfile, 0, 0.05f},
                                  CodecParams{CodecId::kKvpool, 0, kKvpoolFastProfile, 0, 0.05f}};
  struct Row {
    std::string name, codec, path;
    double encode = 0, decode = 0, ratio = 0;
    double encode_anchor = 0, decode_anchor = 0;  // memcpy beside each (cuda: d2d copy).
    // Whole segments through EncodeSegment / DecodeSegment (host paths only), and anchors.
    double segment_encode = 0, segment_decode = 0;
    double segment_encode_anchor = 0, segment_decode_anchor = 0;
  };
  // kvpool's default profile (e=0.02: the daemon's default budget) keeps a PlanCache per
  // stream (layer and kind), as the daemon does; the second e=0.2 entry plans every segment
  // afresh (no cache), for comparison.
  const size_t kNoCacheEntry = 7;
  std::vector<Row> rows;
  std::string device_line = want_cuda ? "" : "not measured (--paths)";
  std::vector<std::string> batched, per_segment;  // cuda rows by how they launch
  std::vector<std::string> by_kind;               // cuda rows: encode/decode GB/s per kind
  double d2d = 0;
  // Progress on a terminal: each codec and path as it starts (a full run takes minutes).
  const bool progress = isatty(STDERR_FILENO) != 0;
  int steps = 0, step = 0;
  auto name_of = [&](size_t k) { return Name(set[k]) + (k == kNoCacheEntry ? " nocache" : ""); };
  for (size_t k = 0; k < set.size(); ++k)
    steps += o.only.empty() || name_of(k).find(o.only) != std::string::npos;
  const absl::Time start = absl::Now();
  for (size_t k = 0; k < set.size(); ++k) {
    if (!o.only.empty() && name_of(k).find(o.only) == std::string::npos) continue;
    ++step;
    const std::string name = name_of(k);
    KVPOOL_ASSIGN_OR_RETURN(const CodecParams p, kernels::NormalizeParams(set[k]));
    // One PlanCache per stream for each measurement (fresh caches: no plan carried over).
    const bool cached = k != kNoCacheEntry;
    std::unique_ptr<kernels::BlockPlans> plans;
    auto fresh_plans = [&] { plans = std::make_unique<kernels::BlockPlans>(2 * kLayers); };
    auto plans_of = [&](uint64_t i) {
      return cached ? plans->For(Segments::stream(i)) : nullptr;
    };
    // Two levels per path. The codec: its payload functions (a value segment with its keys,
    // as put passes them). The segment API the daemon and the client run: EncodeSegment (NaN
    // scan where the codec needs one, header, checksum, an exact-size string) and
    // DecodeSegment (checksum verified before decoding).
    const kernels::CodecOps& ops = kernels::GetCodecOps(p.codec);
    const uint64_t cap = ops.max_payload_bytes(segs.key, p);
    std::vector<std::vector<uint8_t>> payloads(segs.count, std::vector<uint8_t>(cap));
    std::vector<uint64_t> sizes(segs.count);
    std::vector<std::string> encoded(segs.count);
    auto keys_of = [&](uint64_t i) {
      return segs.shape(i).kind == SegmentKind::kValue ? segs.data(i - 1) : nullptr;
    };
    auto out_of = [&](uint64_t i) { return dst.get() + i * Segments::kElements; };
    // Rate of `fn` over all segments with the memcpy anchor beside it: (GB/s, anchor GB/s).
    auto measure = [&](const std::function<absl::Status(uint64_t)>& fn, double* gbps,
                       double* anchor_gbps) -> absl::Status {
      local = 0;
      auto r = Rate(
          o.seconds, total_bytes,
          [&]() -> absl::Status {
            for (uint64_t i = 0; i < segs.count; ++i) KVPOOL_RETURN_IF_ERROR(fn(i));
            return absl::OkStatus();
          },
          anchor);
      if (!r.ok()) return r.status();
      *gbps = *r;
      *anchor_gbps = local;
      return absl::OkStatus();
    };
    for (kernels::Path path : {kernels::Path::kRef, kernels::Path::kCpu}) {
      const bool ref = path == kernels::Path::kRef;
      if (!(ref ? want_ref : want_cpu)) continue;
      if (progress) {
        std::cerr << absl::StrFormat("[%d/%d] %s %s (%.0f s)\n", step, steps, name,
                                     kernels::PathName(path),
                                     absl::ToDoubleSeconds(absl::Now() - start));
      }
      auto encode = ref ? ops.encode_ref : ops.encode_cpu;
      auto encode_keyed = ref ? ops.encode_ref_keyed : ops.encode_cpu_keyed;
      auto decode = ref ? ops.decode_ref : ops.decode_cpu;
      Row row{name, std::string(CodecName(p.codec)), std::string(kernels::PathName(path))};
      const auto encode_payload = [&](uint64_t i) -> absl::Status {
        const uint16_t* keys = keys_of(i);
        // A value's keys and their payload, encoded just before (what put passes).
        const kernels::LayerKeys layer_keys{
            keys,
            keys ? absl::MakeConstSpan(payloads[i - 1].data(), sizes[i - 1])
                 : absl::Span<const uint8_t>(),
            plans_of(i)};
        KVPOOL_ASSIGN_OR_RETURN(
            sizes[i],
            (keys != nullptr || layer_keys.plans != nullptr) && encode_keyed != nullptr
                ? encode_keyed(segs.shape(i), p, segs.data(i), layer_keys, payloads[i].data(), cap)
                : encode(segs.shape(i), p, segs.data(i), payloads[i].data(), cap));
        return absl::OkStatus();
      };
      const auto encode_segment = [&](uint64_t i) -> absl::Status {
        const uint16_t* keys = keys_of(i);
        KVPOOL_ASSIGN_OR_RETURN(
            encoded[i],
            kernels::EncodeSegment(
                p, segs.shape(i), absl::MakeConstSpan(segs.data(i), Segments::kElements), path,
                keys ? absl::MakeConstSpan(keys, Segments::kElements)
                     : absl::Span<const uint16_t>(),
                keys ? absl::string_view(encoded[i - 1]) : absl::string_view(), plans_of(i)));
        return absl::OkStatus();
      };
      // The timed rounds go on with the caches of the round before (a daemon's steady state),
      // so a later round may code segments with plans made from themselves. What is decoded
      // and the ratio come from one more pass with fresh caches: each stream's first segment
      // planned, the others through plans made from the segments before them only.
      const auto fresh_pass = [&](const std::function<absl::Status(uint64_t)>& fn) {
        fresh_plans();
        for (uint64_t i = 0; i < segs.count; ++i) KVPOOL_RETURN_IF_ERROR(fn(i));
        return absl::OkStatus();
      };
      fresh_plans();
      absl::Status st = measure(encode_payload, &row.encode, &row.encode_anchor);
      if (st.ok()) st = fresh_pass(encode_payload);
      // Decoding into 128 MiB as a client's large get does: under a StreamingOutput (unless
      // --plain_stores).
      const kernels::StreamingOutput streaming(!o.plain_stores);
      if (st.ok()) {
        st = measure(
            [&](uint64_t i) {
              return decode(segs.shape(i), p, payloads[i].data(), sizes[i], out_of(i));
            },
            &row.decode, &row.decode_anchor);
      }
      if (st.ok()) {
        fresh_plans();
        st = measure(encode_segment, &row.segment_encode, &row.segment_encode_anchor);
      }
      if (st.ok()) st = fresh_pass(encode_segment);
      if (st.ok()) {
        st = measure(
            [&](uint64_t i) {
              return kernels::DecodeSegment(encoded[i],
                                            absl::MakeSpan(out_of(i), Segments::kElements), path);
            },
            &row.segment_decode, &row.segment_decode_anchor);
      }
      if (!st.ok()) {
        return absl::Status(st.code(),
                            absl::StrFormat("%s %s: %s", row.name, row.path, st.message()));
      }
      uint64_t total = 0;
      for (const std::string& e : encoded) total += e.size();
      row.ratio = double(total_bytes) / total;
      rows.push_back(row);
    }
    // The GPU's encoders keep no plans: the nocache row would be the cached one's.
    if (!cached || !want_cuda) continue;
    const std::vector<uint16_t> all(segs.all.get(),
                                    segs.all.get() + segs.count * Segments::kElements);
    // On the GPU: the same segments as keys, then as values (each kind takes its own kernels);
    // the row gives both kinds' bytes over both kinds' times, as a block's put runs them.
    SegmentShape value_shape = segs.key;
    value_shape.kind = SegmentKind::kValue;
    auto dev_k = kernels::MeasureDeviceThroughput(p, segs.key, all, segs.count, 20);
    auto dev_v =
        dev_k.ok() ? kernels::MeasureDeviceThroughput(p, value_shape, all, segs.count, 20) : dev_k;
    if (dev_k.ok() && dev_v.ok()) {
      auto both = [](double a, double b) { return 2 / (1 / a + 1 / b); };
      d2d = (dev_k->d2d_copy_gbps + dev_v->d2d_copy_gbps) / 2;
      rows.push_back(Row{name, std::string(CodecName(p.codec)), "cuda",
                         both(dev_k->encode_gbps, dev_v->encode_gbps),
                         both(dev_k->decode_gbps, dev_v->decode_gbps), 0, d2d, d2d});
      (dev_k->batched ? batched : per_segment).push_back(name);
      by_kind.push_back(absl::StrFormat("%s K %.0f/%.0f V %.0f/%.0f", name, dev_k->encode_gbps,
                                        dev_k->decode_gbps, dev_v->encode_gbps,
                                        dev_v->decode_gbps));
    } else {
      device_line = std::string((dev_k.ok() ? dev_v : dev_k).status().message());
    }
  }
  if (o.json) {
    std::cout << absl::StrFormat(
        "{\"memcpy_gbps\": %.3f, \"d2d_copy_gbps\": %.3f, \"decode_stores\": \"%s\", "
        "\"results\": [",
        memcpy_gbps, d2d, o.plain_stores ? "plain" : "streaming");
    for (size_t i = 0; i < rows.size(); ++i) {
      std::cout << absl::StrFormat(
          "%s{\"codec\": \"%s\", \"name\": \"%s\", \"path\": \"%s\", \"encode_gbps\": %.3f, "
          "\"decode_gbps\": %.3f, \"ratio\": %.3f, \"encode_anchor_gbps\": %.3f, "
          "\"decode_anchor_gbps\": %.3f, \"segment_encode_gbps\": %.3f, "
          "\"segment_decode_gbps\": %.3f, \"segment_encode_anchor_gbps\": %.3f, "
          "\"segment_decode_anchor_gbps\": %.3f}",
          i ? ", " : "", rows[i].codec, rows[i].name, rows[i].path, rows[i].encode, rows[i].decode,
          rows[i].ratio, rows[i].encode_anchor, rows[i].decode_anchor, rows[i].segment_encode,
          rows[i].segment_decode, rows[i].segment_encode_anchor, rows[i].segment_decode_anchor);
    }
    std::cout << "]}\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "codec: one core, synthetic fp16 KV, %d segments of [%d][%d][%d] (%s MiB), GB/s of fp16;\n"
      "each ratio against the memcpy measured beside that figure (best of 3 rounds each);\n"
      "encode/decode: the codec's payload functions; seg enc/dec: whole segments through\n"
      "EncodeSegment / DecodeSegment (header, checksum, allocation), as the daemon runs them;\n"
      "decodes write %s\n"
      "  %-21s %-5s %8s %8s %7s %8s %8s %8s %8s %8s %8s\n",
      segs.count, kSegTokens, kHeads, kDim, absl::StrFormat("%.0f", total_bytes / 1048576.0),
      o.plain_stores ? "with plain stores (--plain_stores: as the daemon's server-side decode)"
                     : "as a client's large get does (kernels::StreamingOutput: kvpool mode 4)",
      "codec", "path", "encode", "decode", "ratio", "enc/mcpy", "dec/mcpy", "seg enc", "seg dec",
      "mcpy@enc", "mcpy@dec");
  auto share = [](double x, double anchor) { return anchor > 0 ? x / anchor : 0.0; };
  for (const Row& r : rows) {
    // The cuda rows measure payload kernels only: no ratio of their own.
    const std::string ratio = r.ratio > 0 ? absl::StrFormat("%6.2fx", r.ratio) : "      -";
    std::cout << absl::StrFormat(
        "  %-21s %-5s %8.2f %8.2f %s %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f\n", r.name, r.path,
        r.encode, r.decode, ratio, share(r.encode, r.encode_anchor),
        share(r.decode, r.decode_anchor), share(r.segment_encode, r.segment_encode_anchor),
        share(r.segment_decode, r.segment_decode_anchor), r.encode_anchor, r.decode_anchor);
  }
  std::cout << absl::StrFormat("  %-21s %-5s %9.2f   (best memcpy round of this run)\n", "memcpy",
                               "cpu", memcpy_gbps);
  if (d2d > 0) {
    std::cout << absl::StrFormat("  %-19s %-5s %9.2f   (anchor for cuda rows)\n", "d2d copy",
                                 "cuda", d2d);
    std::cout << "  cuda rows, encode/decode GB/s by kind: " << absl::StrJoin(by_kind, "; ")
              << "\n";
    std::cout << "  cuda rows: all segments in one set of launches: "
              << (batched.empty() ? "none" : absl::StrJoin(batched, ", "))
              << "; one set of launches per segment: "
              << (per_segment.empty() ? "none" : absl::StrJoin(per_segment, ", ")) << "\n";
  } else {
    std::cout << "  cuda: " << device_line << "\n";
  }
  return absl::OkStatus();
}

}  // namespace kvpool::bench
