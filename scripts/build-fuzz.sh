#!/usr/bin/env bash
# Builds the libFuzzer targets with clang into ${1:-build}/fuzz (instrumented common/ and
# kernels/). Prints one line and exits 0 without clang: the fuzz tests then skip.
set -euo pipefail
build=${1:-build}
cc=$(command -v clang || command -v clang-14 || true)
cxx=$(command -v clang++ || command -v clang++-14 || true)
if [ -z "$cc" ] || [ -z "$cxx" ]; then
  echo "build-fuzz: clang not found; fuzz targets not built (the fuzz tests will skip)"
  exit 0
fi
cmake -S . -B "$build/fuzz" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVPOOL_FUZZ=ON \
  -DKVPOOL_BUILD_TESTS=OFF -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
cmake --build "$build/fuzz" --target segment_fuzzer -j "$(nproc)"
