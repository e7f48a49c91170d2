#!/usr/bin/env bash
# The second of the README's two commands, and what CI runs: installs what is missing, checks
# formatting and lints, builds, starts a private containerd, and runs every test against it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== cargo fmt"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --locked

work=$(mktemp -d /tmp/berth-test.XXXXXX)
cleanup() {
  scripts/containerd.sh stop "$work/containerd" >/dev/null 2>&1 || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT
sock=$(BERTH_WATCH_PID=$$ scripts/containerd.sh start "$work/containerd")
echo "== tests (containerd at $sock)"
BERTH_TEST_CONTAINERD=$sock BERTH_BIN=$PWD/target/debug/berth \
  cargo test --workspace --locked -- --test-threads 4
