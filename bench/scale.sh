#!/usr/bin/env bash
# Benchmarks 2-4 of the placement engine, end to end: a real `berth scheduler` process, many
# simulated agents speaking the real agent protocol, jobs submitted through the gRPC API.
# Prints time to all tasks Started, scheduler RSS, and restart time.
# Usage: bench/scale.sh [NODES] [TASKS] [TASKS_PER_JOB]   (defaults 10000 1000000 100)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin berth -p berth-cli
cargo build --release -q -p berth-bench --bin scale
ulimit -n 65536 2>/dev/null || true
BERTH_BIN=${BERTH_BIN:-target/release/berth} exec target/release/scale "$@"
