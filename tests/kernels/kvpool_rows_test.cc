// The kvpool codec's payload mode 4 (kernels/kvpool_rows.cc): a hand-built payload, the
// budget on random segments, the fast CPU path against the reference byte for byte and bit for
// bit, odd shapes, token classes, and malformed payloads.
#include "kernels/kvpool_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool.h"
#include "tests/kernels/kvpool_test_helpers.h"
#include "tests/util/segment_shape.h"

namespace kvpool::kernels::kvpool_test {
namespace {

namespace in = ::kvpool::kernels::kvpool::internal;

// T = 2 tokens, H = 1 head, D = 8 channels: rank 1, outlier channel 5 with E = 1, widths 2.
//   means 1.0; basis codes B[d] = d - 3; coefficients c = (1, -2) (offset binary, width 2);
//   row 0: b = 1, j = 8 (hs = u * 1 * 0.798); row 1: b = 0, j = 12 (hs = u * 2 * 1.0).
std::string HandPayload(DType dt) {
  std::string p(8, '\0');
  p[0] = char(in::kModeRows);
  p += char(1);  // rank
  p += char(1);  // outliers
  p += char(1);  // E
  p += char(0);
  PutF32(&p, 0.5f);   // unit
  PutF32(&p, 0.25f);  // low-rank scale
  p += char(2);       // width of direction 0
  p += std::string(3, '\0');
  for (int d = 0; d < 8; ++d) {
    const uint16_t m = FromF(dt, 1.0f);
    p += char(m & 0xff);
    p += char(m >> 8);
  }
  for (int d = 0; d < 8; ++d) p += char(int8_t(d - 3));
  p += char(5);  // outlier channel 5 (u16)
  p += char(0);
  p += char(0x81);  // row 0: b = 1, j = 8
  p += char(0xc0);  // row 1: b = 0, j = 12
  // Row 0: plane 0 = 0b10100101 (channels 0, 2, 5, 7 set), outlier plane: bit 0 set.
  p += char(0xa5);
  p += char(0x01);
  // Row 1: no regular planes; outlier plane: bit 0 clear.
  p += char(0x00);
  // Coefficients, width 2: c + 2 = 3 (t = 0), 0 (t = 1): plane 0 bits t0 = 1, plane 1 bits t0 = 1.
  p += char(0x01);
  p += char(0x01);
  return p;
}

TEST(KvpoolRows, HandBuiltPayloadDecodes) {
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const SegmentShape s = Shape(2, 1, 8, dt);
    const std::string p = HandPayload(dt);
    std::vector<uint16_t> ref, cpu;
    ASSERT_TRUE(DecodePayload(s, p, Path::kRef, &ref).ok());
    ASSERT_TRUE(DecodePayload(s, p, Path::kCpu, &cpu).ok());
    EXPECT_EQ(ref, cpu);
    const int c[2] = {1, -2};
    const uint8_t plane0 = 0xa5;
    for (int t = 0; t < 2; ++t)
      for (int d = 0; d < 8; ++d) {
        const float z = std::fma(0.25f, float(c[t] * (d - 3)), 1.0f);
        float n = 0, hs = 0;
        if (t == 0) {
          hs = (0.5f * 1.0f) * 0.798f;
          n = (plane0 >> d) & 1 ? 1 : -1;
          if (d == 5) n += 2;  // outlier plane bit set: +2^(b + 0)
        } else {
          hs = (0.5f * 2.0f) * 1.0f;
          if (d == 5) n = -1;  // b = 0, outlier plane bit clear
        }
        EXPECT_EQ(ref[t * 8 + d], FromF(dt, std::fma(hs, n, z))) << "t " << t << " d " << d;
      }
  }
}

// Encodes with both host paths (values with their keys, as put does); checks the payloads are
// identical, decode identically on both paths and meet the budget. Returns the encoded value.
struct Pair {
  std::string keys, values;
};
Pair EncodeBoth(const CodecParams& p, const SegmentShape& s, const std::vector<uint16_t>& k,
                const std::vector<uint16_t>& v, int* checked) {
  SegmentShape ks = s, vs = s;
  ks.kind = SegmentKind::kKey;
  vs.kind = SegmentKind::kValue;
  Pair out;
  for (Path path : {Path::kRef, Path::kCpu}) {
    const std::string ek = Encode(p, ks, k, path);
    const std::string ev = Encode(p, vs, v, path, k, ek);
    if (path == Path::kRef) {
      out = {ek, ev};
    } else {
      EXPECT_EQ(ek, out.keys) << "key payloads differ";
      EXPECT_EQ(ev, out.values) << "value payloads differ";
    }
  }
  for (const auto& [enc, seg, orig] :
       {std::tuple{out.keys, ks, k}, std::tuple{out.values, vs, v}}) {
    const std::vector<uint16_t> a = Decode(enc, seg, Path::kRef), b = Decode(enc, seg, Path::kCpu);
    EXPECT_EQ(a, b);
    EXPECT_LE(RelL2(seg, orig, a), p.budget * (seg.kind == SegmentKind::kKey ? 24 / 64.0 : 1.0));
    ++*checked;
  }
  return out;
}

TEST(KvpoolRows, FastPathIsTheReferenceAndTheBudgetHolds) {
  std::mt19937_64 rng(11);
  const float budgets[] = {0.005f, 0.02f, 0.1f, 0.3f, 0.6f};
  const uint32_t tokens[] = {1, 16, 17, 64, 200};
  const uint32_t dims[] = {32, 64, 96, 128};
  int checked = 0, coded = 0, many_outliers = 0;
  for (int n = 0; n < 120; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentShape s = Shape(tokens[rng() % 5], 1 + rng() % 3, dims[rng() % 4], dt);
    const CodecParams p = *NormalizeParams(Params(budgets[rng() % 5]));
    const int type = int(rng() % 6);
    const std::vector<uint16_t> k = RandomSegment(s, type == 1 ? 1 : n % 4 == 3 ? 6 : 5, rng);
    const std::vector<uint16_t> v = RandomSegment(s, type, rng);
    const Pair e = EncodeBoth(p, s, k, v, &checked);
    if (HasFatalFailure() || HasFailure()) FAIL() << "segment " << n;
    coded += uint8_t(e.keys[kSegmentHeaderBytes]) == in::kModeRows;
    for (const std::string& enc : {e.keys, e.values}) {  // Heads with outlier planes of 2 words.
      const std::string payload = PayloadOf(enc);
      in::ParsedRows parsed;
      if (uint8_t(payload[0]) != in::kModeRows ||
          !in::ParseRows(s, reinterpret_cast<const uint8_t*>(payload.data()), payload.size(),
                         &parsed)
               .ok()) {
        continue;
      }
      for (const in::ParsedRows::Head& hd : parsed.heads) many_outliers += hd.outliers > 16;
    }
  }
  EXPECT_EQ(checked, 240);
  EXPECT_GT(many_outliers, 0);
  EXPECT_GT(coded, 60);  // Most key segments take mode 4, the rest (one token, tight budgets) raw.
}

// Given MaxPayloadBytes (what EncodeSegment gives it) the encoder writes in place; given only a
// raw payload's room it writes through its scratch and copies: the same bytes either way, on
// both paths, keys and values, every budget. MaxPayloadBytes stays within 1.3x raw for
// 128-channel heads.
TEST(KvpoolRows, InPlaceAndThroughScratchWriteTheSameBytes) {
  std::mt19937_64 rng(41);
  for (const SegmentShape& base : {Shape(64, 2, 64), Shape(37, 3, 40), Shape(256, 8, 128)}) {
    for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
      SegmentShape s = base;
      s.kind = kind;
      const uint64_t raw = in::RawPayloadBytes(s);
      const uint64_t max = kvpool::MaxPayloadBytes(s, Params(0.05f));
      ASSERT_GE(max, in::RowsBufferBytes(s));
      if (s.head_dim == 128) EXPECT_LE(double(max), 1.3 * double(raw)) << max << " " << raw;
      EXPECT_EQ(kvpool::MaxPayloadBytes(s, Params(0.05f, 0, kFast)), raw);  // Other profiles.
      const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 7), rng);
      for (float budget : {0.02f, 0.2f, 0.5f}) {
        for (bool fast : {false, true}) {
          using Encoder =
              absl::StatusOr<uint64_t> (*)(const SegmentShape&, const CodecParams&, const uint16_t*,
                                           const LayerKeys&, uint8_t*, uint64_t);
          const Encoder encode = fast ? Encoder(&kvpool::EncodeCpu) : Encoder(&kvpool::EncodeRef);
          std::vector<uint8_t> in_place(max), scratch(raw);
          auto a = encode(s, Params(budget), v.data(), LayerKeys{}, in_place.data(), max);
          auto b = encode(s, Params(budget), v.data(), LayerKeys{}, scratch.data(), raw);
          ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
          ASSERT_EQ(*a, *b) << budget;
          EXPECT_LE(*a, raw);
          EXPECT_EQ(std::memcmp(in_place.data(), scratch.data(), *a), 0) << budget << " " << fast;
        }
      }
    }
  }
}

