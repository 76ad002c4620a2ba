#!/usr/bin/env bash
# Packs a finished build (binaries, ctest files) and the shared libraries it links from this
# machine's packages into one tarball, for a GPU machine that has the NVIDIA driver but none of
# kvpool's Debian packages (a bare CUDA image). scripts/gpu-check.sh unpacks and runs it there
# (the ctest files name the absolute path the build was made in: bundle-root says which).
# Usage: scripts/gpu-bundle.sh [BUILD_DIR (build)] [OUT (build/kvpool-gpu.tar.gz)]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-$build/kvpool-gpu.tar.gz}
[[ -x $build/bin/kvpoold ]] || { echo "gpu-bundle: no build in $build (run make first)" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$build/bundle-lib"
pwd > "$stage/$build/bundle-root"
binaries=$(find "$build/bin" "$build/tests" "$build/fuzz" -maxdepth 1 -type f -perm -u+x 2>/dev/null)
# Every ctest file (test lists written by gtest_discover_tests included), none of the objects.
find "$build" -path '*/CMakeFiles' -prune -o -path "$build/venv" -prune -o \
  \( -name 'CTestTestfile.cmake' -o -name '*_tests.cmake' -o -name '*_include.cmake' \) -print |
  while read -r f; do mkdir -p "$stage/$(dirname "$f")" && cp "$f" "$stage/$f"; done
for b in $binaries; do
  mkdir -p "$stage/$(dirname "$b")" && cp "$b" "$stage/$b"
done
# The C and C++ runtimes stay the target's own (same or newer glibc and libstdc++ there).
for b in $binaries; do ldd "$b" | awk '/=> \//{print $3}'; done | sort -u |
  grep -Ev '/(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/$build/bundle-lib/"; done
tar -C "$stage" -czf "$out" .
echo "gpu-bundle: $out ($(du -h "$out" | cut -f1), $(echo "$binaries" | wc -w) binaries," \
  "$(ls "$stage/$build/bundle-lib" | wc -l) libraries)"
