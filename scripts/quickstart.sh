#!/usr/bin/env bash
# The first of the README's two commands: sets up this machine, builds Berth, starts a local
# cluster (`berth dev`), imports the test image, runs examples/hello.yaml and prints its logs.
# The cluster keeps running afterwards; `scripts/quickstart.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
state=$top/.berth
api=${BERTH_API:-127.0.0.1:7700}
berth=$top/target/release/berth

if [ "${1:-}" = stop ]; then
  [ -f "$state/dev.pid" ] && kill "$(cat "$state/dev.pid")" 2>/dev/null || true
  rm -f "$state/dev.pid"
  [ -f "$state/containerd/containerd.pid" ] && scripts/containerd.sh stop "$state/containerd"
  echo "Stopped."
  exit 0
fi

scripts/install-deps.sh
echo "Building berth (release)..."
cargo build --release --bin berth

mkdir -p "$state"
# Use the system containerd when it answers, else start Berth's own.
sock=/run/containerd/containerd.sock
if ! ctr --address "$sock" version >/dev/null 2>&1; then
  sock=$(scripts/containerd.sh start "$state/containerd")
fi

if ! "$berth" node ls --api "$api" >/dev/null 2>&1; then
  nohup "$berth" dev --containerd "$sock" --data-dir "$state/dev" --listen "$api" > "$state/dev.log" 2>&1 &
  echo $! > "$state/dev.pid"
  for _ in $(seq 1 100); do
    "$berth" node ls --api "$api" 2>/dev/null | grep -q Ready && break
    sleep 0.1
  done
fi
export BERTH_API=$api
"$berth" node ls

scripts/build-test-image.sh "$state/busybox.tar"
"$berth" image import "$state/busybox.tar" --containerd "$sock"

echo
echo "\$ berth job run -f examples/hello.yaml --wait"
"$berth" job run -f examples/hello.yaml --wait
job=$("$berth" job ls -o json | jq -r '[.[] | select(.name == "hello")] | last | .id')
echo
echo "\$ berth job get $job"
"$berth" job get "$job"
for t in $("$berth" task ls --job "$job" -o json | jq -r '.[].id'); do
  echo
  echo "\$ berth logs $t"
  "$berth" logs "$t"
done
echo
echo "berth dev keeps running (log: $state/dev.log). Try: export BERTH_API=$api; $berth job ls"
echo "Stop it with: scripts/quickstart.sh stop"
