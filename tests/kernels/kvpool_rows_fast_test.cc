// kvpool's payload mode 4 on the fast CPU paths against the reference (kvpool_rows.cc): the
// AVX2 and AVX-512 decoders on the encoder's payloads and on any valid payload, into each output
// alignment, plainly and streaming; the AVX2 and AVX-512 row kernels row by row on forced meta
// bytes, and the AVX2 encoder's whole payloads. Each skips where the CPU lacks its ISA.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/kvpool_rows.h"
#include "kernels/kvpool_rows_plan.h"
#include "tests/kernels/kvpool_test_helpers.h"

namespace kvpool::kernels::kvpool_test {
namespace {

namespace in = ::kvpool::kernels::kvpool::internal;

// The reference's values of mode 4 payload `p` and its parse (both must succeed).
void ReferenceAndParse(const SegmentShape& s, const std::string& p, std::vector<uint16_t>* ref,
                       in::ParsedRows* parsed) {
  ASSERT_TRUE(DecodePayload(s, p, Path::kRef, ref).ok());
  ASSERT_TRUE(in::ParseRows(s, reinterpret_cast<const uint8_t*>(p.data()), p.size(), parsed).ok());
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
      SCOPED_TRACE(testing::Message() << "case " << n << ", output " << 2 * offset
                                      << " bytes past 64, " << (streaming ? "streaming" : "plain"));
      std::fill(buffer.begin(), buffer.end(), kGuard);
      uint16_t* out = buffer.data() + offset;
      ASSERT_TRUE(decode(s, parsed, out));
      EXPECT_TRUE(std::equal(ref.begin(), ref.end(), out));
      EXPECT_TRUE(std::all_of(buffer.data(), out, [](uint16_t v) { return v == kGuard; }));
      EXPECT_TRUE(std::all_of(out + ref.size(), buffer.data() + buffer.size(),
                              [](uint16_t v) { return v == kGuard; }));
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
    in::ParsedRows parsed;
    ASSERT_NO_FATAL_FAILURE(ReferenceAndParse(s, p, &ref, &parsed));
    ASSERT_NO_FATAL_FAILURE(
        ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx512Base, n));
    if (vnni) {
      ASSERT_NO_FATAL_FAILURE(
          ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx512Vnni, n));
    }
    ++checked;
  }
  EXPECT_GT(checked, 16);
}

