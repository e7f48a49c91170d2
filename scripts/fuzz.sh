#!/usr/bin/env bash
# Runs a cargo-fuzz target on the job-spec parser for a while (default: 10 minutes).
#
#   scripts/fuzz.sh [TARGET] [SECONDS]     TARGET: spec (default) or spec_proto
#
# Uses the machine's stable toolchain: no sanitizer (-s none) and RUSTC_BOOTSTRAP for the few
# unstable flags cargo-fuzz passes. Crashes land in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-spec}
secs=${2:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "fuzz/corpus/$target"
export RUSTC_BOOTSTRAP=1
cargo fuzz run "$target" -s none --release -- -max_total_time="$secs" -print_final_stats=1
