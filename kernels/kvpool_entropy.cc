#include "kernels/kvpool_entropy.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kernels/codec.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

void PutU16(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}
void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}

// Frequencies summing to kProbScale, every counted symbol at least 1, from counts.
void Normalise(const uint64_t* counts, uint16_t* freq) {
  uint64_t total = 0;
  for (uint32_t s = 0; s < kSymbols; ++s) total += counts[s];
  int64_t sum = 0;
  for (uint32_t s = 0; s < kSymbols; ++s) {
    freq[s] = counts[s] == 0 ? 0
                             : uint16_t(std::max<uint64_t>(1, counts[s] * kProbScale / total));
    sum += freq[s];
  }
  int64_t diff = int64_t{kProbScale} - sum;
  while (diff != 0) {  // Give or take from the largest (at most 32 rounds: each ends a deficit).
    uint32_t big = 0;
    for (uint32_t s = 1; s < kSymbols; ++s) big = freq[s] > freq[big] ? s : big;
    const int64_t change = diff > 0 ? diff : -std::min<int64_t>(-diff, freq[big] - 1);
    freq[big] = uint16_t(freq[big] + change);
    diff -= change;
  }
}

// The rANS encoder of one lane: symbols are put in reverse decoding order; words come out in
// reverse reading order, into a buffer of at least 4 words per code (the most a code takes: an
// escape's two bytes, the symbol, the low bits). Renormalisation stores its word whether it
// emits it or not, so the step has no branch the predictor would miss on.
class LaneEncoder {
 public:
  explicit LaneEncoder(uint16_t* words) : words_(words) {}
  // The symbol at [start, start + freq) of the table; `reciprocal` = RansReciprocal(freq).
  void Put(uint32_t start, uint32_t freq, uint64_t reciprocal) {
    Renormalise(freq);
    const uint32_t q = RansQuotient(x_, reciprocal);
    x_ = (q << kProbBits) + (x_ - q * freq) + start;
  }
  // `bits` uniform bits: freq = 2^(12 - bits), a shift.
  void Uniform(uint32_t value, uint32_t bits) {
    const uint32_t f = kProbScale >> bits;
    Renormalise(f);
    x_ = ((x_ >> (kProbBits - bits)) << kProbBits) + (x_ & (f - 1)) + value * f;
  }
  uint32_t state() const { return x_; }
  uint64_t words() const { return n_; }

 private:
  void Renormalise(uint32_t freq) {
    const uint64_t x_max = uint64_t{kStateLow >> kProbBits} << 16;  // Renormalised: x < x_max.
    const uint32_t emit = x_ >= x_max * freq;
    words_[n_] = uint16_t(x_);
    n_ += emit;
    x_ >>= 16 * emit;  // A shift by 0 or 16, not a select the compiler turns into a branch.
  }
  uint32_t x_ = kStateLow;
  uint64_t n_ = 0;
  uint16_t* words_;
};

}  // namespace

uint64_t StreamBound(uint32_t rows, uint32_t cols) {
  if (rows == 0 || cols == 0) return 0;
  const uint64_t lanes = (cols + kLaneCols - 1) / kLaneCols;
  // At most 12 + 16 + 12 bits of information per code: under 3 words, plus a word per lane.
  return 1 + kMaxTables * kTableBytes + (cols + 1) / 2 + lanes * (kLaneEntryBytes + 2) +
         uint64_t{rows} * cols * 6;
}

