#include "client/kv_codec.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvpool::client {
namespace {

// Calls fn(segment index, shape, element offset of token 0 in the sequence) for every segment,
// with the segment's elements at sequence offset + t * row (row = kv_heads * head_dim) for
// t < shape.tokens.
template <typename Fn>
absl::Status ForEachSegment(const KvShape& s, uint32_t tokens_per_block, Fn fn) {
  const uint64_t row = uint64_t{s.kv_heads} * s.head_dim;
  uint64_t index = 0;
  for (uint32_t start = 0; start < s.tokens; start += tokens_per_block) {
    const uint32_t n = std::min(tokens_per_block, s.tokens - start);
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        SegmentShape shape{n, s.kv_heads, s.head_dim, s.dtype,
                           kind == 0 ? SegmentKind::kKey : SegmentKind::kValue};
        const uint64_t offset = ((uint64_t{l} * 2 + kind) * s.tokens + start) * row;
        if (absl::Status st = fn(index++, shape, offset); !st.ok()) return st;
      }
    }
  }
  return absl::OkStatus();
}

template <typename T>
void Append(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

}  // namespace

uint64_t EncodedKv::EncodedBytes() const {
  uint64_t n = 0;
  for (const std::string& s : segments) n += s.size();
  return n;
}

absl::StatusOr<EncodedKv> EncodeKv(const KvShape& shape, absl::Span<const uint16_t> kv,
                                   uint32_t tokens_per_block, const CodecParams& params,
                                   kernels::Path path, uint64_t replan_every) {
  if (kv.size() != shape.Elements()) {
    return absl::InvalidArgumentError(absl::StrCat("KV has ", kv.size(), " elements, shape needs ",
                                                   shape.Elements()));
  }
  if (tokens_per_block == 0) return absl::InvalidArgumentError("tokens_per_block is 0");
  EncodedKv out;
  out.shape = shape;
  out.tokens_per_block = tokens_per_block;
  const uint64_t row = uint64_t{shape.kv_heads} * shape.head_dim;
  const kernels::BlockPlans plans(2 * uint64_t{shape.layers}, replan_every);
  absl::Status st = ForEachSegment(
      shape, tokens_per_block,
      [&](uint64_t index, const SegmentShape& seg, uint64_t offset) -> absl::Status {
        // A value segment's keys (the segment before it, and its encoding: their token classes)
        // tell the codec which tokens matter.
        const uint64_t n = seg.tokens * row;
        const bool value = seg.kind == SegmentKind::kValue;
        const absl::Span<const uint16_t> keys =
            value ? kv.subspan(offset - uint64_t{shape.tokens} * row, n)
                  : absl::Span<const uint16_t>();
        auto encoded = kernels::EncodeSegment(params, seg, kv.subspan(offset, n), path, keys,
                                              value ? out.segments.back() : absl::string_view(),
                                              plans.For(index % plans.segments()));
        if (!encoded.ok()) return encoded.status();
        out.segments.push_back(std::move(*encoded));
        return absl::OkStatus();
      });
  if (!st.ok()) return st;
  return out;
}

absl::Status DecodeKv(const EncodedKv& encoded, absl::Span<uint16_t> out, kernels::Path path) {
  const KvShape& shape = encoded.shape;
  if (out.size() != shape.Elements()) return absl::InvalidArgumentError("output size mismatch");
  if (encoded.tokens_per_block == 0) return absl::DataLossError("tokens_per_block is 0");
  const uint64_t row = uint64_t{shape.kv_heads} * shape.head_dim;
  uint64_t expected = 0;
  ForEachSegment(shape, encoded.tokens_per_block, [&](uint64_t, const SegmentShape&, uint64_t) {
    ++expected;
    return absl::OkStatus();
  }).IgnoreError();
  if (encoded.segments.size() != expected) {
    return absl::DataLossError(absl::StrCat("expected ", expected, " segments, found ",
                                            encoded.segments.size()));
  }
  return ForEachSegment(shape, encoded.tokens_per_block,
                        [&](uint64_t i, const SegmentShape& seg, uint64_t offset) {
                          return kernels::DecodeSegment(encoded.segments[i],
                                                        out.subspan(offset, seg.tokens * row),
                                                        path, &seg);
                        });
}

std::string SerializeKvz(const EncodedKv& e) {
  std::string out = "KVZ1";
  Append<uint32_t>(&out, e.shape.layers);
  Append<uint32_t>(&out, e.shape.tokens);
  Append<uint32_t>(&out, e.shape.kv_heads);
  Append<uint32_t>(&out, e.shape.head_dim);
  Append<uint8_t>(&out, static_cast<uint8_t>(e.shape.dtype));
  out.append(3, '\0');
  Append<uint32_t>(&out, e.tokens_per_block);
  Append<uint64_t>(&out, e.segments.size());
  for (const std::string& s : e.segments) {
    Append<uint64_t>(&out, s.size());
    out += s;
  }
  return out;
}

absl::StatusOr<EncodedKv> ParseKvz(absl::string_view bytes) {
  constexpr size_t kHeader = 4 + 4 * 4 + 4 + 4 + 8;
  if (bytes.size() < kHeader || bytes.substr(0, 4) != "KVZ1") {
    return absl::DataLossError("not a .kvz file (bad magic or too short)");
  }
  auto u32 = [&](size_t off) {
    uint32_t v;
    std::memcpy(&v, bytes.data() + off, 4);
    return v;
  };
  EncodedKv e;
  e.shape.layers = u32(4);
  e.shape.tokens = u32(8);
  e.shape.kv_heads = u32(12);
  e.shape.head_dim = u32(16);
  const uint8_t dtype = static_cast<uint8_t>(bytes[20]);
  if (dtype != 1 && dtype != 2) return absl::DataLossError(".kvz: unknown dtype");
  e.shape.dtype = static_cast<DType>(dtype);
  e.tokens_per_block = u32(24);
  uint64_t count;
  std::memcpy(&count, bytes.data() + 28, 8);
  size_t pos = kHeader;
  if (count > bytes.size() / 8) return absl::DataLossError(".kvz: impossible segment count");
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t size;
    if (bytes.size() - pos < 8) return absl::DataLossError(".kvz: truncated");
    std::memcpy(&size, bytes.data() + pos, 8);
    pos += 8;
    if (size > bytes.size() - pos) return absl::DataLossError(".kvz: truncated segment");
    e.segments.emplace_back(bytes.substr(pos, size));
    pos += size;
  }
  if (pos != bytes.size()) return absl::DataLossError(".kvz: trailing bytes");
  return e;
}

}  // namespace kvpool::client
