#!/usr/bin/env bash
# Brings up a local Weft mesh on loopback: the control plane on the embedded
# file store (a copy of config-examples/policies), three demo services (web,
# api, api-v2) each with its own sidecar on its own loopback IP, and a TCP echo
# server outside the mesh. Prints where to curl, then runs until Ctrl-C.
#
#   scripts/demo.sh           bring the mesh up and keep it running
#   scripts/demo.sh --check   bring it up, check traffic flows, tear it down (exit 0 = works)
#
# Transparent mode (root only): the same demo across Linux network namespaces,
# one per service plus an "outside" host, each meshed host with the capture
# rules of `weft-proxy init`; the apps know nothing of the mesh and call each
# other by name (`http://api.demo:8080/`), resolved by their sidecar's mesh DNS.
#
#   scripts/demo.sh --transparent           bring it up and keep it running
#   scripts/demo.sh --transparent --check   bring it up, check, tear it down
#   --release                               run release builds (benches/transparent.sh)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.weft-demo
CHECK=0
TRANSPARENT=0
PROFILE=debug
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    --transparent) TRANSPARENT=1 ;;
    --release) PROFILE=release ;;
    *) echo "usage: scripts/demo.sh [--transparent] [--check] [--release]" >&2; exit 2 ;;
  esac
done
if [[ $TRANSPARENT == 1 && $(id -u) != 0 ]]; then
  echo "demo: --transparent needs root: it creates network namespaces and installs iptables rules in them (run: sudo scripts/demo.sh --transparent)" >&2
  exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
# Whether a command's output matches a pattern (a grep basic regex). The output is read
# whole before matching: `curl ... | grep -q` fails under pipefail when grep stops at the
# first match while curl is still writing (curl: (23), seen with /metrics pages larger than
# a pipe buffer).
output_has() { # pattern, command...
  local pattern=$1 out
  shift
  out=$("$@") || return 1
  grep -q -- "$pattern" <<<"$out"
}
if ! need cargo; then echo "demo: cargo is required (https://rustup.rs)" >&2; exit 1; fi
# curl for the tour; make (with the C compiler cargo already needs) builds jemalloc, the
# sidecar's allocator.
if ! need curl || ! need make; then
  echo "demo: installing curl and make" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl make >/dev/null
fi

echo "==> building (cargo build --bins)"
if [[ $PROFILE == release ]]; then
  # Only the demo's binaries (weft-control, weftctl, weft-proxy, weft-demo-app).
  cargo build --quiet --release -p weft-control -p weft-proxy -p weft-testkit --bins
else
  cargo build --quiet --workspace --bins
fi
BIN=$ROOT/target/$PROFILE

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

# ---------------------------------------------------------------------------
# --transparent: the same demo across network namespaces (root only).
#
#   host (namespace)   address        what runs there
#   (root namespace)   198.19.10.1    weft-control (gRPC 198.19.10.1:15010, admin 127.0.0.1:15011)
#   weftdemo-web       198.19.10.2    web app (:8080) + sidecar, capture rules
#   weftdemo-api       198.19.10.3    api app (:8080) + sidecar, capture rules
#   weftdemo-api-v2    198.19.10.4    api-v2 app (:8080) + sidecar, capture rules
#   weftdemo-outside   198.19.10.9    echo app (HTTP :8080, TCP :7007) and dnsmasq: the
#                                     "rest of the world" and its resolver; no sidecar
#
# One LAN (a bridge in weftdemo-hub, 198.19.10.0/24 and fd77:6566:7464::/64, from the
# benchmarking ranges that are never routed); service VIPs come from 198.19.96.0/24. The meshed
# hosts' /etc/resolv.conf names the outside dnsmasq: their capture rules send every query to
# the sidecar's mesh DNS, which answers mesh names with VIPs and forwards the rest there.
# ---------------------------------------------------------------------------
T_PREFIX=weftdemo
T_LAN=198.19.10
T_LAN6=fd77:6566:7464
T_VIPS=198.19.96.0/24
T_GID=1337
T_ROOT_LINK=wtdemo0
T_HOSTS=(web:2 api:3 api-v2:4 outside:9)

t_ns() { echo "$T_PREFIX-$1"; }
t_in() { local host=$1; shift; ip netns exec "$(t_ns "$host")" "$@"; }

