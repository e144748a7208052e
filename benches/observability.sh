#!/usr/bin/env bash
# What observability costs on the hot path: HTTP/1.1 req/s through one Weft sidecar (outbound
# listener -> upstream nginx), pinned like run.sh (proxy + upstream on SERVER_CPUS, wrk on
# CLIENT_CPUS, WEFT_WORKER_THREADS=1), with the bootstrap's `observability:` section varied:
#
#   baseline        defaults: per-request metrics on, no access log, no tracing
#   metrics-off     observability.metrics.requests: false
#   access-log      observability.access_log: {format: json, path: <file>}
#   tracing         observability.tracing: {} and every request carries a sampled traceparent
#                   (parsed, re-parented and forwarded; no OTLP endpoint, so nothing exported)
#
# Cases run in interleaved rounds (baseline, metrics-off, access-log, tracing, baseline, ...);
# the table reports the median req/s per case and its ratio to the baseline.
#
#   benches/observability.sh            3 rounds x 10 s per case
#   benches/observability.sh --quick    1 round x 4 s per case
#   options: --skip-build (use target/release/weft-proxy as is); env WEFT_CONTROL_BIN (another
#            weft-control binary), BENCH_SERVER_CPUS / BENCH_CLIENT_CPUS (0 / 1), BENCH_SAT_CONNS
#
# Needs wrk, nginx, taskset, curl (benches/run.sh installs them). Writes the table to stdout and
# benches/results/observability.md.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=3; DURATION=10; WARM=2
BUILD=1
for arg in "$@"; do
  case $arg in
    --quick) ROUNDS=1; DURATION=4; WARM=1 ;;
    --skip-build) BUILD=0 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "observability.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
CONNS=${BENCH_SAT_CONNS:-64}
SERVER_CPUS=${BENCH_SERVER_CPUS:-0}
CLIENT_CPUS=${BENCH_CLIENT_CPUS:-1}

# 127.0.4.x: used by neither run.sh (127.0.3.x), the tests (127.{1..250}.x.y) nor the demo.
UP=127.0.4.1     # upstream nginx :8080
CP=127.0.4.20    # weft-control :15010 grpc, :15011 admin
W=127.0.4.21     # the sidecar under test (outbound :15001, admin :15000)

log() { printf '==> %s\n' "$*" >&2; }
for t in wrk nginx taskset curl python3; do
  command -v "$t" >/dev/null || { echo "observability.sh: $t is missing (benches/run.sh installs it)" >&2; exit 1; }
done

BIN=$ROOT/target/release
if [[ $BUILD == 1 ]]; then
  log "building weft-proxy and weft-control (release)"
  cargo build --release --quiet -p weft-proxy -p weft-control
fi
for b in weft-proxy weft-control; do
  [[ -x $BIN/$b ]] || { echo "observability.sh: $BIN/$b missing (run without --skip-build)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/weft-obs-bench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E '^127\.0\.4\.(1|20|21):' || true)
[[ -z $busy ]] || { echo "observability.sh: addresses in use: $busy" >&2; exit 1; }

wait_url() { # url, [host header]
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null -m 1 ${2:+-H "host: $2"} "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

mkdir -p "$WORK/up" "$WORK/policies"
cat >"$WORK/up/nginx.conf" <<EOF
daemon off;
master_process off;
user root;
worker_processes 1;
error_log $WORK/up/error.log warn;
pid $WORK/up/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/up/body;
  server {
    listen $UP:8080 backlog=4096;
    location / { default_type text/plain; return 200 "hello from the upstream\n"; }
  }
}
EOF
taskset -c "$SERVER_CPUS" nginx -c "$WORK/up/nginx.conf" -p "$WORK/up" >"$WORK/up.log" 2>&1 &
PIDS+=($!)
wait_url "http://$UP:8080/" || { echo "observability.sh: upstream nginx did not start" >&2; exit 1; }

cat >"$WORK/policies/bench.yaml" <<EOF
services:
  - {name: bench-client, namespace: bench}
  - name: upstream
    namespace: bench
    endpoints: [{address: "$UP:8080"}]
EOF
# The control channel stays plaintext (`--insecure-grpc` where TLS is the default): the data
# path is what is measured, and the sidecar needs no mesh identity to reach a static endpoint.
CONTROL=${WEFT_CONTROL_BIN:-$BIN/weft-control}
insecure=()
{ "$CONTROL" serve --help 2>/dev/null || "$CONTROL" --help 2>/dev/null; } | grep -q -- --insecure-grpc \
  && insecure=(--insecure-grpc)
taskset -c "$CLIENT_CPUS" "$CONTROL" --policies "$WORK/policies" \
  --grpc "$CP:15010" --admin "$CP:15011" "${insecure[@]}" >"$WORK/control.log" 2>&1 &
PIDS+=($!)
# The admin API is HTTPS with the control plane's CA (created in <policies>/.weft-ca).
cp_ready() {
  for _ in $(seq 1 150); do
    if [[ -s $WORK/policies/.weft-ca/roots.pem ]] && curl -fsS -o /dev/null -m 1 \
      --cacert "$WORK/policies/.weft-ca/roots.pem" "https://$CP:15011/healthz" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
cp_ready || { cat "$WORK/control.log" >&2; echo "observability.sh: weft-control did not start" >&2; exit 1; }

bootstrap() { # case -> bootstrap file
  local f=$WORK/$1.yaml
  cat >"$f" <<EOF
node: {service: bench-client, namespace: bench, id: bench-client-0}
admin: $W:15000
control_plane: http://$CP:15010
inbound: {address: "$W:15006", app: "$UP:9"}
outbound: {address: "$W:15001", tcp_bind_ip: $W}
drain_timeout: 1s
EOF
  case $1 in
    baseline) ;;
    metrics-off) printf 'observability:\n  metrics: {requests: false}\n' >>"$f" ;;
    access-log) printf 'observability:\n  access_log: {format: json, path: %s}\n' "$WORK/access.log" >>"$f" ;;
    tracing) printf 'observability:\n  tracing: {sampling: 0.0}\n' >>"$f" ;;
  esac
  echo "$f"
}

