#!/usr/bin/env bash
# Runs one fuzz target for a bounded time: run-fuzz.sh BINARY SECONDS [corpus dir].
# Exit 77 (ctest: skipped) when the binary was not built (no clang).
set -uo pipefail
bin=$1
seconds=$2
[ -x "$bin" ] || { echo "fuzz target $bin not built (no clang): skipped"; exit 77; }
corpus=$(mktemp -d /tmp/kvpool-fuzz-XXXXXX)
trap 'rm -rf "$corpus"' EXIT
[ $# -ge 3 ] && cp -r "$3"/. "$corpus"/ 2>/dev/null
"$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  "$corpus" 2>&1 | tail -15
exit "${PIPESTATUS[0]}"