t_teardown() {
  stop_all
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$T_PREFIX-" || true); do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$T_ROOT_LINK" 2>/dev/null || true
}

transparent_demo() {
  STATE=$ROOT/.weft-demo/transparent
  local need=()
  command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  [[ -x /usr/sbin/iptables-nft-restore ]] || command -v iptables-nft-restore >/dev/null 2>&1 || need+=(iptables)
  [[ -x /usr/sbin/dnsmasq ]] || command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
  if ((${#need[@]})); then
    echo "demo: installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  local dnsmasq_bin
  dnsmasq_bin=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)

  t_teardown
  rm -rf "$STATE"
  mkdir -p "$STATE/logs" "$STATE/tokens" "$STATE/bootstrap"
  trap 'echo; echo "==> stopping the mesh and removing its namespaces"; t_teardown' EXIT
  trap 'exit 130' INT TERM

  echo "==> creating the namespaces ($T_PREFIX-*) and their LAN"
  local hub; hub=$(t_ns hub)
  ip netns add "$hub"
  ip -n "$hub" link set lo up
  ip -n "$hub" link add br0 type bridge
  ip -n "$hub" link set br0 up
  local i=0 entry host x ns
  for entry in "${T_HOSTS[@]}"; do
    host=${entry%%:*}; x=${entry##*:}; ns=$(t_ns "$host")
    ip netns add "$ns"
    ip -n "$hub" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$hub" link set "p$i" master br0 up
    ip -n "$ns" addr add "$T_LAN.$x/24" dev eth0
    ip -n "$ns" -6 addr add "$T_LAN6::$x/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # VIPs are routable (on the LAN's interface); the capture rules take the connections
    # before a packet to a VIP ever leaves.
    ip -n "$ns" route add "$T_VIPS" dev eth0
    i=$((i + 1))
  done
  ip link add "$T_ROOT_LINK" type veth peer name up0 netns "$hub"
  ip -n "$hub" link set up0 master br0 up
  ip addr add "$T_LAN.1/24" dev "$T_ROOT_LINK"
  ip link set "$T_ROOT_LINK" up

  echo "==> starting the control plane (policies: $STATE/policies, CA: $STATE/ca)"
  cp -r "$ROOT/config-examples/policies" "$STATE/policies"
  # The echo service lives on the outside host; VIPs for every service from the range.
  sed -i "s/127\.0\.0\.9:7007/$T_LAN.9:7007/" "$STATE/policies/10-services.yaml"
  printf 'mesh:\n  vip_range: %s\n' "$T_VIPS" >"$STATE/policies/00-mesh.yaml"
  start control "$BIN/weft-control" --policies "$STATE/policies" --ca-dir "$STATE/ca" \
    --grpc "$T_LAN.1:15010" --admin 127.0.0.1:15011
  for _ in $(seq 1 150); do [[ -f $STATE/ca/roots.pem ]] && break; sleep 0.1; done
  wait_ok https://127.0.0.1:15011/healthz "weft-control" --cacert "$STATE/ca/roots.pem"
  export WEFT_CA_DIR=$STATE/ca

  echo "==> the outside host: echo (HTTP :8080, TCP :7007) and its DNS server"
  start echo-app ip netns exec "$(t_ns outside)" "$BIN/weft-demo-app" --name echo --instance echo-0 \
    --http "$T_LAN.9:8080" --tcp "$T_LAN.9:7007"
  start dnsmasq ip netns exec "$(t_ns outside)" "$dnsmasq_bin" --no-daemon --conf-file=/dev/null \
    --no-resolv --no-hosts --bind-interfaces --listen-address="$T_LAN.9" --port=53 \
    --log-queries --local-ttl=5 --address="/echo.outside/$T_LAN.9"

  echo "==> meshed hosts: capture rules (weft-proxy init), app, sidecar"
  for entry in web:2 api:3 api-v2:4; do
    host=${entry%%:*}; x=${entry##*:}; ns=$(t_ns "$host")
    mkdir -p "/etc/netns/$ns"
    echo "nameserver $T_LAN.9" >"/etc/netns/$ns/resolv.conf"
    t_in "$host" "$BIN/weft-proxy" init --proxy-gid "$T_GID" >"$STATE/logs/$host-init.log" 2>&1 ||
      { echo "demo: weft-proxy init failed in $ns:" >&2; cat "$STATE/logs/$host-init.log" >&2; exit 1; }
    "$BIN/weft-control" token --ca-dir "$STATE/ca" --service "$host" --namespace demo >"$STATE/tokens/$host.token"
    cat >"$STATE/bootstrap/$host.yaml" <<YAML
node: {service: $host, namespace: demo, id: $host-0}
admin: $T_LAN.$x:15000
control_plane: https://$T_LAN.1:15010
control_plane_ca: $STATE/ca/roots.pem
join_token_file: $STATE/tokens/$host.token
inbound: {address: '$T_LAN.$x:15006', app: '127.0.0.1:8080'}
outbound: {address: '127.0.0.1:15001', tcp_bind_ip: 127.0.0.1}
transparent: {instance_ip: $T_LAN.$x, app_ports: [8080]}
drain_timeout: 2s
YAML
    # The app: plain HTTP on :8080, no proxy settings, no idea a mesh exists.
    start "$host-app" ip netns exec "$ns" "$BIN/weft-demo-app" --name "$host" --instance "$host-0" \
      --http 0.0.0.0:8080
    # The sidecar runs as the group the capture rules exempt.
    start "$host-proxy" ip netns exec "$ns" setpriv --regid "$T_GID" --clear-groups -- \
      "$BIN/weft-proxy" --config "$STATE/bootstrap/$host.yaml"
  done
  for x in 2 3 4; do
    wait_ok "http://$T_LAN.$x:15000/ready" "the sidecar on $T_LAN.$x"
  done
  # Registration and VIPs are pushed asynchronously: wait until web reaches api by name.
  for _ in $(seq 1 150); do
    if t_in web curl -fsS -o /dev/null --max-time 2 http://api.demo:8080/ 2>/dev/null; then break; fi
    sleep 0.1
  done
  touch "$STATE/ready"

  echo
  echo "==> in weftdemo-web: curl http://api.demo:8080/hello   (mesh DNS -> VIP -> captured -> mTLS -> api)"
  t_in web curl -sS --max-time 5 http://api.demo:8080/hello; echo
  echo "==> the same call with x-canary: true goes to api-v2:"
  t_in web curl -sS --max-time 5 -H 'x-canary: true' http://api.demo:8080/hello; echo

  if [[ $CHECK == 1 ]]; then
    local fail=0 vip code
    vip=$(t_in web getent ahostsv4 api.demo | awk 'NR==1{print $1}')
    [[ $vip == 198.19.96.* ]] || { echo "check: api.demo resolved to '$vip', not a VIP of $T_VIPS" >&2; fail=1; }
    output_has '"service":"api"' t_in web curl -fsS --max-time 5 http://api.demo:8080/hello || { echo "check: web -> api by name failed" >&2; fail=1; }
    output_has 'spiffe://cluster.local/ns/demo/sa/web' t_in web curl -fsS --max-time 5 http://api.demo:8080/hello || { echo "check: api did not see web's verified identity" >&2; fail=1; }
    output_has '"service":"api"' t_in web curl -fsS --max-time 5 http://api.demo.svc.cluster.local:8080/ || { echo "check: the fully qualified name failed" >&2; fail=1; }
    output_has '"service":"api-v2"' t_in web curl -fsS --max-time 5 -H 'x-canary: true' http://api:8080/hello || { echo "check: canary route broken" >&2; fail=1; }
    echo hi | t_in web nc -N -w 5 echo.demo 7000 | grep -q '^hi$' || { echo "check: TCP to echo by its mesh name failed" >&2; fail=1; }
    output_has 'weft_tcp_connections_total{cluster="echo.demo",direction="outbound"[^}]*} [1-9]' curl -fsS "http://$T_LAN.2:15000/metrics" || { echo "check: web's TCP call to echo did not go through its echo.demo cluster" >&2; fail=1; }
    output_has '"service":"echo"' t_in web curl -fsS --max-time 5 http://echo.outside:8080/out || { echo "check: HTTP to the outside host (a name outside the mesh) failed" >&2; fail=1; }
    output_has 'weft_tcp_connections_total{cluster="passthrough",direction="outbound"[^}]*} [1-9]' curl -fsS "http://$T_LAN.2:15000/metrics" || { echo "check: the call to the outside host was not passed through" >&2; fail=1; }
    output_has 'weft_dns_queries_total{result="mesh"} [1-9]' curl -fsS "http://$T_LAN.2:15000/metrics" || { echo "check: web's mesh DNS answered nothing" >&2; fail=1; }
    output_has 'weft_dns_queries_total{result="forwarded"} [1-9]' curl -fsS "http://$T_LAN.2:15000/metrics" || { echo "check: web's mesh DNS forwarded nothing" >&2; fail=1; }
    output_has 'weft_protocol_detections_total{direction="outbound",result="http1"} [1-9]' curl -fsS "http://$T_LAN.2:15000/metrics" || { echo "check: web's sidecar captured no HTTP call" >&2; fail=1; }
    output_has 'weft_protocol_detections_total{direction="inbound",result="tls"} [1-9]' curl -fsS "http://$T_LAN.3:15000/metrics" || { echo "check: web -> api was not mTLS" >&2; fail=1; }
    code=$(t_in outside curl -s -o /dev/null --max-time 5 -w '%{http_code}' "http://$T_LAN.3:8080/")
    [[ $code == 403 ]] || { echo "check: a caller without identity got $code from api's app port, not 403" >&2; fail=1; }
    "$BIN/weftctl" status >/dev/null || { echo "check: weftctl status failed" >&2; fail=1; }
    [[ $fail == 0 ]] && echo "demo check (transparent): OK"
    exit $fail
  fi

  cat <<MSG

Weft is running across network namespaces. The apps call each other by name; try:
  ip netns exec weftdemo-web curl http://api.demo:8080/hello              # web -> api (mesh DNS, VIP, mTLS)
  ip netns exec weftdemo-web curl -H 'x-canary: true' http://api:8080/    # canary route -> api-v2
  ip netns exec weftdemo-web curl http://api.demo:8080/v2/items          # 80/20 split api / api-v2
  ip netns exec weftdemo-web getent hosts api.demo.svc.cluster.local     # the VIP, from the mesh DNS
  echo hi | ip netns exec weftdemo-web nc -N echo.demo 7000               # TCP service echo, by its mesh name
  ip netns exec weftdemo-web curl http://echo.outside:8080/               # not a mesh name: forwarded DNS, passed through
  ip netns exec weftdemo-outside curl -i http://$T_LAN.3:8080/            # no mesh identity: 403
Metrics:       curl http://$T_LAN.2:15000/metrics   (sidecars: $T_LAN.2-4:15000)
Config:        curl http://$T_LAN.2:15000/config_dump   (its "transparent" part: VIPs, listeners, DNS)
Rules:         ip netns exec weftdemo-web iptables-save -t nat
Mesh status:   WEFT_CA_DIR=$STATE/ca $BIN/weftctl status
Logs:          $STATE/logs/
Ctrl-C stops everything and removes the namespaces.
MSG
  while true; do sleep 3600 & wait $!; done  # wait: a signal runs the trap at once
}
if [[ $TRANSPARENT == 1 ]]; then
  transparent_demo
  exit 0
fi

stop_all
rm -rf "$STATE/policies" "$STATE/logs" "$STATE/ca" "$STATE/tokens"
mkdir -p "$STATE/logs"
cp -r "$ROOT/config-examples/policies" "$STATE/policies"
trap 'echo; echo "==> stopping the mesh"; stop_all' EXIT
trap 'exit 130' INT TERM


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
  output_has '"service":"api"' curl -fsS -H 'host: api' http://127.0.0.2:15001/hello || { echo "check: api unreachable" >&2; fail=1; }
  output_has '"service":"api-v2"' curl -fsS -H 'host: api' -H 'x-canary: true' http://127.0.0.2:15001/hello || { echo "check: canary route broken" >&2; fail=1; }
  output_has '^weft_requests_total' curl -fsS http://127.0.0.2:15000/metrics || { echo "check: no request metrics" >&2; fail=1; }
  "$BIN/weftctl" status >/dev/null || { echo "check: weftctl status failed" >&2; fail=1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$STATE/ca/roots.pem" https://127.0.0.1:15011/v1/proxies)
  [[ $code == 401 ]] || { echo "check: the admin API answered $code without a credential, not 401" >&2; fail=1; }
  output_has 'weft_inbound_connections_total{tls="mtls"} [1-9]' curl -fsS http://127.0.0.3:15000/metrics || { echo "check: web -> api was not mTLS" >&2; fail=1; }
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
