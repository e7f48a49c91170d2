#!/usr/bin/env bash
# Benchmark 1 of the placement engine: in-process placement throughput and decision latency on
# a synthetic cluster (default 10,000 nodes, 1,000,000 tasks in jobs of 100, a mix of
# constraints), next to first fit by a linear scan measured in the same run.
# Usage: bench/placement.sh [NODES] [TASKS] [TASKS_PER_JOB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p berth-bench --bin placement -q
exec target/release/placement "$@"
