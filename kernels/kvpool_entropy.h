// Entropy-coded code matrices of the kvpool codec's payload mode 3 (the stream format is
// documented at the top of kvpool_ref.cc). A stream holds a [rows][cols] matrix of zigzag
// codes. Columns share up to 16 frequency tables (the encoder groups columns of similar
// magnitude); each code is coded as its high part (a table symbol, 31 = escape followed by two
// uniform bytes) and `shift` low bits (uniform), with rANS: 12-bit probabilities, 32-bit state
// in [2^16, 2^32), 16-bit words. Every 16 consecutive columns form a lane with its own state
// and words, so lanes decode independently (a GPU thread or a host loop each).
//
// DecodeLane is the one definition of decoding, compiled for the host decoders and, in CUDA
// builds, for the device kernel. Not a public API. Thread-safe (stateless).
#ifndef KVPOOL_KERNELS_KVPOOL_ENTROPY_H_
#define KVPOOL_KERNELS_KVPOOL_ENTROPY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/host_device.h"

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint32_t kProbBits = 12;
inline constexpr uint32_t kProbScale = 1u << kProbBits;
inline constexpr uint32_t kSymbols = 32;             // Per table; the last one is the escape.
inline constexpr uint32_t kEscape = kSymbols - 1;
inline constexpr uint32_t kMaxTables = 16;
inline constexpr uint32_t kMaxShift = 12;
inline constexpr uint32_t kLaneCols = 16;
inline constexpr uint32_t kStateLow = 1u << 16;      // rANS state lies in [2^16, 2^32).
inline constexpr uint32_t kTableBytes = 1 + 2 * kSymbols;
inline constexpr uint32_t kLaneEntryBytes = 8;       // u32 final state, u32 data bytes.
inline constexpr uint32_t kMaxZigZagCode = 32766;    // Zigzag of +-16383 (kMaxCode).

// One table, ready for decoding: per slot, its symbol (bits 0-4), the symbol's frequency
// (bits 5-17) and the slot's offset from the symbol's first slot (bits 18-29): one load per code.
struct DecodeTable {
  uint32_t shift = 0;
  uint32_t slot[kProbScale] = {};
};

// A validated stream: pointers into the payload.
struct Stream {
  uint32_t rows = 0, cols = 0, tables = 0, lanes = 0;
  const uint8_t* table_bytes = nullptr;    // tables * kTableBytes
  const uint8_t* column_tables = nullptr;  // Nibbles, column c at c / 2 (low nibble first).
  const uint8_t* lane_dir = nullptr;       // lanes * kLaneEntryBytes
  const uint8_t* data = nullptr;           // Lane data, lane after lane.
};

KVPOOL_HD uint32_t LoadU32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
KVPOOL_HD uint32_t ColumnTable(const uint8_t* nibbles, uint32_t c) {
  return (nibbles[c / 2] >> (4 * (c & 1))) & 15;
}

// Why CheckStream rejects a stream.
enum class StreamError : int { kOk = 0, kTruncated, kTableCount, kShift, kFrequencies,
                               kColumnTable, kPadding, kLaneDirectory, kLaneData };

// Checks the stream of a [rows][cols] matrix at payload[*pos, size): tables (frequencies sum to
// 4096, shifts <= 12), column tables, lane directory (states, even lengths within `size`). On
// success fills *s and advances *pos past the stream. The one definition of the checks, for
// the host parser and the CUDA parse kernel.
KVPOOL_HD StreamError CheckStream(const uint8_t* payload, uint64_t size, uint32_t rows,
                                  uint32_t cols, uint64_t* pos, Stream* s) {
  *s = Stream();
  s->rows = rows;
  s->cols = cols;
  if (rows == 0 || cols == 0) return StreamError::kOk;
  uint64_t p = *pos;
  if (size - p < 1) return StreamError::kTruncated;
  s->tables = payload[p++];
  if (s->tables == 0 || s->tables > kMaxTables) return StreamError::kTableCount;
  s->lanes = (cols + kLaneCols - 1) / kLaneCols;
  const uint64_t fixed = uint64_t{s->tables} * kTableBytes + (cols + 1) / 2 +
                         uint64_t{s->lanes} * kLaneEntryBytes;
  if (size - p < fixed) return StreamError::kTruncated;
  s->table_bytes = payload + p;
  for (uint32_t k = 0; k < s->tables; ++k) {
    const uint8_t* tb = s->table_bytes + uint64_t{k} * kTableBytes;
    if (tb[0] > kMaxShift) return StreamError::kShift;
    uint32_t sum = 0;
    for (uint32_t i = 0; i < kSymbols; ++i) sum += uint32_t(tb[1 + 2 * i]) | tb[2 + 2 * i] << 8;
    if (sum != kProbScale) return StreamError::kFrequencies;
  }
  p += uint64_t{s->tables} * kTableBytes;
  s->column_tables = payload + p;
  for (uint32_t c = 0; c < cols; ++c) {
    if (ColumnTable(s->column_tables, c) >= s->tables) return StreamError::kColumnTable;
  }
  if ((cols & 1) && (s->column_tables[cols / 2] >> 4) != 0) return StreamError::kPadding;
  p += (cols + 1) / 2;
  s->lane_dir = payload + p;
  p += uint64_t{s->lanes} * kLaneEntryBytes;
  uint64_t data_bytes = 0;
  for (uint32_t l = 0; l < s->lanes; ++l) {
    const uint8_t* e = s->lane_dir + uint64_t{l} * kLaneEntryBytes;
    const uint32_t bytes = LoadU32(e + 4);
    if (LoadU32(e) < kStateLow || (bytes & 1)) return StreamError::kLaneDirectory;
    data_bytes += bytes;
  }
  if (size - p < data_bytes) return StreamError::kLaneData;
  s->data = payload + p;
  *pos = p + data_bytes;
  return StreamError::kOk;
}

