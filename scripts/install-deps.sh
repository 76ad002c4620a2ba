#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages kvpool's build, tests, demo and benchmarks need.
# Idempotent; prints nothing when everything is already present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libyaml-cpp-dev libssl-dev libxxhash-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  redis-server   # baseline in kvpool-bench
  prometheus     # promtool lints /metrics in the tests
  python3 python3-venv curl
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
# --no-install-recommends keeps prometheus to its binaries; no service is started in containers.
if ! $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/kvpool-apt.log 2>&1; then
  echo "install-deps: apt-get install failed; see /tmp/kvpool-apt.log" >&2
  tail -5 /tmp/kvpool-apt.log >&2
  exit 1
fi
# Debian starts services it installs where it can; kvpool starts its own on loopback.
if command -v systemctl >/dev/null && systemctl is-active -q prometheus 2>/dev/null; then
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
