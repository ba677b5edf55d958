#!/usr/bin/env bash
# Brings up a local Corral cluster on a fresh machine: installs what it needs, builds corral,
# and starts 3 servers and 2 agents (each agent in a network namespace of its own).
# Usage: deploy/local/up.sh [corral up flags...]
# Default state directory: /tmp/corral (its etcdctl.env and kubeconfig are printed at the end).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
"$root/deploy/install-deps.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
echo "building corral (first build: a few minutes)"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p corral
args=("$@")
if [[ " ${args[*]-} " != *" --state-dir "* ]]; then
  args+=(--state-dir /tmp/corral)
fi
exec "$CARGO_TARGET_DIR/release/corral" up "${args[@]}"
