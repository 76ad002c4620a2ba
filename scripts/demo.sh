#!/usr/bin/env bash
# make demo: starts kvpoold on 127.0.0.1 with its embedded defaults (ports picked by the OS so
# that nothing else on the machine is in the way, data in a temporary folder), runs the client
# demo workload against it, shows a few of its metrics, and stops it with SIGTERM.
set -euo pipefail
build=${1:-build}
bin="$build/bin"
work=$(mktemp -d /tmp/kvpool-demo-XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/kvpoold" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$work/data" \
  --ready-file "$work/ready.json" 2>"$work/kvpoold.log" &
pid=$!
for _ in $(seq 1 300); do
  [ -s "$work/ready.json" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "demo: kvpoold failed to start:"; cat "$work/kvpoold.log"; exit 1; }
  sleep 0.1
done
[ -s "$work/ready.json" ] || { echo "demo: kvpoold did not become ready"; exit 1; }
grpc=$(sed -E 's/.*"grpc": "([^"]+)".*/\1/' "$work/ready.json")
metrics=$(sed -E 's/.*"metrics": "([^"]+)".*/\1/' "$work/ready.json")
echo "kvpoold (pid $pid) serving gRPC on $grpc, /metrics on http://$metrics/metrics"

"$bin/kvpool" --server "$grpc" demo

echo "a few of its metrics:"
curl -s "http://$metrics/metrics" | grep -E '^kvpool_(lookups_total|put_bytes_total|get_bytes_total|blocks|stored_bytes|capacity_bytes|evictions_total)({[^}]*})? ' | sed 's/^/  /'

kill -TERM "$pid"
code=0; wait "$pid" || code=$?
pid=""
if [ "$code" -ne 0 ]; then echo "demo: kvpoold exited with $code"; cat "$work/kvpoold.log"; exit 1; fi
echo "kvpoold drained and exited 0"