TEST(KvpoolRows, OddShapesTakeTheReferenceKernelsAndHoldTheBudget) {
  std::mt19937_64 rng(5);
  const uint32_t dims[] = {1, 3, 8, 12, 33, 48};
  const uint32_t tokens[] = {1, 2, 5, 31, 40};
  int checked = 0;
  for (int n = 0; n < 60; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentShape s = Shape(tokens[rng() % 5], 1 + rng() % 2, dims[rng() % 6], dt);
    const CodecParams p = *NormalizeParams(Params(n % 3 ? 0.05f : 0.3f));
    EncodeBoth(p, s, RandomSegment(s, 5, rng), RandomSegment(s, int(rng() % 6), rng), &checked);
    if (HasFailure()) FAIL() << "segment " << n;
  }
}

// On `kvpool gen` data every budget codes (no segment falls back to raw, even where the
// low-rank part alone almost meets the budget and the step search must find the few rows that
// need planes) and a larger budget never costs more bytes.
TEST(KvpoolRows, EveryBudgetCodesAndRatioGrowsWithBudget) {
  const std::string kv = SyntheticKvOf(2, 4, 64, 256);
  const uint16_t* e = reinterpret_cast<const uint16_t*>(kv.data());
  const uint64_t n = uint64_t{256} * 4 * 64;
  uint64_t last = ~uint64_t{0};
  for (float budget : {0.02f, 0.1f, 0.2f, 0.25f, 0.3f, 0.35f, 0.4f, 0.5f}) {
    const CodecParams p = *NormalizeParams(Params(budget));
    uint64_t bytes = 0;
    for (uint32_t l = 0; l < 2; ++l) {
      SegmentShape s = Shape(256, 4, 64);
      const std::vector<uint16_t> k(e + 2 * l * n, e + (2 * l + 1) * n);
      const std::vector<uint16_t> v(e + (2 * l + 1) * n, e + (2 * l + 2) * n);
      int checked = 0;
      const Pair enc = EncodeBoth(p, s, k, v, &checked);
      for (const std::string& seg : {enc.keys, enc.values}) {
        EXPECT_EQ(uint8_t(seg[kSegmentHeaderBytes]), in::kModeRows) << "budget " << budget;
        bytes += seg.size();
      }
    }
    EXPECT_LE(bytes, last) << "budget " << budget;
    last = bytes;
  }
}

