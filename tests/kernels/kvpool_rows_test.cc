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

void PutF32(std::string* s, float f) {
  char b[4];
  std::memcpy(b, &f, 4);
  s->append(b, 4);
}

// The payload of an encoded segment.
std::string PayloadOf(const std::string& enc) { return enc.substr(kSegmentHeaderBytes); }

absl::Status DecodePayload(const SegmentShape& s, const std::string& p, Path path,
                           std::vector<uint16_t>* out) {
  out->assign(s.Elements(), 0);
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.data());
  const CodecParams params = Params(0.1f);
  return path == Path::kRef ? kvpool::DecodeRef(s, params, bytes, p.size(), out->data())
                            : kvpool::DecodeCpu(s, params, bytes, p.size(), out->data());
}

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

// A fast decoder writes the reference's values, and nothing around them, into outputs 0, 2,
// 16 and 32 bytes past a 64-byte boundary, with plain stores and under a StreamingOutput (its
// streaming stores where the output is 16-byte aligned, of 32 bytes where 32-byte aligned).
void ExpectEachAlignmentDecodes(
    const SegmentShape& s, const in::ParsedRows& parsed, const std::vector<uint16_t>& ref,
    bool (*decode)(const SegmentShape&, const in::ParsedRows&, uint16_t*), int n) {
  constexpr uint16_t kGuard = 0xa5a5;
  in::AlignedVector<uint16_t> buffer(s.Elements() + 64);
  for (const bool streaming : {false, true}) {
    const StreamingOutput scope(streaming);
    for (const uint64_t offset : {0, 1, 8, 16}) {
      std::fill(buffer.begin(), buffer.end(), kGuard);
      uint16_t* out = buffer.data() + offset;
      ASSERT_TRUE(decode(s, parsed, out));
      EXPECT_TRUE(std::equal(ref.begin(), ref.end(), out))
          << n << " offset " << offset << (streaming ? " streaming" : "");
      EXPECT_TRUE(std::all_of(buffer.data(), out, [](uint16_t v) { return v == kGuard; })) << n;
      EXPECT_TRUE(std::all_of(out + ref.size(), buffer.data() + buffer.size(), [](uint16_t v) {
        return v == kGuard;
      })) << n;
    }
  }
}

// Both builds of the AVX-512 decoder (with and without VNNI) give the reference's values, on
// the CPUs that can run them.
TEST(KvpoolRows, BothAvx512DecodersAreTheReference) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512";
  const bool vnni = CpuHasAvx512Vnni();
  std::mt19937_64 rng(21);
  int checked = 0;
  for (int n = 0; n < 24; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    SegmentShape s = Shape(n % 3 ? 64 : 37, 1 + n % 3, n % 4 ? 128 : 64, dt,
                           n % 4 < 2 ? SegmentKind::kKey : SegmentKind::kValue);
    const std::vector<uint16_t> v = RandomSegment(s, n % 6, rng);
    const std::string p = PayloadOf(Encode(*NormalizeParams(Params(n % 5 ? 0.1f : 0.01f)), s, v));
    if (uint8_t(p[0]) != in::kModeRows) continue;
    std::vector<uint16_t> ref;
    ASSERT_TRUE(DecodePayload(s, p, Path::kRef, &ref).ok());
    in::ParsedRows parsed;
    ASSERT_TRUE(
        in::ParseRows(s, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &parsed).ok());
    ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx512Base, n);
    if (vnni) ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx512Vnni, n);
    ++checked;
  }
  EXPECT_GT(checked, 16);
}

