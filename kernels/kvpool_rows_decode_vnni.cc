// The mode 4 decoder built for AVX-512 VNNI (see kvpool_rows_decode_avx512.cc).
#define KVPOOL_ROWS_VNNI 1
#include "kernels/kvpool_rows_decode_avx512.cc"  // NOLINT: the same source, another target.
