#!/usr/bin/env bash
# Cluster and Service figures (docs/benchmarks.md): the time from `corral up` to every node
# Ready, from `kubectl apply` of the seed's deployment.yml to three available replicas, and
# HTTP throughput and latency to the Service's cluster IP against one pod's IP directly (wrk,
# run in node a1's network namespace, through its service rules), alternated so the
# machine's noise falls on both. Usage: deploy/bench/network.sh [OUT_DIR]. Bounded: fixed-length loads; the cluster
# is taken down at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-/tmp/corral-bench-net}
"$root/deploy/install-deps.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p corral
corral="$CARGO_TARGET_DIR/release/corral"
"$corral" down --state-dir "$out" >/dev/null 2>&1 || true
cleanup() { "$corral" down --state-dir "$out" >/dev/null 2>&1 || true; }
trap cleanup EXIT
export KUBECONFIG="$out/kubeconfig"
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

t=$(now)
"$corral" up --servers 3 --agents 2 --state-dir "$out" --base-port 26890 >/dev/null
echo "corral up (3 servers, 2 agents) to every node Ready: $(since "$t") s"
t=$(now)
kubectl apply -f "$root/tests/fixtures/seed/deployment.yml" >/dev/null
kubectl wait --for=condition=Available deployment/my-deployment --timeout=120s >/dev/null
until [ "$(kubectl get deployment my-deployment -o jsonpath='{.status.availableReplicas}')" = 3 ]; do sleep 0.05; done
echo "kubectl apply -f deployment.yml to 3 available replicas: $(since "$t") s"

kubectl expose deployment my-deployment --port=80 >/dev/null
service=$(kubectl get service my-deployment -o jsonpath='{.spec.clusterIP}')
pod=$(kubectl get pods -l app=myapp -o jsonpath='{.items[0].status.podIP}')
netns=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['network']['bridge'] + '-a1')" "$out/cluster.json")
in_node() { nsenter --net="/run/netns/$netns" "$@"; }
until in_node wrk -t1 -c1 -d1s "http://$service/" >/dev/null 2>&1; do sleep 0.2; done
echo "wrk -t2 -c32 -d10s, from node a1's namespace (pod $pod, service $service)"
echo "target   req/s     p50      p99"
for round in 1 2; do
  for target in pod service; do
    ip=$pod; [ $target = service ] && ip=$service
    in_node wrk -t2 -c32 -d10s --latency "http://$ip/" |
      awk -v t=$target '/^Requests\/sec/ {rps=$2} / 50%/ {p50=$2} / 99%/ {p99=$2} END {printf "%-8s %-9s %-8s %s\n", t, rps, p50, p99}'
  done
done