// Table k of a checked stream, ready for DecodeLane.
KVPOOL_HD void BuildTable(const Stream& s, uint32_t k, DecodeTable* d) {
  const uint8_t* tb = s.table_bytes + uint64_t{k} * kTableBytes;
  d->shift = tb[0];
  uint32_t* slot = d->slot;  // The frequencies sum to kProbScale (CheckStream): every slot.
  for (uint32_t i = 0; i < kSymbols; ++i) {
    const uint32_t freq = uint32_t(tb[1 + 2 * i]) | uint32_t(tb[2 + 2 * i]) << 8;
    const uint32_t entry = i | freq << 5;
    // A signed count and a pointer: the loop the compiler vectorises (an unsigned index
    // cum + n may wrap, and kept it scalar).
    for (int32_t n = 0; n < int32_t(freq); ++n) slot[n] = entry + (uint32_t(n) << 18);
    slot += freq;
  }
}

// Byte offset of lane l's data from s.data (the lengths of the lanes before it).
KVPOOL_HD uint64_t LaneOffset(const Stream& s, uint32_t l) {
  uint64_t off = 0;
  for (uint32_t i = 0; i < l; ++i) off += LoadU32(s.lane_dir + uint64_t{i} * kLaneEntryBytes + 4);
  return off;
}

// Where a lane's decoder stands.
struct LaneCursor {
  uint32_t x = 0, pos = 0, bytes = 0;
  const uint8_t* data = nullptr;
  bool ok = true;
};

// A lane's cursor before its first code: its final encoder state and its words.
KVPOOL_HD LaneCursor OpenLane(uint32_t state, const uint8_t* data, uint32_t bytes) {
  LaneCursor l;
  l.x = state;
  l.data = data;
  l.bytes = bytes;
  l.ok = state >= kStateLow;
  return l;
}

// True when a lane decoded consistently: every word read and the state back at its start.
KVPOOL_HD bool LaneFinished(const LaneCursor& l) {
  return l.ok && l.pos == l.bytes && l.x == kStateLow;
}

// Takes the symbol at slot range [start, start + freq) out of the state, then refills.
KVPOOL_HD void Advance(LaneCursor* l, uint32_t freq, uint32_t slot_minus_start) {
  l->x = freq * (l->x >> kProbBits) + slot_minus_start;
  if (l->x < kStateLow) {
    if (l->pos + 2 <= l->bytes) {
      l->x = (l->x << 16) | uint32_t(l->data[l->pos]) | uint32_t(l->data[l->pos + 1]) << 8;
      l->pos += 2;
    } else {
      l->ok = false;
    }
  }
}

// A value of `bits` bits, each equally likely.
KVPOOL_HD uint32_t DecodeUniform(LaneCursor* l, uint32_t bits) {
  const uint32_t slot = l->x & (kProbScale - 1), f = kProbScale >> bits;
  Advance(l, f, slot & (f - 1));
  return slot >> (kProbBits - bits);
}