// A valid mode 4 payload built field by field with random contents (not by the encoder, so
// that it holds what the encoder rarely writes: rows of 15 planes, 7 extra planes, every width,
// -0 means, outliers at the top channels).
std::string RandomRowsPayload(const SegmentShape& s, std::mt19937_64& rng) {
  const auto R = [&](uint32_t n) { return uint32_t(rng() % n); };
  const uint32_t T = s.tokens, H = s.kv_heads, D = s.head_dim;
  // (Draws go to named locals: two calls in one expression run in an unspecified order.)
  const auto element = [&] {
    if (R(8) == 0) return uint16_t(0x8000);  // -0
    const float mantissa = float(int(R(2001)) - 1000) / 1000.f;
    return FromF(s.dtype, std::ldexp(mantissa, int(R(12)) - 6));
  };
  std::string p(in::kHeaderBytes, '\0');
  p[0] = char(in::kModeRows);
  std::vector<uint32_t> rank(H), extra(H), width(H * in::kMaxRank, 0);
  std::vector<std::vector<uint32_t>> outliers(H);
  for (uint32_t h = 0; h < H; ++h) {
    rank[h] = R(in::kMaxRank + 1);
    const uint32_t most = std::min(D, in::kMaxOutliers);
    const uint32_t n = R(5) == 0 ? 0 : R(4) == 0 ? most : 1 + R(most);
    extra[h] = n ? R(8) : 0;
    std::vector<uint32_t> channels(D);
    for (uint32_t d = 0; d < D; ++d) channels[d] = D - 1 - d;  // The top channels, or any.
    if (R(3) != 0) std::shuffle(channels.begin(), channels.end(), rng);
    outliers[h].assign(channels.begin(), channels.begin() + n);
    std::sort(outliers[h].begin(), outliers[h].end());
    for (uint32_t j = 0; j < rank[h]; ++j) width[h * in::kMaxRank + j] = R(16);
    p += char(rank[h]);
    p += char(n);
    p += char(extra[h]);
    p += '\0';
    const float unit = 1.f + R(1000) / 1000.f;
    PutF32(&p, std::ldexp(unit, int(R(20)) - 12));
    const float sign = R(2) ? -1.f : 1.f, scale = 1.f + R(1000) / 1000.f;
    PutF32(&p, sign * std::ldexp(scale, -int(R(24))));
    for (uint32_t j = 0; j < in::kMaxRank; j += 2) {
      p += char(width[h * in::kMaxRank + j] | width[h * in::kMaxRank + j + 1] << 4);
    }
  }
  for (uint64_t c = 0; c < uint64_t{H} * D; ++c) {
    const uint16_t m = element();
    p += char(m & 0xff);
    p += char(m >> 8);
  }
  for (uint32_t h = 0; h < H; ++h)
    for (uint32_t i = 0; i < rank[h] * D; ++i) p += char(int(R(255)) - 127);  // Not -128.
  for (uint32_t h = 0; h < H; ++h)
    for (uint32_t d : outliers[h]) {
      p += char(d & 0xff);
      p += char(d >> 8);
    }
  std::vector<uint8_t> metas(uint64_t{H} * T);
  for (uint64_t i = 0; i < metas.size(); ++i) {
    const uint32_t most_b = in::kMaxPlanes - extra[i / T];
    const uint32_t b = R(4) == 0 ? 0 : R(3) == 0 ? most_b : R(most_b + 1);
    metas[i] = uint8_t(b | R(16) << 4);
  }
  p.append(metas.begin(), metas.end());
  // Bytes of `bits` bits, the padding bits past them clear.
  const auto plane = [&](uint32_t bits) {
    for (uint32_t i = 0; i < (bits + 7) / 8; ++i) {
      const bool last = i + 1 == (bits + 7) / 8 && bits % 8 != 0;
      p += char(R(256) & (last ? (1u << (bits % 8)) - 1 : 0xffu));
    }
  };
  for (uint64_t i = 0; i < metas.size(); ++i) {
    for (uint32_t q = 0; q < (metas[i] & 15u); ++q) plane(D);
    for (uint32_t q = 0; !outliers[i / T].empty() && q < extra[i / T]; ++q) {
      plane(uint32_t(outliers[i / T].size()));
    }
  }
  for (uint32_t h = 0; h < H; ++h)
    for (uint32_t j = 0; j < rank[h]; ++j)
      for (uint32_t q = 0; q < width[h * in::kMaxRank + j]; ++q) plane(T);
  return p;
}

