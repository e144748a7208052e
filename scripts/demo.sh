#!/usr/bin/env bash
# Brings up a local Weft mesh on loopback: the control plane on the embedded
# file store (a copy of config-examples/policies), three demo services (web,
# api, api-v2) each with its own sidecar on its own loopback IP, and a TCP echo
# server outside the mesh. Prints where to curl, then runs until Ctrl-C.
#
#   scripts/demo.sh           bring the mesh up and keep it running
#   scripts/demo.sh --check   bring it up, check traffic flows, tear it down (exit 0 = works)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.weft-demo
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then echo "demo: cargo is required (https://rustup.rs)" >&2; exit 1; fi
# curl for the tour; make (with the C compiler cargo already needs) builds jemalloc, the
# sidecar's allocator.
if ! need curl || ! need make; then
  echo "demo: installing curl and make" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl make >/dev/null
fi

echo "==> building (cargo build --bins)"
cargo build --quiet --workspace --bins
BIN=$ROOT/target/debug

# Stop anything a previous run left behind, by the PIDs it recorded.
stop_all() {
  if [[ -f $STATE/pids ]]; then
    while read -r pid name; do
      kill "$pid" 2>/dev/null || true
    done <"$STATE/pids"
    sleep 0.3
    while read -r pid name; do
      kill -9 "$pid" 2>/dev/null || true
    done <"$STATE/pids"
    rm -f "$STATE/pids"
  fi
}
stop_all
rm -rf "$STATE/policies" "$STATE/logs" "$STATE/ca" "$STATE/tokens"
mkdir -p "$STATE/logs"
cp -r "$ROOT/config-examples/policies" "$STATE/policies"
trap 'echo; echo "==> stopping the mesh"; stop_all' EXIT
trap 'exit 130' INT TERM

start() { # name, command...
  local name=$1; shift
  "$@" >"$STATE/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$STATE/pids"
}

wait_ok() { # url, what, curl options...
  local url=$1 what=$2; shift 2
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$@" "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "demo: $what never became ready ($url); logs in $STATE/logs" >&2
  exit 1
}

echo "==> starting the control plane (policies: $STATE/policies, CA: $STATE/ca)"
start control "$BIN/weft-control" --policies "$STATE/policies" --ca-dir "$STATE/ca" \
  --grpc 127.0.0.1:15010 --admin 127.0.0.1:15011
# The admin API is HTTPS with the CA's certificate; weftctl finds the CA and the bootstrap
# admin token (written on first start) through WEFT_CA_DIR.
for _ in $(seq 1 150); do [[ -f $STATE/ca/roots.pem ]] && break; sleep 0.1; done
wait_ok https://127.0.0.1:15011/healthz "weft-control" --cacert "$STATE/ca/roots.pem"
export WEFT_CA_DIR=$STATE/ca
# Each sidecar proves which service it runs with a join token; the CA signs its
# key (which never leaves the sidecar) into a short-lived SPIFFE certificate.
mkdir -p "$STATE/tokens"
for name in web api api-v2; do
  "$BIN/weft-control" token --ca-dir "$STATE/ca" --service "$name" --namespace demo >"$STATE/tokens/$name.token"
done

echo "==> starting demo services and their sidecars"
start echo-app "$BIN/weft-demo-app" --name echo --instance echo-0 --http 127.0.0.9:8080 --tcp 127.0.0.9:7007
for svc in web:2 api:3 api-v2:4; do
  name=${svc%%:*}; ip=127.0.0.${svc##*:}
  start "$name-app" "$BIN/weft-demo-app" --name "$name" --instance "$name-0" \
    --http "$ip:8080" --outbound "$ip:15001"
  start "$name-proxy" "$BIN/weft-proxy" --config "$ROOT/config-examples/bootstrap/$name.yaml"
done
for ip in 127.0.0.2 127.0.0.3 127.0.0.4; do
  wait_ok "http://$ip:15000/ready" "the sidecar on $ip"
done
wait_ok http://127.0.0.2:8080/ "the web app"

# Registration is asynchronous: wait until web's sidecar has api's endpoint.
for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null -H 'host: api' http://127.0.0.2:15001/ 2>/dev/null; then break; fi
  sleep 0.1
done

echo
echo "==> web -> (web's sidecar) -> (api's sidecar) -> api:"
curl -sS -H 'host: api' http://127.0.0.2:15001/hello; echo
echo "==> the same call with x-canary: true goes to api-v2:"
curl -sS -H 'host: api' -H 'x-canary: true' http://127.0.0.2:15001/hello; echo

if [[ $CHECK == 1 ]]; then
  fail=0
  curl -fsS -H 'host: api' http://127.0.0.2:15001/hello | grep -q '"service":"api"' || { echo "check: api unreachable" >&2; fail=1; }
  curl -fsS -H 'host: api' -H 'x-canary: true' http://127.0.0.2:15001/hello | grep -q '"service":"api-v2"' || { echo "check: canary route broken" >&2; fail=1; }
  curl -fsS http://127.0.0.2:15000/metrics | grep -q '^weft_requests_total' || { echo "check: no request metrics" >&2; fail=1; }
  "$BIN/weftctl" status >/dev/null || { echo "check: weftctl status failed" >&2; fail=1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$STATE/ca/roots.pem" https://127.0.0.1:15011/v1/proxies)
  [[ $code == 401 ]] || { echo "check: the admin API answered $code without a credential, not 401" >&2; fail=1; }
  curl -fsS http://127.0.0.3:15000/metrics | grep -q 'weft_inbound_connections_total{tls="mtls"} [1-9]' || { echo "check: web -> api was not mTLS" >&2; fail=1; }
  echo hi | nc -N 127.0.0.2 7000 | grep -q '^hi$' || { echo "check: TCP through the sidecar failed" >&2; fail=1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'host: api' http://127.0.0.3:15006/)
  [[ $code == 403 ]] || { echo "check: a caller without identity got $code from api, not 403" >&2; fail=1; }
  [[ $fail == 0 ]] && echo "demo check: OK"
  exit $fail
fi

cat <<MSG

Weft is running. Try:
  curl -H 'host: api' http://127.0.0.2:15001/hello              # web's sidecar -> api
  curl -H 'host: api' -H 'x-canary: true' http://127.0.0.2:15001/ # canary route -> api-v2
  curl -H 'host: api' http://127.0.0.2:15001/v2/items             # 80/20 split api / api-v2
  curl 'http://127.0.0.2:8080/call?url=http://api/hello'          # the web app calling api itself
  echo hi | nc -N 127.0.0.2 7000                                  # TCP through web's sidecar to echo
  curl -i http://127.0.0.3:15006/                                   # no mesh identity: 403 (authorization)
Metrics:       curl http://127.0.0.2:15000/metrics   (sidecars: 127.0.0.2-4:15000)
Config:        curl http://127.0.0.2:15000/config_dump
weftctl:       export WEFT_CA_DIR=$STATE/ca   # the CA to trust + the bootstrap admin token
Mesh status:   $BIN/weftctl status
Policies:      $BIN/weftctl get routes ; edit $STATE/policies/*.yaml and it is pushed live
               or: $BIN/weftctl apply -f config-examples/policies
Logs:          $STATE/logs/
Ctrl-C stops everything.
MSG
while true; do sleep 3600 & wait $!; done  # wait: a signal runs the trap at once