TEST(KvpoolRows, EmptyZeroAndConstantSegments) {
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    const CodecParams p = *NormalizeParams(Params(0.05f));
    for (const SegmentShape& s : {Shape(0, 2, 64, dt), Shape(3, 0, 64, dt), Shape(16, 2, 0, dt)}) {
      const std::string e = Encode(p, s, std::vector<uint16_t>(s.Elements()));
      EXPECT_EQ(Decode(e, s, Path::kCpu).size(), s.Elements());
    }
    const SegmentShape s = Shape(64, 2, 64, dt);
    for (float value : {0.f, 1.5f, -3.25f}) {
      const std::vector<uint16_t> v(s.Elements(), FromF(dt, value));
      const std::string e = Encode(p, s, v, Path::kCpu);
      EXPECT_EQ(uint8_t(e[kSegmentHeaderBytes]), in::kModeRows);
      EXPECT_EQ(Decode(e, s, Path::kCpu), v) << value;  // Exact: the means carry it.
      EXPECT_LT(e.size(), s.Bytes() / 8);
    }
  }
}

TEST(KvpoolRows, NonFiniteElementsAreStoredRaw) {
  std::mt19937_64 rng(2);
  const SegmentShape s = Shape(64, 2, 64);
  for (uint16_t bad : {uint16_t{0x7c00}, uint16_t{0xfc00}, uint16_t{0x7e00}}) {
    for (uint64_t at : {uint64_t{0}, uint64_t{77}, s.Elements() - 1}) {
      std::vector<uint16_t> v = RandomSegment(s, 0, rng);
      v[at] = bad;
      for (Path path : {Path::kRef, Path::kCpu}) {
        const std::string e = Encode(Params(0.05f), s, v, path);
        ASSERT_FALSE(e.empty());
        EXPECT_EQ(CodecId(e[5]), CodecId::kRaw);
        EXPECT_EQ(Decode(e, s, path), v);
      }
    }
  }
}

