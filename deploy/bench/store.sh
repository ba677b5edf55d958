#!/usr/bin/env bash
# Store benchmarks, Corral and Debian's etcd 3.4 side by side on this machine, same client,
# same flags (docs/benchmarks.md records the figures). Usage: deploy/bench/store.sh [OUT_DIR]
# Bounded: every load has a fixed request count; both clusters are taken down at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-/tmp/corral-bench}
"$root/deploy/install-deps.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p corral
corral="$CARGO_TARGET_DIR/release/corral"
rm -rf "$out" && mkdir -p "$out"
cleanup() {
  "$corral" down --state-dir "$out/corral" >/dev/null 2>&1 || true
  "$corral" bench etcd down --state-dir "$out/etcd" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# --etcd-only: the servers on this host's loopback, as etcd's members are (a full cluster puts
# each server in a node namespace behind a bridge, which costs every packet more).
"$corral" up --servers 3 --agents 0 --etcd-only --state-dir "$out/corral" --base-port 26790 >/dev/null
"$corral" bench etcd up --state-dir "$out/etcd" --base-port 27790 >/dev/null

echo "## put throughput and latency (256-byte values)"
for clients in 1 16; do
  total=$(( clients == 1 ? 2000 : 10000 ))
  for t in corral etcd; do
    echo "$t $("$corral" bench kv --state-dir "$out/$t" --op put --clients $clients --conns $clients --total $total 2>/dev/null)"
  done
done
# 256 clients: this machine's speed drifts by a tenth or more from one minute to the next, so
# three rounds, each one Corral run then one etcd run; compare each round's ratio.
for round in 1 2 3; do
  for t in corral etcd; do
    echo "$t round=$round $("$corral" bench kv --state-dir "$out/$t" --op put --clients 256 --conns 16 --total 100000 2>/dev/null)"
  done
done
echo "## range throughput (256 clients)"
for op in range range-serializable; do
  for t in corral etcd; do
    echo "$t $("$corral" bench kv --state-dir "$out/$t" --op $op --clients 256 --conns 16 --total 60000 2>/dev/null)"
  done
done
echo "## write unavailability after SIGKILL of the leader (10 kills)"
for t in corral etcd; do
  echo "$t $("$corral" bench failover --state-dir "$out/$t" --kills 10 2>/dev/null | tail -1)"
done
echo "## RSS and data size after 1,000,000 puts (100,000 keys), a physical compaction and a defrag"
for t in corral etcd; do
  "$corral" bench kv --state-dir "$out/$t" --op put --clients 256 --conns 16 --total 1000000 --key-space 100000 >/dev/null 2>&1
  (
    set -a; . "$out/$t/etcdctl.env"; set +a
    rev=$(etcdctl endpoint status -w json | python3 -c 'import json,sys; print(max(e["Status"]["header"]["revision"] for e in json.load(sys.stdin)))')
    etcdctl compaction --physical --command-timeout=300s "$rev" >/dev/null
    etcdctl defrag --cluster --command-timeout=300s >/dev/null
    sizes=$(etcdctl endpoint status -w json | python3 -c 'import json,sys; print(" ".join(str(e["Status"]["dbSize"]) for e in json.load(sys.stdin)))')
    if [ "$t" = corral ]; then file=cluster.json; key=servers; else file=etcd.json; key=members; fi
    rss=$(python3 - "$out/$t/$file" "$key" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
out = []
for s in doc[sys.argv[2]]:
    for line in open(f"/proc/{s['pid']}/status"):
        if line.startswith("VmRSS:"):
            out.append(str(int(line.split()[1]) // 1024))
print(" ".join(out))
PY
)
    disk=$(du -sm "$out/$t" | cut -f1)
    echo "$t revision=$rev db_size_bytes=[$sizes] rss_mib=[$rss] state_dir_mib=$disk"
  )
done
