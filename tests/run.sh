#!/usr/bin/env bash
# Runs the whole test suite: unit, conformance and end-to-end tests (real corral processes,
# Debian's etcdctl and etcd). Installs missing Debian packages first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
deploy/install-deps.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
# The end-to-end tests run the corral binary: build it first, with the same profile.
cargo build --quiet -p corral
export CORRAL_BIN="$CARGO_TARGET_DIR/debug/corral"
cargo test --workspace --no-fail-fast -- --test-threads 2 "$@"