TEST(KvpoolRows, KeyClassesGoToTheValuesAndAttendedTokensGetMorePlanes) {
  std::mt19937_64 rng(9);
  SegmentShape s = Shape(128, 2, 64);
  std::vector<uint16_t> k = RandomSegment(s, 1, rng), v = RandomSegment(s, 1, rng);
  for (uint32_t d = 0; d < 64; ++d)
    k[(40 * 2 + 1) * 64 + d] = FromF(s.dtype, 6.f);  // Token 40, head 1.
  const CodecParams p = *NormalizeParams(Params(0.2f));
  const std::string ek = Encode(p, s, k, Path::kCpu);
  const std::string pk = PayloadOf(ek);
  std::vector<uint8_t> classes;
  ASSERT_TRUE(
      in::KeyClasses(s, {reinterpret_cast<const uint8_t*>(pk.data()), pk.size()}, &classes));
  ASSERT_EQ(classes.size(), 256u);
  EXPECT_EQ(classes[40 * 2 + 1], 15);
  EXPECT_LT(classes[40 * 2], 6);
  s.kind = SegmentKind::kValue;
  const std::string with = PayloadOf(Encode(p, s, v, Path::kCpu, k, ek));
  const std::string without = PayloadOf(Encode(p, s, v, Path::kCpu));
  in::ParsedRows a, b;
  ASSERT_TRUE(
      in::ParseRows(s, reinterpret_cast<const uint8_t*>(with.data()), with.size(), &a).ok());
  ASSERT_TRUE(
      in::ParseRows(s, reinterpret_cast<const uint8_t*>(without.data()), without.size(), &b).ok());
  EXPECT_EQ(a.classes, nullptr);  // Values carry no class map.
  // The attended token's value row takes more planes than the same row weighted equally.
  EXPECT_GT(a.metas[1 * 128 + 40] & 15, b.metas[1 * 128 + 40] & 15);  // Head 1, token 40.
}

// A valid payload to corrupt: 37 tokens (3 padding bits in each coefficient plane), 2 heads of
// 64 channels, keys with outlier channels.
std::string ValidPayload(SegmentShape* s) {
  std::mt19937_64 rng(4);
  *s = Shape(37, 2, 64);
  const std::string e = Encode(*NormalizeParams(Params(0.05f)), *s, RandomSegment(*s, 5, rng));
  return PayloadOf(e);
}

TEST(KvpoolRows, MalformedFieldsAreDataLoss) {
  SegmentShape s;
  const std::string good = ValidPayload(&s);
  ASSERT_EQ(uint8_t(good[0]), in::kModeRows);
  in::ParsedRows parsed;
  ASSERT_TRUE(
      in::ParseRows(s, reinterpret_cast<const uint8_t*>(good.data()), good.size(), &parsed).ok());
  ASSERT_GT(parsed.heads[0].rank, 0u);
  ASSERT_GT(parsed.heads[0].outliers, 0u);
  const uint64_t head = in::kHeaderBytes;
  const uint64_t means = head + 2 * in::kRowHeadBytes;
  auto patched = [&](uint64_t at, std::string bytes) {
    std::string p = good;
    p.replace(at, bytes.size(), bytes);
    return p;
  };
  std::string f32(4, '\0');
  const float inf = INFINITY, zero = 0, huge = 0x1p65f;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"reserved flag", patched(1, "\x02")},
      {"reserved byte", patched(5, "\x01")},
      {"rank 9", patched(head, "\x09")},
      {"33 outliers", patched(head + 1, "\x21")},
      {"extra planes 16", patched(head + 2, "\x10")},
      {"reserved head byte", patched(head + 3, "\x01")},
      {"unit infinite", patched(head + 4, std::string(reinterpret_cast<const char*>(&inf), 4))},
      {"unit zero", patched(head + 4, std::string(reinterpret_cast<const char*>(&zero), 4))},
      {"scale too large", patched(head + 8, std::string(reinterpret_cast<const char*>(&huge), 4))},
      {"width of a missing direction", patched(head + 15, "\xf0")},
      {"mean infinite", patched(means, std::string("\x00\x7c", 2))},
      {"basis code -128", patched(means + 2 * 128, "\x80")},
      {"truncated", good.substr(0, good.size() - 1)},
      {"trailing byte", good + std::string(1, '\0')},
      {"empty", ""},
  };
  for (const auto& [what, p] : cases) {
    std::vector<uint16_t> out;
    for (Path path : {Path::kRef, Path::kCpu}) {
      EXPECT_EQ(DecodePayload(s, p, path, &out).code(), absl::StatusCode::kDataLoss) << what;
    }
  }
  // Outlier channels out of order, a row with 16 planes, padding bits set.
  const uint64_t outliers =
      uint64_t(parsed.outliers - reinterpret_cast<const uint8_t*>(good.data()));
  const uint64_t metas = uint64_t(parsed.metas - reinterpret_cast<const uint8_t*>(good.data()));
  const uint64_t last = good.size() - 1;  // The last coefficient plane's byte of tokens 32-36.
  std::vector<std::string> more = {patched(outliers, std::string("\x40\x00", 2)),
                                   patched(metas, std::string(1, char(0x0f))),
                                   patched(last, std::string(1, char(good[last] | 0x80)))};
  if (parsed.heads[0].outliers > 1) more.push_back(patched(outliers + 2, good.substr(outliers, 2)));
  for (const std::string& p : more) {
    std::vector<uint16_t> out;
    for (Path path : {Path::kRef, Path::kCpu}) {
      EXPECT_EQ(DecodePayload(s, p, path, &out).code(), absl::StatusCode::kDataLoss);
    }
  }
}

