#!/usr/bin/env bash
# Create the Python virtual environment used by tests/python (a gRPC client that no one in
# the project wrote; the codecs' figures) and scripts/plot-codecs.py (matplotlib), and install
# its packages. Idempotent: when the venv exists and the packages import, it changes nothing
# and prints one line.
#
#   scripts/setup-python.sh            # venv at build/venv (relative to the repo root)
#   KVPOOL_VENV=/tmp/v scripts/setup-python.sh
#
# Environment: KVPOOL_VENV (venv path; relative paths are taken from the repo root),
# PYTHON (interpreter that creates the venv, default python3).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KVPOOL_VENV:-build/venv}"
case "$venv" in
  /*) ;;
  *) venv="$repo_root/$venv" ;;
esac
python="${PYTHON:-python3}"

# Pinned-ish: one gRPC release line for all four so that their protobuf requirements agree.
grpc_spec='>=1.66,<2'
packages=(
  "grpcio${grpc_spec}"
  "grpcio-tools${grpc_spec}"
  "grpcio-health-checking${grpc_spec}"
  "grpcio-reflection${grpc_spec}"
  "matplotlib>=3.7,<4"
)
import_check='import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2_grpc, grpc_reflection.v1alpha.reflection_pb2_grpc, matplotlib'

fail() {
  echo "setup-python: $*" >&2
  exit 1
}

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

venv_ok() {
  [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1 &&
    "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

created=0
if ! venv_ok; then
  command -v "$python" >/dev/null 2>&1 || fail "no '$python' on PATH"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv" >"$log" 2>&1; then
    rm -rf "$venv"
    if grep -qiE 'ensurepip|python3-venv' "$log"; then
      # Debian splits ensurepip into python3-venv.
      apt_get=(apt-get)
      if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || fail "python3 -m venv needs python3-venv (ensurepip); not root and no sudo"
        apt_get=(sudo apt-get)
      fi
      if ! DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q python3-venv >"$log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" update -q >"$log" 2>&1 ||
          fail "apt-get update failed: $(tail -n 1 "$log")"
        DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q python3-venv >"$log" 2>&1 ||
          fail "apt-get install python3-venv failed: $(tail -n 1 "$log")"
      fi
      "$python" -m venv "$venv" >"$log" 2>&1 ||
        { rm -rf "$venv"; fail "$python -m venv failed even with python3-venv: $(tail -n 1 "$log")"; }
    else
      fail "$python -m venv $venv failed: $(tail -n 1 "$log")"
    fi
  fi
  venv_ok || fail "venv at $venv has no working python/pip"
  created=1
fi

if [[ $created -eq 0 ]] && "$venv/bin/python" -c "$import_check" >/dev/null 2>&1; then
  echo "setup-python: venv $venv already has grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection, matplotlib"
  exit 0
fi

if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "${packages[@]}" >"$log" 2>&1; then
  fail "pip install failed: $(grep -m1 -iE 'error' "$log" || tail -n 1 "$log")"
fi
"$venv/bin/python" -c "$import_check" >"$log" 2>&1 ||
  fail "packages installed but the import check fails: $(tail -n 1 "$log")"

version="$("$venv/bin/python" -c 'import grpc; print(grpc.__version__)')"
if [[ $created -eq 1 ]]; then
  echo "setup-python: created venv $venv and installed grpcio $version with tools, health-checking, reflection, and matplotlib"
else
  echo "setup-python: installed grpcio $version with tools, health-checking, reflection, and matplotlib into venv $venv"
fi