// The AVX2 decoder (CPUs without AVX-512) gives the reference's values: both dtypes, head_dim
// 32 to 512, rows with no planes (also in heads with outlier planes) and with more than 8, heads
// with and without a low-rank part and outlier channels, more than 8 of them (taken 8 at a
// time; counts not a multiple of 8, and 32), some past channel 256 (counted, so that the data
// keeps covering them); other shapes it declines.
TEST(KvpoolRows, Avx2DecoderIsTheReference) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2";
  std::mt19937_64 rng(31);
  const float budgets[] = {0.003f, 0.02f, 0.1f, 0.5f};
  const uint32_t dims[] = {32, 64, 96, 128, 256, 512};
  const uint32_t tokens[] = {1, 17, 64, 130};
  int checked = 0, no_planes = 0, wide = 0, outliers = 0, many_outliers = 0, far_outlier = 0;
  int low_rank = 0, bare_outlier_rows = 0, odd_many = 0, full = 0;
  for (int n = 0; n < 64; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    const SegmentShape s = Shape(tokens[n % 4], 1 + rng() % 3, dims[rng() % 6], dt,
                                 n % 3 ? SegmentKind::kKey : SegmentKind::kValue);
    const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 7), rng);
    const std::string p = PayloadOf(Encode(*NormalizeParams(Params(budgets[rng() % 4])), s, v));
    if (uint8_t(p[0]) != in::kModeRows) continue;
    std::vector<uint16_t> ref;
    ASSERT_TRUE(DecodePayload(s, p, Path::kRef, &ref).ok());
    in::ParsedRows parsed;
    ASSERT_TRUE(
        in::ParseRows(s, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &parsed).ok());
    ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx2, n);
    for (uint64_t i = 0; i < uint64_t{s.tokens} * s.kv_heads; ++i) {
      no_planes += (parsed.metas[i] & 15) == 0;
      wide += (parsed.metas[i] & 15) > 8;
      const in::ParsedRows::Head& hd = parsed.heads[i / s.tokens];
      bare_outlier_rows += (parsed.metas[i] & 15) == 0 && hd.outliers > 0 && hd.extra > 0;
    }
    for (const in::ParsedRows::Head& hd : parsed.heads) {
      outliers += hd.outliers > 0 && hd.extra > 0;
      many_outliers += hd.outliers > 8 && hd.extra > 0;
      odd_many += hd.outliers > 8 && hd.outliers % 8 != 0 && hd.extra > 0;
      full += hd.outliers == in::kMaxOutliers && hd.extra > 0;
      low_rank += hd.rank > 0;
      for (uint32_t k = 0; k < hd.outliers; ++k) {
        far_outlier += hd.extra > 0 && in::Load16(parsed.outliers + 2 * (hd.outlier + k)) >= 256;
      }
    }
    ++checked;
  }
  EXPECT_GT(checked, 30);
  EXPECT_GT(no_planes, 0);
  EXPECT_GT(wide, 0);
  EXPECT_GT(outliers, 0);
  EXPECT_GT(many_outliers, 0);
  EXPECT_GT(far_outlier, 0);
  EXPECT_GT(bare_outlier_rows, 0);  // Rows of only their outlier channels' extra planes.
  EXPECT_GT(odd_many, 0);
  EXPECT_GT(full, 0);
  EXPECT_GT(low_rank, 0);
  const SegmentShape odd = Shape(64, 1, 48, DType::kFp16);  // head_dim not a multiple of 32
  const std::vector<uint16_t> v = RandomSegment(odd, 2, rng);
  const std::string p = PayloadOf(Encode(*NormalizeParams(Params(0.05f)), odd, v));
  ASSERT_EQ(uint8_t(p[0]), in::kModeRows);
  in::ParsedRows parsed;
  ASSERT_TRUE(
      in::ParseRows(odd, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &parsed).ok());
  std::vector<uint16_t> out(odd.Elements());
  EXPECT_FALSE(in::DecodeRowsAvx2(odd, parsed, out.data()));
}