// The next code of a lane, signed (un-zigzagged). Clears l->ok when it is invalid.
KVPOOL_HD int32_t DecodeCode(const DecodeTable& tb, LaneCursor* l) {
  const uint32_t e = tb.slot[l->x & (kProbScale - 1)];
  const uint32_t sym = e & 31;
  Advance(l, (e >> 5) & 0x1fff, e >> 18);
  uint32_t hi = sym;
  if (sym == kEscape) {
    const uint32_t lo_byte = DecodeUniform(l, 8);
    hi = kEscape + lo_byte + (DecodeUniform(l, 8) << 8);
  }
  if (hi > (kMaxZigZagCode >> tb.shift)) {
    l->ok = false;
    hi = 0;
  }
  uint32_t u = hi << tb.shift;
  if (tb.shift != 0) u |= DecodeUniform(l, tb.shift);
  if (u > kMaxZigZagCode) l->ok = false;
  return int32_t(u >> 1) ^ -int32_t(u & 1);
}

// Decodes lane `lane` of a stream into codes[t * ld + c] for its columns and every row. `data`
// is the lane's own words (`bytes` of them, from the lane directory). False when the lane is
// inconsistent (it reads nothing beyond `bytes` either way). The definition of decoding.
KVPOOL_HD bool DecodeLane(const DecodeTable* tables, const uint8_t* column_tables,
                          uint32_t rows, uint32_t cols, uint32_t lane, uint32_t state,
                          const uint8_t* data, uint32_t bytes, int32_t* codes,
                          uint64_t ld) {
  const uint32_t c0 = lane * kLaneCols;
  const uint32_t c1 = c0 + kLaneCols < cols ? c0 + kLaneCols : cols;
  LaneCursor l = OpenLane(state, data, bytes);
  for (uint32_t t = 0; t < rows && l.ok; ++t) {
    for (uint32_t c = c0; c < c1 && l.ok; ++c) {
      codes[uint64_t{t} * ld + c] = DecodeCode(tables[ColumnTable(column_tables, c)], &l);
    }
  }
  return LaneFinished(l);
}

// The encoder's x / freq (x < 2^32, 1 <= freq <= kProbScale) as a multiplication by
// RansReciprocal(freq), exact; a division's latency was most of the encoder's time. With
// m = ceil(2^44 / freq), x * m / 2^44 exceeds x / freq by less than x / 2^44 < 2^-12, and
// 2^-12 <= 1 / freq, the least distance from x / freq up to the next integer when x / freq is
// not one: the floor is the same.
inline uint64_t RansReciprocal(uint32_t freq) { return ((uint64_t{1} << 44) + freq - 1) / freq; }
inline uint32_t RansQuotient(uint32_t x, uint64_t reciprocal) {
  return uint32_t((static_cast<unsigned __int128>(x) * reciprocal) >> 44);
}

// Size bound of an encoded stream of a [rows][cols] matrix.
uint64_t StreamBound(uint32_t rows, uint32_t cols);

// Appends the stream of zigzag codes zz[t * cols + c] (each <= kMaxZigZagCode) to `out`.
// Deterministic: every encoder path writes the same bytes. An empty matrix writes nothing.
void AppendStream(const uint16_t* zz, uint32_t rows, uint32_t cols, std::vector<uint8_t>* out);

// Decodes the 16 x `groups` (1, 2 or 4) full lanes from l0 of a checked stream, whose words
// start `offset` bytes into s.data, as DecodeLane would each; tables[k] is table k built.
// Returns -1 when all finished consistently, -2 when the stream's words span 2 GiB or more or
// `groups` is not 1, 2 or 4 (nothing decoded: the caller decodes lane by lane), else the first
// inconsistent lane (from 0). Requires AVX-512 F, BW, VL and DQ (CpuHasAvx512).
// kvpool_entropy_avx512.cc.
int64_t DecodeLanesAvx512(const Stream& s, const DecodeTable* tables, uint32_t l0, uint32_t groups,
                          uint64_t offset, int32_t* codes, uint64_t ld);

// CheckStream with a DataLoss status that says what is wrong.
absl::Status ParseStream(const uint8_t* payload, uint64_t size, uint32_t rows, uint32_t cols,
                         uint64_t* pos, Stream* stream);

// Decodes a parsed stream into codes[t * ld + c] (t < rows, c < cols): the same codes as
// DecodeLane lane by lane, 16 full lanes at a time on AVX-512 (DecodeLanesAvx512); the rest
// (all of them without AVX-512, the last one full or not) four lanes interleaved (their state
// chains are independent, so the core overlaps them).
// DataLoss when a lane is corrupt (checksums catch that first for stored segments; this guards
// crafted payloads).
absl::Status DecodeStream(const Stream& s, int32_t* codes, uint64_t ld);

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_ENTROPY_H_
