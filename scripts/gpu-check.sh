#!/usr/bin/env bash
# Runs a build packed by scripts/gpu-bundle.sh on a GPU machine: the GPU tests, the rest of the
# suite with the GPU present (the daemon then encodes on it), and the codec and fusion benchmarks.
# Logs go to $OUT (default: ./gpu-out); a summary is printed last.
# Usage: scripts/gpu-check.sh BUNDLE.tar.gz [STEPS (all)]
#   STEPS: comma-separated gpu-tests (ctest -L gpu), rest (the rest of the suite), codec
#   (kvpool-bench codec --paths cpu,cuda: the reference's loops take minutes and are measured
#   without a GPU anyway; then $BENCH_ARGS, e.g. "--only kivi" or "--paths cuda", the last
#   --paths winning), fusion (kvpool-bench fusion);
#   all = every one.
set -uo pipefail
bundle=${1:?usage: scripts/gpu-check.sh BUNDLE.tar.gz [STEPS]}
steps=",${2:-all},"
[[ $steps == ,all, ]] && steps=",gpu-tests,rest,codec,fusion,"
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
# The ctest files name the absolute path the build was made in (bundle-root): unpack there, or
# beside us with that path linked to here.
marker=$(tar -tzf "$bundle" | grep -m1 '/bundle-root$')
root=$(tar -xzOf "$bundle" "$marker")
builddir=$root/$(dirname "${marker#./}")
if [[ ! -e $root ]]; then mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"; fi
tar -xzf "$bundle" -C "$root"
export LD_LIBRARY_PATH=$builddir/bundle-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cd "$builddir"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$out/gpu.txt"
summary=()
if [[ $steps == *,gpu-tests,* ]]; then
  ctest -L gpu --output-on-failure --timeout 300 > "$out/ctest-gpu.log" 2>&1
  summary+=("ctest -L gpu: $(grep -E 'tests passed|tests failed' "$out/ctest-gpu.log")")
fi
if [[ $steps == *,rest,* ]]; then
  ctest -LE 'gpu|python|fuzz' -j "$(nproc)" --output-on-failure --timeout 300 \
    > "$out/ctest-rest.log" 2>&1
  summary+=("ctest (rest, GPU present): $(grep -E 'tests passed|tests failed' "$out/ctest-rest.log")")
fi
if [[ $steps == *,codec,* ]]; then
  ./bin/kvpool-bench codec --paths cpu,cuda ${BENCH_ARGS:-} > "$out/bench-codec.txt" 2>&1
fi
if [[ $steps == *,fusion,* ]]; then
  ./bin/kvpool-bench fusion > "$out/bench-fusion.txt" 2>&1
fi
echo "==== summary"
printf '%s\n' "${summary[@]}"
grep -A40 'The following tests FAILED' "$out"/ctest-*.log 2>/dev/null | head -40
[[ -f $out/bench-codec.txt ]] && grep -E 'cuda|d2d|memcpy  |Error|error' "$out/bench-codec.txt"
[[ -f $out/bench-fusion.txt ]] && tail -15 "$out/bench-fusion.txt"