void AppendStream(const uint16_t* zz, uint32_t rows, uint32_t cols, std::vector<uint8_t>* out) {
  if (rows == 0 || cols == 0) return;
  // Columns are grouped by magnitude: bucket = floor(2 log2(1 + mean code)), coarsened until
  // at most kMaxTables buckets remain.
  std::vector<double> mean(cols, 0.0);
  for (uint32_t t = 0; t < rows; ++t)
    for (uint32_t c = 0; c < cols; ++c) mean[c] += zz[uint64_t{t} * cols + c];
  std::vector<uint32_t> bucket(cols);
  for (uint32_t c = 0; c < cols; ++c) {
    mean[c] /= rows;
    bucket[c] = uint32_t(std::floor(2 * std::log2(1 + mean[c])));
  }
  std::vector<uint32_t> distinct;
  for (;;) {
    distinct = bucket;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    if (distinct.size() <= kMaxTables) break;
    for (uint32_t& b : bucket) b /= 2;
  }
  const uint32_t K = uint32_t(distinct.size());
  std::vector<uint8_t> table_of(cols);
  std::vector<double> table_sum(K, 0.0), table_cols(K, 0.0);
  for (uint32_t c = 0; c < cols; ++c) {
    table_of[c] = uint8_t(std::lower_bound(distinct.begin(), distinct.end(), bucket[c]) -
                          distinct.begin());
    table_sum[table_of[c]] += mean[c];
    table_cols[table_of[c]] += 1;
  }
  // Shift: the low bits that are close to uniform, so the table sees a mean of 2 to 4.
  std::vector<uint32_t> shift(K);
  for (uint32_t k = 0; k < K; ++k) {
    const double m = table_sum[k] / table_cols[k];
    shift[k] = m < 4 ? 0 : std::min<uint32_t>(kMaxShift, uint32_t(std::floor(std::log2(m))) - 1);
  }
  std::vector<uint64_t> counts(uint64_t{K} * kSymbols, 0);
  for (uint32_t t = 0; t < rows; ++t)
    for (uint32_t c = 0; c < cols; ++c) {
      const uint32_t hi = zz[uint64_t{t} * cols + c] >> shift[table_of[c]];
      ++counts[uint64_t{table_of[c]} * kSymbols + std::min(hi, kEscape)];
    }
  std::vector<uint16_t> freq(uint64_t{K} * kSymbols), start(uint64_t{K} * kSymbols);
  std::vector<uint64_t> reciprocal(uint64_t{K} * kSymbols, 0);
  const uint64_t lanes = (cols + kLaneCols - 1) / kLaneCols;
  const uint64_t at = out->size();
  out->resize(at + 1 + K * kTableBytes + (cols + 1) / 2 + lanes * kLaneEntryBytes, 0);
  uint8_t* p = out->data() + at;
  *p++ = uint8_t(K);
  for (uint32_t k = 0; k < K; ++k) {
    Normalise(&counts[uint64_t{k} * kSymbols], &freq[uint64_t{k} * kSymbols]);
    *p++ = uint8_t(shift[k]);
    uint32_t cum = 0;
    for (uint32_t s = 0; s < kSymbols; ++s) {
      const uint64_t i = uint64_t{k} * kSymbols + s;
      start[i] = uint16_t(cum);
      cum += freq[i];
      if (freq[i] != 0) reciprocal[i] = RansReciprocal(freq[i]);
      PutU16(p + 2 * s, freq[i]);
    }
    p += 2 * kSymbols;
  }
  for (uint32_t c = 0; c < cols; ++c) p[c / 2] |= uint8_t(table_of[c] << (4 * (c & 1)));
  const uint64_t dir_at = at + 1 + K * kTableBytes + (cols + 1) / 2;
  // Four lanes at a time: their state chains are independent, so the core overlaps them.
  const uint64_t per_lane = 4 * uint64_t{rows} * kLaneCols + 1;
  const std::unique_ptr<uint16_t[]> words(
      new uint16_t[4 * per_lane]);  // Not zeroed: written first.
  auto put = [&](LaneEncoder* enc, uint32_t t, uint32_t c) {
    const uint32_t k = table_of[c], sh = shift[k];
    const uint32_t u = zz[uint64_t{t} * cols + c], hi = u >> sh;
    if (sh != 0) enc->Uniform(u & ((1u << sh) - 1), sh);
    uint32_t sym = hi;
    if (hi >= kEscape) {
      enc->Uniform((hi - kEscape) >> 8, 8);
      enc->Uniform((hi - kEscape) & 255, 8);
      sym = kEscape;
    }
    const uint64_t i = uint64_t{k} * kSymbols + sym;
    enc->Put(start[i], freq[i], reciprocal[i]);
  };
  for (uint32_t l0 = 0; l0 < lanes; l0 += 4) {
    const uint32_t n = std::min<uint32_t>(4, uint32_t(lanes) - l0);
    LaneEncoder enc[4] = {LaneEncoder(&words[0]), LaneEncoder(&words[per_lane]),
                          LaneEncoder(&words[2 * per_lane]), LaneEncoder(&words[3 * per_lane])};
    if (n == 4 && (l0 + 4) * kLaneCols <= cols) {  // Full lanes: a loop of constant trips.
      for (uint32_t t = rows; t-- > 0;) {
        for (uint32_t j = kLaneCols; j-- > 0;) {
          for (uint32_t k = 0; k < 4; ++k) put(&enc[k], t, (l0 + k) * kLaneCols + j);
        }
      }
    } else {
      for (uint32_t t = rows; t-- > 0;) {
        for (uint32_t j = kLaneCols; j-- > 0;) {
          for (uint32_t k = 0; k < n; ++k) {
            const uint32_t c = (l0 + k) * kLaneCols + j;
            if (c < cols) put(&enc[k], t, c);
          }
        }
      }
    }
    for (uint32_t k = 0; k < n; ++k) {
      uint8_t* entry = out->data() + dir_at + uint64_t{l0 + k} * kLaneEntryBytes;
      const uint64_t count = enc[k].words();
      PutU32(entry, enc[k].state());
      PutU32(entry + 4, uint32_t(2 * count));
      const uint64_t data_at = out->size();
      out->resize(data_at + 2 * count);
      const uint16_t* w = &words[k * per_lane];
      for (uint64_t i = 0; i < count; ++i) PutU16(out->data() + data_at + 2 * i, w[count - 1 - i]);
    }
  }
}