// Every fast decoder gives the reference's values for any valid payload (RandomRowsPayload):
// head_dim 32 to 512, 1 to 40 tokens and 1 to 4 heads, into each alignment, plainly and
// streaming.
TEST(KvpoolRows, FastDecodersTakeAnyValidPayload) {
  std::vector<bool (*)(const SegmentShape&, const in::ParsedRows&, uint16_t*)> fast;
  if (CpuHasAvx2()) fast.push_back(in::DecodeRowsAvx2);
  if (CpuHasAvx512()) fast.push_back(in::DecodeRowsAvx512Base);
  if (CpuHasAvx512Vnni()) fast.push_back(in::DecodeRowsAvx512Vnni);
  if (fast.empty()) GTEST_SKIP() << "no AVX2";
  std::mt19937_64 rng(61);
  const uint32_t dims[] = {32, 64, 96, 128, 160, 256, 288, 512};
  int most_planes = 0, most_extra = 0, full_rank = 0, widest = 0;
  for (int n = 0; n < 120; ++n) {
    const uint32_t tokens = 1 + rng() % 40, heads = 1 + rng() % 4, dim = dims[rng() % 8];
    const SegmentShape s = Shape(tokens, heads, dim, rng() % 2 ? DType::kBf16 : DType::kFp16);
    const std::string p = RandomRowsPayload(s, rng);
    in::ParsedRows parsed;
    ASSERT_TRUE(
        in::ParseRows(s, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &parsed).ok())
        << n;
    std::vector<uint16_t> ref(s.Elements());
    in::DecodeRowsRef(s, parsed, ref.data());
    for (const auto decode : fast) {
      ASSERT_NO_FATAL_FAILURE(ExpectEachAlignmentDecodes(s, parsed, ref, decode, n));
    }
    for (uint64_t i = 0; i < uint64_t{s.tokens} * s.kv_heads; ++i) {
      most_planes += (parsed.metas[i] & 15) + parsed.heads[i / s.tokens].extra == in::kMaxPlanes;
    }
    for (const in::ParsedRows::Head& hd : parsed.heads) {
      most_extra += hd.extra == 7;
      full_rank += hd.rank == in::kMaxRank;
      widest += std::count(hd.widths, hd.widths + hd.rank, uint8_t{15});
    }
  }
  EXPECT_GT(most_planes, 0);  // Rows of 15 planes, regular and extra.
  EXPECT_GT(most_extra, 0);
  EXPECT_GT(full_rank, 0);
  EXPECT_GT(widest, 0);  // Coefficient codes of 15 bits.
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
    const uint32_t heads = 1 + rng() % 3, dim = dims[rng() % 6];
    const SegmentShape s =
        Shape(tokens[n % 4], heads, dim, dt, n % 3 ? SegmentKind::kKey : SegmentKind::kValue);
    const std::vector<uint16_t> v = RandomSegment(s, int(rng() % 7), rng);
    const std::string p = PayloadOf(Encode(*NormalizeParams(Params(budgets[rng() % 4])), s, v));
    if (uint8_t(p[0]) != in::kModeRows) continue;
    std::vector<uint16_t> ref;
    in::ParsedRows parsed;
    ASSERT_NO_FATAL_FAILURE(ReferenceAndParse(s, p, &ref, &parsed));
    ASSERT_NO_FATAL_FAILURE(ExpectEachAlignmentDecodes(s, parsed, ref, in::DecodeRowsAvx2, n));
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
    const uint32_t token_count = tokens[rng() % 6], heads = 1 + rng() % 3, dim = dims[rng() % 6];
    SegmentShape s = Shape(token_count, heads, dim, dt);
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
        ASSERT_TRUE(in::ParseRows(s, reinterpret_cast<const uint8_t*>(out[0].data()), out[0].size(),
                                  &parsed)
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
    // The head's tables as the planner keeps them (HeadPlan; the fast layouts by FastLayouts).
    in::AlignedVector<float> means(D);  // Aligned as the sample's are.
    in::HeadPlan hp;
    hp.codes.resize(uint64_t{hd.rank} * D);
    hp.basis.resize(uint64_t{hd.rank} * D);
    hp.inv_step.resize(hd.rank);
    for (uint32_t d = 0; d < D; ++d) means[d] = ToF(dt, FromF(dt, normal(rng)));
    for (uint32_t j = 0; j < hd.rank; ++j) {
      for (uint32_t d = 0; d < D; ++d) {
        hp.codes[j * D + d] = int8_t(int(R(255)) - 127);
        hp.basis[j * D + d] = hp.codes[j * D + d] / 127.f;
      }
      hp.inv_step[j] = std::ldexp(1.f, int(R(8)));
    }
    std::vector<uint32_t> channels(D);
    for (uint32_t d = 0; d < D; ++d) channels[d] = D - 1 - d;  // The top channels, or any.
    if (R(3) != 0) std::shuffle(channels.begin(), channels.end(), rng);
    hp.outlier.assign(channels.begin(), channels.begin() + hd.outliers);
    std::sort(hp.outlier.begin(), hp.outlier.end());
    hp.is_outlier.assign(D, 0);
    for (uint32_t d : hp.outlier) {
      hp.is_outlier[d] = 1;
      top_outliers += d >= 256;
    }
    in::FastLayouts(hd.rank, D, &hp);
    hd.means = means.data();
    hd.basis = hp.basis.data();
    hd.inv_step = hp.inv_step.data();
    hd.codes = hp.codes.data();
    hd.chunks = hp.chunks.data();
    hd.pairs = hp.pairs.data();
    hd.is_outlier = hp.is_outlier.data();
    hd.outlier = hp.outlier.data();
    hd.outlier_masks = hp.masks.data();
    if (R(4) == 0) {
      hd.lr_scale = 0.f;
    } else {
      const float sign = R(2) ? -1.f : 1.f;
      hd.lr_scale = sign * std::ldexp(1.f, -int(R(10)));
    }
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

}  // namespace
}  // namespace kvpool::kernels::kvpool_test