// The AVX2 encoder kernels (CPUs without AVX-512) write the reference kernels' payloads byte for
// byte: keys, and values with their keys' payload, over both dtypes, head_dim 32 to 512 (their
// sample's Gram products of any length), budgets from more than 8 planes a row to none.
TEST(KvpoolRows, Avx2EncoderIsTheReference) {
  const in::RowKernels* avx2 = in::RowKernelsAvx2(128);
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2";
  EXPECT_EQ(in::RowKernelsAvx2(48), nullptr);  // head_dim not a multiple of 32
  std::mt19937_64 rng(41);
  const float budgets[] = {0.003f, 0.02f, 0.1f, 0.3f, 0.6f};
  const uint32_t dims[] = {32, 64, 96, 128, 256, 512};
  const uint32_t tokens[] = {1, 16, 17, 64, 200, 256};
  int coded = 0, wide = 0, many_outliers = 0;
  for (int n = 0; n < 40; ++n) {
    const DType dt = n % 2 ? DType::kBf16 : DType::kFp16;
    SegmentShape s = Shape(tokens[rng() % 6], 1 + rng() % 3, dims[rng() % 6], dt);
    const CodecParams p = *NormalizeParams(Params(budgets[rng() % 5]));
    const int type = int(rng() % 6);
    const std::vector<uint16_t> k = RandomSegment(s, type == 1 ? 1 : n % 4 == 3 ? 6 : 5, rng);
    const std::vector<uint16_t> v = RandomSegment(s, type, rng);
    std::string key_payload;
    for (int kind = 0; kind < 2; ++kind) {
      s.kind = kind ? SegmentKind::kValue : SegmentKind::kKey;
      const std::vector<uint16_t>& x = kind ? v : k;
      kernels::LayerKeys keys;
      if (kind) {
        keys.elements = k.data();
        keys.payload = {reinterpret_cast<const uint8_t*>(key_payload.data()), key_payload.size()};
      }
      std::string out[2];
      for (int path = 0; path < 2; ++path) {
        out[path].resize(2 * s.Bytes() + 4096);
        auto size = in::EncodeRows(s, p, x.data(), keys, in::FastRefKernels(),
                                   path ? *avx2 : in::RowKernelsRef(),
                                   reinterpret_cast<uint8_t*>(out[path].data()), out[path].size());
        ASSERT_TRUE(size.ok()) << size.status();
        out[path].resize(*size);
      }
      EXPECT_EQ(out[1], out[0]) << "segment " << n << " kind " << kind;
      if (uint8_t(out[0][0]) == in::kModeRows) {
        ++coded;
        in::ParsedRows parsed;
        ASSERT_TRUE(in::ParseRows(s, reinterpret_cast<const uint8_t*>(out[0].data()),
                                  out[0].size(), &parsed)
                        .ok());
        for (uint64_t i = 0; i < uint64_t{s.tokens} * s.kv_heads; ++i) {
          wide += (parsed.metas[i] & 15) > 8;
        }
        for (const in::ParsedRows::Head& hd : parsed.heads) many_outliers += hd.outliers > 16;
      }
      if (!kind) key_payload = out[0];
    }
  }
  EXPECT_GT(coded, 40);
  EXPECT_GT(wide, 0);
  EXPECT_GT(many_outliers, 0);
}

// The row kernels on forced meta bytes, row by row: the AVX2 and AVX-512 kernels measure and
// write what the reference's do, bit for bit (planes, coefficient codes, stats and each row's
// error), on random heads: head_dim 32 to 512, ranks 0 to 8, 0 to 32 outlier channels (some
// at the top channels) with 0 to 7 extra planes, rows with no planes, the most planes, and any
// between, elements at the means, -0, a zero or negative low-rank scale. Final payloads (the
// tests above) hide most of this: a changed sum only shows in bytes where it flips a decision.
uint8_t ForcedMeta(void* ctx, uint32_t i, const in::RowStats&, float* hs) {
  const auto* forced = static_cast<const std::pair<std::vector<uint8_t>, std::vector<float>>*>(ctx);
  *hs = forced->second[i];
  return forced->first[i];
}