absl::Status ParseStream(const uint8_t* payload, uint64_t size, uint32_t rows, uint32_t cols,
                         uint64_t* pos, Stream* s) {
  switch (CheckStream(payload, size, rows, cols, pos, s)) {
    case StreamError::kOk: return absl::OkStatus();
    case StreamError::kTruncated: return absl::DataLossError("kvpool: entropy stream truncated");
    case StreamError::kTableCount:
      return absl::DataLossError("kvpool: entropy stream has 0 or more than 16 tables");
    case StreamError::kShift: return absl::DataLossError("kvpool: entropy table shift above 12");
    case StreamError::kFrequencies:
      return absl::DataLossError("kvpool: entropy table frequencies do not sum to 4096");
    case StreamError::kColumnTable:
      return absl::DataLossError("kvpool: column refers to a missing entropy table");
    case StreamError::kPadding:
      return absl::DataLossError("kvpool: padding nibble of the column tables is not zero");
    case StreamError::kLaneDirectory:
      return absl::DataLossError("kvpool: entropy lane directory is corrupt");
    case StreamError::kLaneData: return absl::DataLossError("kvpool: entropy lane data truncated");
  }
  return absl::DataLossError("kvpool: entropy stream is corrupt");
}

absl::Status DecodeStream(const Stream& s, int32_t* codes, uint64_t ld) {
  if (s.rows == 0 || s.cols == 0) return absl::OkStatus();
  // This thread's tables (256 KiB), kept between calls: BuildTable writes every slot, and a
  // fresh vector of them was a 256 KiB zero fill per stream.
  thread_local const std::unique_ptr<DecodeTable[]> tables(new DecodeTable[kMaxTables]);
  for (uint32_t k = 0; k < s.tables; ++k) BuildTable(s, k, &tables[k]);
  const uint32_t full = s.cols / kLaneCols;  // Lanes of 16 columns.
  uint64_t offset = 0;
  auto open = [&](uint32_t lane) {
    const uint8_t* e = s.lane_dir + uint64_t{lane} * kLaneEntryBytes;
    const LaneCursor cur = OpenLane(LoadU32(e), s.data + offset, LoadU32(e + 4));
    offset += cur.bytes;
    return cur;
  };
  uint32_t l = 0;
  while (CpuHasAvx512() && l + 16 <= full) {  // 64, 32 or 16 lanes at a time.
    const uint32_t groups = l + 64 <= full ? 4 : l + 32 <= full ? 2 : 1;
    const int64_t bad = DecodeLanesAvx512(s, tables.get(), l, groups, offset, codes, ld);
    if (bad == -2) break;
    if (bad >= 0) {
      return absl::DataLossError(absl::StrCat("kvpool: entropy lane ", l + bad, " is corrupt"));
    }
    for (uint32_t i = 0; i < 16 * groups; ++i, ++l) {
      offset += LoadU32(s.lane_dir + uint64_t{l} * kLaneEntryBytes + 4);
    }
  }
  // The rest four lanes at a time, in named cursors (registers), the last lane full or not; a
  // lane's columns beyond `width` and lanes beyond the stream's decode nothing.
  for (; l < s.lanes; l += 4) {
    const uint32_t n = std::min<uint32_t>(4, s.lanes - l);
    LaneCursor cur[4];
    uint32_t width[4] = {0, 0, 0, 0};
    const DecodeTable* tab[4][kLaneCols];
    for (uint32_t k = 0; k < 4; ++k) {
      if (k < n) {
        cur[k] = open(l + k);
        width[k] = std::min(kLaneCols, s.cols - (l + k) * kLaneCols);
      }
      for (uint32_t j = 0; j < kLaneCols; ++j) {
        tab[k][j] =
            &tables[j < width[k] ? ColumnTable(s.column_tables, (l + k) * kLaneCols + j) : 0];
      }
    }
    LaneCursor a = cur[0], b = cur[1], c = cur[2], d = cur[3];
    for (uint32_t t = 0; t < s.rows && a.ok && b.ok && c.ok && d.ok; ++t) {
      int32_t* row = codes + uint64_t{t} * ld + uint64_t{l} * kLaneCols;
      for (uint32_t j = 0; j < kLaneCols; ++j) {
        if (j < width[0]) row[j] = DecodeCode(*tab[0][j], &a);
        if (j < width[1]) row[kLaneCols + j] = DecodeCode(*tab[1][j], &b);
        if (j < width[2]) row[2 * kLaneCols + j] = DecodeCode(*tab[2][j], &c);
        if (j < width[3]) row[3 * kLaneCols + j] = DecodeCode(*tab[3][j], &d);
      }
    }
    cur[0] = a, cur[1] = b, cur[2] = c, cur[3] = d;
    // The lane that failed (the others stopped with it), else one not finished.
    for (int pass = 0; pass < 2; ++pass) {
      for (uint32_t k = 0; k < n; ++k) {
        if (pass == 0 ? !cur[k].ok : !LaneFinished(cur[k])) {
          return absl::DataLossError(absl::StrCat("kvpool: entropy lane ", l + k, " is corrupt"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvpool::kernels::kvpool::internal
