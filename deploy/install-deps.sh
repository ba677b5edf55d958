#!/usr/bin/env bash
# Installs what Corral builds and tests against, from Debian's packages:
#   librocksdb-dev, libclang-dev   the store's RocksDB (system library: minutes, not a quarter hour, to build)
#   etcd-client                    etcdctl 3.4, the reference client in the end-to-end tests
#   etcd-server                    etcd 3.4, the side-by-side anchor for compatibility tests and benchmarks
#   containerd, runc               the container runtime agents drive through CRI
#   containernetworking-plugins    CNI plugins (bridge, host-local, portmap, loopback) in /usr/lib/cni
#   busybox-static, nginx, gcc     what `corral image build` makes the busybox, nginx and pause images of
#   iproute2, nftables, iptables   node network namespaces, service rules
#   wrk, bc                        the Service benchmark's load and arithmetic (deploy/bench/network.sh)
#   libfaketime                    the chaos suite's clock jumps on one server
# Idempotent: installs only what is missing.
set -euo pipefail

packages=(librocksdb-dev libclang-dev etcd-client etcd-server containerd runc containernetworking-plugins
  busybox-static nginx gcc libc6-dev iproute2 nftables iptables wrk bc libfaketime)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "need root to install packages: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
# Debian starts etcd, containerd and nginx as services on install; Corral only wants their binaries.
no_start=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$no_start" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$no_start"
  chmod +x "$no_start"
  created_policy=1
fi
trap '[ $created_policy -eq 1 ] && rm -f "$no_start"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
