#!/usr/bin/env bash
# Installs the Debian packages Weft's test suite needs, if they are missing:
#   curl             admin API checks in scripts/demo.sh --check
#   netcat-openbsd   `nc -N` for the TCP demo check
#   prometheus       a real scraper and `promtool` (e2e/tests/prometheus.rs)
#   make, gcc        building jemalloc, weft-proxy's allocator (tikv-jemalloc-sys)
#   dnsmasq-base     a real DNS server the egress tests point the sidecar at (e2e/tests/egress.rs)
#   openssl          the egress tests' CA, server and client certificates
#   python3          the egress tests' HTTPS server outside the mesh (http.server + ssl)
#   iptables         `weft-proxy init`'s capture rules in the transparent-mode tests
#                    (e2e/tests/transparent.rs; iptables-nft-*, ip6tables-*)
#   iproute2         `ip netns` / veth for those tests' hosts
#   etcd-server      a real etcd v3 the etcd store's tests start (`etcd`; control-plane unit tests
#                    of store/etcd.rs, e2e/tests/ha.rs)
#   etcd-client      `etcdctl`: those tests read the keys with etcd's own client
#   protobuf-compiler  `protoc`: the etcd-client crate's build compiles etcd's .proto files
#   libprotobuf-dev  google/protobuf/*.proto, which etcd's .proto files import (protoc alone
#                    lacks them without recommended packages)
# Idempotent: does nothing (no `apt-get update`) when everything is installed.
# Runs `apt-get update` at most once, then installs only what is missing, without
# recommended packages. Prints what it installed.
set -euo pipefail

PACKAGES=(curl netcat-openbsd prometheus make gcc dnsmasq-base openssl python3 iptables iproute2
  etcd-server etcd-client protobuf-compiler libprotobuf-dev)

installed() { # package
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "install-test-deps: already installed: ${PACKAGES[*]}"
  exit 0
fi

sudo=()
if [[ $(id -u) != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-test-deps: missing ${missing[*]}, and not root and no sudo to install them" >&2
    exit 1
  fi
fi

echo "install-test-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Check every package really is there now, and that the tools the tests run are on PATH.
failed=()
for p in "${missing[@]}"; do
  installed "$p" || failed+=("$p")
done
# dnsmasq lives in /usr/sbin, which a non-root PATH may lack (the tests look there too).
for tool in curl nc prometheus promtool dnsmasq openssl python3 iptables-nft-restore ip6tables-nft-restore ip \
  etcd etcdctl protoc; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || failed+=("$tool (command)")
done
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || failed+=("google/protobuf/descriptor.proto (libprotobuf-dev)")
if ((${#failed[@]})); then
  echo "install-test-deps: still missing after install: ${failed[*]}" >&2
  exit 1
fi
echo "install-test-deps: installed ${missing[*]}"