TEST(KvpoolRows, FastRowKernelsMeasureWhatTheReferenceMeasures) {
  std::vector<std::pair<const char*, const in::RowKernels*>> fast;
  if (in::RowKernelsAvx2(128) != nullptr) fast.push_back({"avx2", in::RowKernelsAvx2(128)});
  if (in::RowKernelsAvx512(128) != nullptr) fast.push_back({"avx512", in::RowKernelsAvx512(128)});
  if (fast.empty()) GTEST_SKIP() << "no AVX2";
  std::mt19937_64 rng(77);
  const auto R = [&](uint32_t n) { return uint32_t(rng() % n); };
  std::normal_distribution<float> normal(0.f, 1.f);
  const uint32_t dims[] = {32, 64, 96, 128, 256, 512};
  int bare_outlier_rows = 0, top_outliers = 0;
  for (int n = 0; n < 300; ++n) {
    const uint32_t D = dims[R(6)];
    const DType dt = R(2) ? DType::kBf16 : DType::kFp16;
    in::RowHead hd;
    hd.D = D;
    hd.rank = R(in::kMaxRank + 1);
    const uint32_t most = std::min(D, in::kMaxOutliers);
    hd.outliers = R(4) == 0 ? 0 : R(4) == 0 ? most : 1 + R(most);
    hd.extra = hd.outliers ? R(8) : 0;
    // Aligned as the encoder's own tables are (the fast kernels' aligned loads).
    in::AlignedVector<float> means(D), basis(in::kMaxRank * D), inv_step(in::kMaxRank);
    in::AlignedVector<float> chunks(D / 16 * in::kMaxRank * 16, 0.f);
    std::vector<int8_t> codes(in::kMaxRank * D);
    in::AlignedVector<int16_t> pairs(in::kMaxRank * D, 0);
    for (uint32_t d = 0; d < D; ++d) means[d] = ToF(dt, FromF(dt, normal(rng)));
    for (uint32_t j = 0; j < hd.rank; ++j) {
      for (uint32_t d = 0; d < D; ++d) {
        codes[j * D + d] = int8_t(int(R(255)) - 127);
        basis[j * D + d] = codes[j * D + d] / 127.f;
        chunks[((d / 16) * in::kMaxRank + j) * 16 + d % 16] = basis[j * D + d];
      }
      inv_step[j] = std::ldexp(1.f, int(R(8)));
    }
    in::FillPairs(codes.data(), hd.rank, D, pairs.data());
    std::vector<uint32_t> channels(D), outlier;
    for (uint32_t d = 0; d < D; ++d) channels[d] = D - 1 - d;  // The top channels, or any.
    if (R(3) != 0) std::shuffle(channels.begin(), channels.end(), rng);
    outlier.assign(channels.begin(), channels.begin() + hd.outliers);
    std::sort(outlier.begin(), outlier.end());
    std::vector<uint8_t> is_outlier(D, 0);
    std::vector<uint32_t> masks(D / 32, 0);
    for (uint32_t d : outlier) {
      is_outlier[d] = 1;
      masks[d / 32] |= 1u << (d % 32);
      top_outliers += d >= 256;
    }
    hd.means = means.data();
    hd.basis = basis.data();
    hd.inv_step = inv_step.data();
    hd.codes = codes.data();
    hd.chunks = chunks.data();
    hd.pairs = pairs.data();
    hd.is_outlier = is_outlier.data();
    hd.outlier = outlier.data();
    hd.outlier_masks = masks.data();
    hd.lr_scale = R(4) == 0 ? 0.f : (R(2) ? -1.f : 1.f) * std::ldexp(1.f, -int(R(10)));
    const uint32_t rows = 1 + R(in::kRowBlock);
    std::vector<std::vector<uint16_t>> x(rows, std::vector<uint16_t>(D));
    std::vector<const uint16_t*> xs(rows);
    std::pair<std::vector<uint8_t>, std::vector<float>> forced;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < rows; ++i) {
      for (uint32_t d = 0; d < D; ++d) {
        x[i][d] = R(6) == 0    ? FromF(dt, means[d])
                  : R(20) == 0 ? uint16_t(0x8000)  // -0
                               : FromF(dt, 3.f * normal(rng));
      }
      xs[i] = x[i].data();
      const uint32_t most_b = in::kMaxPlanes - hd.extra;
      const uint32_t b = R(4) == 0 ? 0 : R(3) == 0 ? most_b : R(most_b + 1);
      bare_outlier_rows += b == 0 && hd.extra > 0;
      const uint8_t meta = uint8_t(b | R(16) << 4);
      forced.first.push_back(meta);
      forced.second.push_back(in::RowHalfStep(std::ldexp(1.f, -int(R(12))), meta));
      bytes += in::RowBytesOf(hd, meta);
    }
    struct Result {
      bool ok = false;
      std::vector<uint8_t> out;
      std::vector<int16_t> coefs;
      std::vector<in::RowStats> stats;
      std::vector<uint8_t> metas;
      std::vector<float> err;
    };
    const auto run = [&](const in::RowKernels& k) {
      Result r;
      r.out.assign(bytes + in::kRowStoreRoom * in::PlaneBytes(D), 0xcd);
      r.coefs.assign(rows * in::kMaxRank, 0);
      r.stats.resize(rows);
      r.metas.resize(rows);
      r.err.resize(rows);
      r.ok = k.encode(hd, dt, xs.data(), rows, r.coefs.data(), &ForcedMeta, &forced, r.out.data(),
                      r.stats.data(), r.metas.data(), r.err.data());
      r.out.resize(bytes);
      return r;
    };
    const Result want = run(in::RowKernelsRef());
    ASSERT_TRUE(want.ok) << n;
    for (const auto& [name, kernels] : fast) {
      const Result got = run(*kernels);
      ASSERT_TRUE(got.ok) << name << " " << n;
      EXPECT_EQ(got.out, want.out) << name << " " << n;
      EXPECT_EQ(got.coefs, want.coefs) << name << " " << n;
      EXPECT_EQ(got.metas, want.metas) << name << " " << n;
      EXPECT_EQ(0, std::memcmp(got.err.data(), want.err.data(), 4 * rows)) << name << " " << n;
      EXPECT_EQ(0, std::memcmp(got.stats.data(), want.stats.data(), sizeof(in::RowStats) * rows))
          << name << " " << n;
    }
  }
  EXPECT_GT(bare_outlier_rows, 0);
  EXPECT_GT(top_outliers, 0);
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