TP="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CASES=(baseline metrics-off access-log tracing)
declare -A RESULTS
run_case() { # case, round
  local c=$1 pid out rps
  rm -f "$WORK/access.log"
  RUST_LOG=${BENCH_RUST_LOG:-warn} WEFT_WORKER_THREADS=1 taskset -c "$SERVER_CPUS" "$BIN/weft-proxy" --config "$(bootstrap "$c")" \
    >"$WORK/proxy-$c.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_url "http://$W:15001/" upstream.bench; then
    tail -20 "$WORK/proxy-$c.log" >&2
    echo "observability.sh: the sidecar ($c) never routed to the upstream" >&2
    exit 1
  fi
  local hdr=()
  [[ $c == tracing ]] && hdr=(-H "traceparent: $TP")
  taskset -c "$CLIENT_CPUS" wrk -t1 -c"$CONNS" -d"${WARM}s" -H "Host: upstream.bench" "${hdr[@]}" \
    "http://$W:15001/" >/dev/null
  out=$(taskset -c "$CLIENT_CPUS" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Host: upstream.bench" \
    "${hdr[@]}" "http://$W:15001/")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "observability.sh: $c: non-2xx responses:" >&2; echo "$out" >&2
    curl -sS -i -H "Host: upstream.bench" "http://$W:15001/" >&2 || true
    exit 1
  fi
  if [[ $c == access-log ]]; then
    local lines dropped
    lines=$(wc -l <"$WORK/access.log" 2>/dev/null || echo 0)
    dropped=$(curl -fsS "http://$W:15000/metrics" | awk '/^weft_access_log_dropped_total/ {print $2}')
    log "$c round $2: $rps req/s; access log lines $lines, dropped ${dropped:-0}"
  else
    log "$c round $2: $rps req/s"
  fi
  RESULTS[$c]+="$rps "
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
  for c in "${CASES[@]}"; do run_case "$c" "$round"; done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
BASE=$(median <<<"${RESULTS[baseline]}")
{
  echo "# Observability cost (benches/observability.sh)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, proxy + upstream on CPU $SERVER_CPUS, wrk on CPU $CLIENT_CPUS;"
  echo "HTTP/1.1 keep-alive, $CONNS connections, $ROUNDS round(s) x ${DURATION}s per case (median), one sidecar"
  echo "(outbound listener -> upstream nginx), WEFT_WORKER_THREADS=1."
  echo
  echo "| case | req/s (median) | vs baseline | rounds |"
  echo "|---|---:|---:|---|"
  for c in "${CASES[@]}"; do
    m=$(median <<<"${RESULTS[$c]}")
    ratio=$(python3 -c "print(f'{$m / $BASE:.3f}')")
    echo "| $c | $m | $ratio | ${RESULTS[$c]}|"
  done
  echo
  echo "metrics on/off ratio = baseline / metrics-off; access log on/off = access-log / baseline."
} | tee "$ROOT/benches/results/observability.md"
