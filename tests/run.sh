#!/usr/bin/env bash
# Runs the whole test suite: unit, conformance and end-to-end tests (real corral processes,
# Debian's etcdctl and etcd). Installs missing Debian packages first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
deploy/install-deps.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
# The end-to-end tests run the corral binary: build it first, with the same profile and
# the chaos suite's failpoints. The negative control (a build that acknowledges writes it
# never put on disk) is built first and set aside: the chaos test must catch it.
cargo build --quiet -p corral --features failpoints,ack-before-fsync
cp -f "$CARGO_TARGET_DIR/debug/corral" "$CARGO_TARGET_DIR/debug/corral-negative.new"
mv -f "$CARGO_TARGET_DIR/debug/corral-negative.new" "$CARGO_TARGET_DIR/debug/corral-negative"
cargo build --quiet -p corral --features failpoints
export CORRAL_BIN="$CARGO_TARGET_DIR/debug/corral"
export CORRAL_NEGATIVE_BIN="$CARGO_TARGET_DIR/debug/corral-negative"
cargo test --workspace --features corral/failpoints --no-fail-fast -- --test-threads 2 "$@"
