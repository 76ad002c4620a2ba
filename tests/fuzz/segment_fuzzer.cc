// libFuzzer target: arbitrary bytes through the encoded-segment parser and every codec's
// decoder on every host path. Anything but an OK or an error status (a crash, a sanitizer
// report, a hang) is a bug. `make test` runs it for a bounded time when clang is present.
#include <cstdint>
#include <string>
#include <vector>

#include "common/encoded_segment.h"
#include "kernels/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::string_view payload;
  auto header = kvpool::ParseSegment(bytes, &payload);
  if (header.ok() && header->shape.Elements() <= (uint64_t{1} << 20)) {
    std::vector<uint16_t> out(header->shape.Elements());
    for (auto path : {kvpool::kernels::Path::kRef, kvpool::kernels::Path::kCpu}) {
      kvpool::kernels::DecodeSegment(bytes, absl::MakeSpan(out), path).IgnoreError();
    }
  }
  // The checksum stops almost every random input above: also feed the bytes straight to each
  // decoder as a payload, with a shape taken from the first bytes.
  if (size < 8) return 0;
  kvpool::SegmentShape shape;
  shape.tokens = 1 + data[0] % 64;
  shape.kv_heads = 1 + data[1] % 4;
  shape.head_dim = 1 + data[2] % 160;
  shape.dtype = data[3] & 1 ? kvpool::DType::kBf16 : kvpool::DType::kFp16;
  shape.kind = data[3] & 2 ? kvpool::SegmentKind::kValue : kvpool::SegmentKind::kKey;
  kvpool::CodecParams params;
  params.codec = static_cast<kvpool::CodecId>(data[4] % kvpool::kNumCodecs);
  params.bits = data[5] % 3 == 0 ? 2 : data[5] % 3 == 1 ? 4 : 8;
  params.flags = data[6];
  params.group = 1 + data[7] % 64;
  params.budget = 0.05f;
  auto normalized = kvpool::kernels::NormalizeParams(params);
  if (!normalized.ok()) return 0;
  const kvpool::kernels::CodecOps& ops = kvpool::kernels::GetCodecOps(normalized->codec);
  std::vector<uint16_t> out(shape.Elements());
  ops.decode_ref(shape, *normalized, data + 8, size - 8, out.data()).IgnoreError();
  ops.decode_cpu(shape, *normalized, data + 8, size - 8, out.data()).IgnoreError();
  // The same with streaming stores (kvpool's mode 4 decoders have their own stores for them).
  const kvpool::kernels::StreamingOutput streaming;
  ops.decode_cpu(shape, *normalized, data + 8, size - 8, out.data()).IgnoreError();
  return 0;
}
