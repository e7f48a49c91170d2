#!/usr/bin/env bash
# Median end-to-end latency of one trivial container, `sh -c :`, two ways, measured in the same
# run on the same private containerd:
#   berth: `berth job run --wait` through `berth dev` (API, store commit, placement, agent,
#          containerd, exit event, cleanup, job result)
#   ctr:   `ctr run --rm` (containerd's own CLI)
# Prints both medians and their ratio. Usage: bench/latency.sh [RUNS] (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
berth=${BERTH_BIN:-target/release/berth}
[ -n "${BERTH_BIN:-}" ] || cargo build --release --bin berth -q

work=$(mktemp -d /tmp/berth-bench.XXXXXX)
cleanup() {
  [ -n "${dev_pid:-}" ] && kill "$dev_pid" 2>/dev/null || true
  scripts/containerd.sh stop "$work/containerd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
sock=$(BERTH_WATCH_PID=$$ scripts/containerd.sh start "$work/containerd")
scripts/build-test-image.sh "$work/busybox.tar" >/dev/null
ns=berth
"$berth" image import "$work/busybox.tar" --containerd "$sock" --namespace "$ns" >/dev/null
port=$(( 20000 + RANDOM % 20000 ))
api=127.0.0.1:$port
BERTH_LOG=warn "$berth" dev --containerd "$sock" --namespace "$ns" --data-dir "$work/dev" --listen "$api" >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 100); do "$berth" node ls --api "$api" 2>/dev/null | grep -q Ready && break; sleep 0.1; done

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m/1e6}'; }

# One warm-up each, so that the first-use costs (shim binary, page cache) hit neither side.
ctr --address "$sock" -n "$ns" run --rm docker.io/library/busybox:local warm sh -c : >/dev/null
spec() { printf '{"name":"%s","type":"batch","tasks":1,"container":{"image":"docker.io/library/busybox:local","command":["sh","-c",":"],"resources":{"cpu":"100m","memory":"32Mi"}}}' "$1"; }
spec warm | "$berth" job run -f - --wait --api "$api" >/dev/null 2>&1

: > "$work/berth.ns"; : > "$work/ctr.ns"
for i in $(seq 1 "$runs"); do
  t0=$(now); ctr --address "$sock" -n "$ns" run --rm docker.io/library/busybox:local "c$i" sh -c : >/dev/null; t1=$(now)
  echo $((t1 - t0)) >> "$work/ctr.ns"
  t0=$(now); spec "b$i" | "$berth" job run -f - --wait --api "$api" >/dev/null 2>&1; t1=$(now)
  echo $((t1 - t0)) >> "$work/berth.ns"
done
b=$(median < "$work/berth.ns"); c=$(median < "$work/ctr.ns")
printf '%-34s %10s\n' "median latency of sh -c : ($runs runs)" "ms"
printf '%-34s %10s\n' "berth job run --wait (berth dev)" "$b"
printf '%-34s %10s\n' "ctr run --rm" "$c"
awk -v b="$b" -v c="$c" 'BEGIN { printf "ratio berth/ctr: %.2f (target <= 2.00)\n", b / c }'
