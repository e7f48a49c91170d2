#!/usr/bin/env bash
# Starts a private containerd for tests and local runs: its own root, state dir and socket
# under DIR, so it never touches a system containerd.
#
#   scripts/containerd.sh start DIR   # prints the socket path once containerd answers
#   scripts/containerd.sh stop DIR    # stops it and its shims' tasks
#
# With BERTH_WATCH_PID set, `start` also stops containerd once that process exits, so a test
# run that dies cannot leave containerd behind.
set -euo pipefail

cmd=${1:?usage: containerd.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: containerd.sh start|stop DIR}")
sock=$dir/containerd.sock

case "$cmd" in
start)
  command -v containerd >/dev/null || { echo "containerd is not installed (apt-get install containerd runc)" >&2; exit 1; }
  mkdir -p "$dir/root" "$dir/state"
  if [ -S "$sock" ] && ctr --address "$sock" version >/dev/null 2>&1; then
    echo "$sock"; exit 0
  fi
  # CRI is not needed here and would want CNI; everything else stays on.
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "warn"
TOML
  nohup containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  if [ -n "${BERTH_WATCH_PID:-}" ]; then
    self=$(realpath "$0")
    nohup bash -c "while kill -0 $BERTH_WATCH_PID 2>/dev/null; do sleep 1; done; '$self' stop '$dir'" \
      >/dev/null 2>&1 &
  fi
  for _ in $(seq 1 100); do
    if [ -S "$sock" ] && ctr --address "$sock" version >/dev/null 2>&1; then
      echo "$sock"; exit 0
    fi
    sleep 0.1
  done
  echo "containerd did not come up; log: $dir/containerd.log" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  if [ -S "$sock" ]; then
    for ns in $(ctr --address "$sock" namespaces ls -q 2>/dev/null); do
      for t in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
      done
    done
  fi
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
  ;;
*) echo "usage: containerd.sh start|stop DIR" >&2; exit 2 ;;
esac