// Padding bits set in a row's last plane byte, regular (head_dim 60: 4 bits) or an outlier
// channels' extra plane (a count not a multiple of 8; head_dim 60, and 64 whose regular planes
// have none, in the second head's last row), are DataLoss on both paths; the same payload
// untouched decodes.
TEST(KvpoolRows, RowPlanePaddingIsDataLoss) {
  struct Case {
    SegmentShape shape;
    uint32_t head;
  };
  for (const Case& c : {Case{Shape(40, 1, 60), 0}, Case{Shape(40, 2, 64), 1}}) {
    std::mt19937_64 rng(12);
    const SegmentShape& s = c.shape;
    const uint32_t D = s.head_dim;
    const std::string good =
        PayloadOf(Encode(*NormalizeParams(Params(0.02f)), s, RandomSegment(s, 6, rng)));
    ASSERT_EQ(uint8_t(good[0]), in::kModeRows);
    in::ParsedRows parsed;
    ASSERT_TRUE(
        in::ParseRows(s, reinterpret_cast<const uint8_t*>(good.data()), good.size(), &parsed).ok());
    const in::ParsedRows::Head& hd = parsed.heads[c.head];
    ASSERT_GT(hd.extra, 0u) << D;
    ASSERT_NE(hd.outliers % 8, 0u) << D;
    const uint8_t* metas = parsed.metas + uint64_t{c.head} * s.tokens;
    const uint64_t rows_at =
        uint64_t(parsed.rows - reinterpret_cast<const uint8_t*>(good.data())) + hd.rows;
    std::vector<uint64_t> bad;  // Bytes to set a padding bit in.
    // Head 0 (head_dim 60): the first row with a regular plane, that plane's last byte.
    uint64_t at = rows_at;
    uint32_t t = 0;
    while (t < s.tokens && (metas[t] & 15) == 0) at += in::RowBytes(hd, D, metas[t++]);
    ASSERT_LT(t, s.tokens);
    if (D % 8 != 0) bad.push_back(at + in::PlaneBytes(D) - 1);
    // The last row's first extra plane's last byte, after rows with planes.
    at = rows_at;
    for (t = 0; t + 1 < s.tokens; ++t) at += in::RowBytes(hd, D, metas[t]);
    bad.push_back(at + (metas[t] & 15) * in::PlaneBytes(D) + in::PlaneBytes(hd.outliers) - 1);
    for (const uint64_t where : bad) {
      std::string p = good;
      p[where] = char(uint8_t(p[where]) | 0x80);
      for (Path path : {Path::kRef, Path::kCpu}) {
        std::vector<uint16_t> out;
        EXPECT_EQ(DecodePayload(s, p, path, &out).code(), absl::StatusCode::kDataLoss)
            << D << " " << where;
        EXPECT_TRUE(DecodePayload(s, good, path, &out).ok());
      }
    }
  }
}

TEST(KvpoolRows, RandomCorruptionNeverCrashesAndPathsAgree) {
  SegmentShape s;
  const std::string good = ValidPayload(&s);
  std::mt19937_64 rng(8);
  int rejected = 0;
  for (int n = 0; n < 3000; ++n) {
    std::string p = good;
    switch (n % 3) {
      case 0:
        p[rng() % p.size()] ^= char(1 << (rng() % 8));
        break;
      case 1:
        p.resize(rng() % p.size());
        break;
      default:
        for (int i = 0; i < 8; ++i) p[rng() % p.size()] = char(rng());
    }
    std::vector<uint16_t> a, b;
    const absl::Status sa = DecodePayload(s, p, Path::kRef, &a),
                       sb = DecodePayload(s, p, Path::kCpu, &b);
    ASSERT_EQ(sa.code(), sb.code()) << n;
    if (sa.ok()) {
      ASSERT_EQ(a, b) << n;
    } else {
      EXPECT_EQ(sa.code(), absl::StatusCode::kDataLoss);
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1000);
}

}  // namespace
}  // namespace kvpool::kernels::kvpool_test
