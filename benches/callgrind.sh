#!/usr/bin/env bash
# User-space instructions per request under callgrind: Weft's sidecar (the real weft-proxy
# binary, outbound listener -> a static endpoint, upstream nginx) against HAProxy and nginx on
# the same cases. Instruction counts are repeatable whatever else the machine runs, so this is
# the yardstick for per-request CPU work on a shared machine (benches/run.sh measures wall clock).
#
#   benches/callgrind.sh                         build (release), then every target and case
#   benches/callgrind.sh --skip-build            use target/release/weft-proxy + weft-control
#   benches/callgrind.sh --only=weft --cases=h1  a subset (targets: weft,haproxy,nginx; cases: h1,h2)
#   benches/callgrind.sh --annotate              also write each run's cost by source file / crate
#                                                (lib/callgrind_files.py) and top functions
#   benches/callgrind.sh --requests=20000 --warmup=2000 --rounds=1
#
# Cases (client h2load on CLIENT_CPUS, the measured proxy alone under callgrind on SERVER_CPUS):
#   h1   HTTP/1.1 keep-alive: `h2load --h1 -c 10`, upstream over HTTP/1.1 keep-alive
#   h2   HTTP/2 cleartext (prior knowledge): `h2load -c 4 -m 16`, upstream over HTTP/1.1
# Method, per target and case: start the proxy under `valgrind --tool=callgrind`, warm up
# (WARMUP requests), `callgrind_control -z` (zero the counters), N requests (all must be 2xx),
# `callgrind_control -d` (dump); instructions/request = the dump's total / N. User space only,
# every thread of the process (the kernel's share is the same order for all three: 2 reads +
# 2 writes per request on h1). Weft runs with WEFT_WORKER_THREADS=1 (current-thread runtime),
# HAProxy `nbthread 1`, nginx one worker, as in benches/run.sh.
#
# Comparing two builds: BENCH_BEFORE_DIR=/dir/with/weft-proxy adds a `weft-before` target run
# from that directory (its weft-control too if present, else the current one), in the same run
# and interleaved with the current build when --rounds > 1. BENCH_BIN_DIR replaces
# target/release for the current build (as in run.sh; implies --skip-build).
# Other environment: BENCH_SERVER_CPUS / BENCH_CLIENT_CPUS (0 / 1), BENCH_CALLGRIND_OUT (where
# the table, the raw dumps and the annotations go; default a fresh /tmp/weft-callgrind.XXXXXX),
# KEEP_WORK=1 (keep the configs and logs), BENCH_RUST_LOG (sidecar RUST_LOG, default warn).
#
# Addresses: 127.0.4.50-.55 (tests use 127.{1..250}.x.y, the demo 127.0.0.x, run.sh 127.0.3.x,
# observability.sh 127.0.4.1/.20/.21). Every process is stopped by PID. Needs valgrind, h2load,
# haproxy, nginx, taskset, curl (installed below if missing, Debian packages).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=1; ANNOTATE=0; ROUNDS=1
REQUESTS=20000; WARMUP=2000
ONLY=weft,haproxy,nginx; CASES=h1,h2
for arg in "$@"; do
  case $arg in
    --skip-build) BUILD=0 ;;
    --annotate) ANNOTATE=1 ;;
    --only=*) ONLY=${arg#--only=} ;;
    --cases=*) CASES=${arg#--cases=} ;;
    --requests=*) REQUESTS=${arg#--requests=} ;;
    --warmup=*) WARMUP=${arg#--warmup=} ;;
    --rounds=*) ROUNDS=${arg#--rounds=} ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "callgrind.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
for n in "$REQUESTS" "$WARMUP" "$ROUNDS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "callgrind.sh: --requests/--warmup/--rounds take a positive integer, got '$n'" >&2; exit 2; }
done
SERVER_CPUS=${BENCH_SERVER_CPUS:-0}
CLIENT_CPUS=${BENCH_CLIENT_CPUS:-1}
H1_CONNS=10
H2_CONNS=4; H2_STREAMS=16

UP=127.0.4.50    # upstream nginx :8080 (h1)
HAP=127.0.4.51   # HAProxy :8080 h1, :8082 h2c
NGX=127.0.4.52   # nginx proxy :8080 h1, :8082 h2c
CP=127.0.4.53    # weft-control :15010 grpc, :15011 admin
W=127.0.4.54     # the sidecar under test: outbound :15001 (h1 and h2c), admin :15000

log() { printf '==> %s\n' "$*" >&2; }

# ------------------------------------------------------------------ tools
pkgs=()
command -v valgrind >/dev/null || pkgs+=(valgrind)
command -v h2load >/dev/null || pkgs+=(nghttp2-client)
command -v haproxy >/dev/null || pkgs+=(haproxy)
command -v nginx >/dev/null || pkgs+=(nginx-light)
command -v taskset >/dev/null || pkgs+=(util-linux)
command -v curl >/dev/null || pkgs+=(curl)
if ((${#pkgs[@]})); then
  log "installing ${pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null
fi

BEFORE_DIR=${BENCH_BEFORE_DIR:-}
if [[ -n ${BENCH_BIN_DIR:-} ]]; then
  BIN=$BENCH_BIN_DIR; BUILD=0
else
  BIN=$ROOT/target/release
fi
if [[ $BUILD == 1 && ,$ONLY, == *,weft,* ]]; then
  log "building weft-proxy and weft-control (release)"
  cargo build --release --quiet -p weft-proxy -p weft-control
fi
TARGETS=()
for t in ${ONLY//,/ }; do
  case $t in
    weft|haproxy|nginx) TARGETS+=("$t") ;;
    *) echo "callgrind.sh: unknown target $t (weft, haproxy, nginx)" >&2; exit 2 ;;
  esac
done
if [[ -n $BEFORE_DIR ]]; then
  [[ -x $BEFORE_DIR/weft-proxy ]] || { echo "callgrind.sh: $BEFORE_DIR/weft-proxy missing" >&2; exit 1; }
  TARGETS=(weft-before "${TARGETS[@]}")
fi
for c in ${CASES//,/ }; do
  [[ $c == h1 || $c == h2 ]] || { echo "callgrind.sh: unknown case $c (h1, h2)" >&2; exit 2; }
done
if [[ " ${TARGETS[*]} " == *" weft"* ]]; then
  for b in weft-proxy weft-control; do
    [[ -x $BIN/$b ]] || { echo "callgrind.sh: $BIN/$b missing (run without --skip-build)" >&2; exit 1; }
  done
fi

WORK=$(mktemp -d /tmp/weft-callgrind-work.XXXXXX)
OUT=${BENCH_CALLGRIND_OUT:-$(mktemp -d /tmp/weft-callgrind.XXXXXX)}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E '^127\.0\.4\.5[0-5]:' || true)
[[ -z $busy ]] || { echo "callgrind.sh: addresses in use: $busy" >&2; exit 1; }

# Stops one PID (SIGTERM, then SIGKILL after 10 s) and forgets it.
stop() {
  local pid=$1 p keep=()
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

wait_url() { # url, host header, tries (0.2 s apart), [extra curl args]
  local url=$1 host=$2 tries=$3
  shift 3
  for _ in $(seq 1 "$tries"); do
    curl -fsS -o /dev/null -m 2 ${host:+-H "host: $host"} "$@" "$url" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# ------------------------------------------------------------------ upstream + peers' configs
mkdir -p "$WORK/up" "$WORK/hap" "$WORK/ngx" "$WORK/policies"
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
cat >"$WORK/hap/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive
  http-reuse always
frontend h1
  bind $HAP:8080 backlog 4096
  default_backend up
frontend h2
  bind $HAP:8082 proto h2 backlog 4096
  default_backend up
backend up
  server s1 $UP:8080
EOF
cat >"$WORK/ngx/nginx.conf" <<EOF
daemon off;
master_process off;
user root;
worker_processes 1;
error_log $WORK/ngx/error.log warn;
pid $WORK/ngx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/ngx/body;
  proxy_temp_path $WORK/ngx/proxy;
  upstream up { server $UP:8080; keepalive 128; keepalive_requests 10000000; }
  server {
    listen $NGX:8080 backlog=4096;
    listen $NGX:8082 http2 backlog=4096;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
EOF
# Weft: one outbound-only service with a static endpoint (HTTP/1.1 to it, the default for static
# endpoints); the caller's sidecar has the defaults of a real one (per-request metrics on, the
# service's 15 s request timeout, retries of the mesh default, outlier detection, p2c balancer).
cat >"$WORK/policies/bench.yaml" <<EOF
services:
  - {name: bench-client, namespace: bench}
  - name: upstream
    namespace: bench
    endpoints: [{address: "$UP:8080"}]
EOF
cat >"$WORK/bootstrap.yaml" <<EOF
node: {service: bench-client, namespace: bench, id: bench-client-0}
admin: $W:15000
control_plane: http://$CP:15010
inbound: {address: "$W:15006", app: "$UP:9"}
outbound: {address: "$W:15001", tcp_bind_ip: $W}
drain_timeout: 1s
EOF

log "starting the upstream (nginx, 1 worker, CPU $CLIENT_CPUS)"
taskset -c "$CLIENT_CPUS" nginx -c "$WORK/up/nginx.conf" -p "$WORK/up" >"$WORK/up.log" 2>&1 &
PIDS+=($!)
wait_url "http://$UP:8080/" "" 50 || { cat "$WORK/up.log" >&2; echo "callgrind.sh: upstream nginx did not start" >&2; exit 1; }

# weft-control (not measured) from `dir`, restarted when the directory changes.
CONTROL_PID=""; CONTROL_DIR=""
control() {
  local dir=$1 bin insecure=()
  bin=$dir/weft-control
  [[ -x $bin ]] || bin=$BIN/weft-control
  [[ $CONTROL_DIR == "$(dirname "$bin")" && -n $CONTROL_PID ]] && return 0
  [[ -z $CONTROL_PID ]] || stop "$CONTROL_PID"
  { "$bin" serve --help 2>/dev/null || "$bin" --help 2>/dev/null; } | grep -q -- --insecure-grpc && insecure=(--insecure-grpc)
  taskset -c "$CLIENT_CPUS" "$bin" --policies "$WORK/policies" \
    --grpc "$CP:15010" --admin "$CP:15011" "${insecure[@]}" >"$WORK/control.log" 2>&1 &
  CONTROL_PID=$!
  PIDS+=("$CONTROL_PID")
  CONTROL_DIR=$(dirname "$bin")
  # Ready once its gRPC port accepts (its admin port may be HTTPS with authentication).
  local up=0
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$CP/15010") 2>/dev/null; then up=1; break; fi
    sleep 0.1
  done
  [[ $up == 1 ]] || { cat "$WORK/control.log" >&2; echo "callgrind.sh: weft-control did not start" >&2; exit 1; }
}

# ------------------------------------------------------------------ one measurement
# measure TARGET CASE ROUND: sets RESULT to the instructions per request. (Not run in a
# subshell: the processes it starts must stay known to `cleanup`.)
RESULT=""
measure() {
  local t=$1 c=$2 round=$3 name=$1.$2.r$3 pid url host="" h2args=() dump total ok
  local cg=$OUT/$name.callgrind
  local vg=(nice -n 10 valgrind --tool=callgrind --callgrind-out-file="$cg" --dump-instr=no)
  rm -f "$cg" "$cg".*
  case $t in
    weft|weft-before)
      local dir=$BIN
      [[ $t == weft-before ]] && dir=$BEFORE_DIR
      control "$dir"
      RUST_LOG=${BENCH_RUST_LOG:-warn} WEFT_WORKER_THREADS=1 taskset -c "$SERVER_CPUS" "${vg[@]}" \
        "$dir/weft-proxy" --config "$WORK/bootstrap.yaml" >"$WORK/$name.log" 2>&1 &
      pid=$!; url=http://$W:15001/; host=upstream.bench ;;
    haproxy)
      taskset -c "$SERVER_CPUS" "${vg[@]}" haproxy -db -f "$WORK/hap/haproxy.cfg" >"$WORK/$name.log" 2>&1 &
      pid=$!; url=http://$HAP:8080/ ;;
    nginx)
      taskset -c "$SERVER_CPUS" "${vg[@]}" nginx -c "$WORK/ngx/nginx.conf" -p "$WORK/ngx" >"$WORK/$name.log" 2>&1 &
      pid=$!; url=http://$NGX:8080/ ;;
  esac
  PIDS+=("$pid")
  if [[ $c == h2 ]]; then
    # weft serves h1 and h2c on one port; HAProxy and nginx on a second one.
    [[ $t == haproxy || $t == nginx ]] && url=${url%:8080/}:8082/
    h2args=(-c "$H2_CONNS" -m "$H2_STREAMS")
  else
    h2args=(--h1 -c "$H1_CONNS")
  fi
  local curl_h2=()
  [[ $c == h2 ]] && curl_h2=(--http2-prior-knowledge)
  if ! wait_url "$url" "$host" 300 "${curl_h2[@]}"; then
    tail -20 "$WORK/$name.log" >&2
    echo "callgrind.sh: $t never answered 2xx on $url ($c)" >&2
    exit 1
  fi
  local hh=()
  [[ -n $host ]] && hh=(-H ":authority: $host")
  taskset -c "$CLIENT_CPUS" h2load -n "$WARMUP" "${h2args[@]}" "${hh[@]}" "$url" >"$WORK/$name.warmup" 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1 || { echo "callgrind.sh: callgrind_control -z $pid failed" >&2; exit 1; }
  taskset -c "$CLIENT_CPUS" h2load -n "$REQUESTS" "${h2args[@]}" "${hh[@]}" "$url" >"$WORK/$name.h2load" 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1 || { echo "callgrind.sh: callgrind_control -d $pid failed" >&2; exit 1; }
  ok=$(awk '/^status codes:/ {print $3}' "$WORK/$name.h2load")
  if [[ $ok != "$REQUESTS" ]]; then
    cat "$WORK/$name.h2load" >&2
    echo "callgrind.sh: $t $c: ${ok:-0} of $REQUESTS requests answered 2xx" >&2
    exit 1
  fi
  # The dump is written by the process itself, shortly after the command is taken.
  dump=""
  for _ in $(seq 1 100); do
    dump=$(ls "$cg".* 2>/dev/null | head -1 || true)
    [[ -n $dump ]] && grep -q '^totals:' "$dump" 2>/dev/null && break
    sleep 0.1
  done
  total=$(awk '/^totals:/ {print $2}' "$dump" 2>/dev/null || true)
  [[ -n $total ]] || { echo "callgrind.sh: no callgrind dump for $t $c" >&2; exit 1; }
  stop "$pid"
  rm -f "$cg"  # the at-exit dump (startup, warm-up and shutdown): not what is measured
  mv "$dump" "$OUT/$name.dump"
  if [[ $ANNOTATE == 1 ]]; then
    callgrind_annotate --inclusive=yes --threshold=99 "$OUT/$name.dump" 2>/dev/null | head -80 >"$OUT/$name.inclusive.txt" || true
    callgrind_annotate --threshold=95 "$OUT/$name.dump" 2>/dev/null | head -60 >"$OUT/$name.self.txt" || true
    # A release build inlines most of the path into a few functions: the cost by source file
    # and crate (inlined lines included) is the view that says where the instructions go.
    python3 "$ROOT/benches/lib/callgrind_files.py" "$OUT/$name.dump" "$REQUESTS" 60 >"$OUT/$name.files.txt" || true
  fi
  RESULT=$(python3 -c "print(round($total / $REQUESTS))")
}

# ------------------------------------------------------------------ rounds
declare -A RES
for round in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round so that no target always runs first.
  order=("${TARGETS[@]}")
  for ((i = 1; i < round; i++)); do order=("${order[@]:1}" "${order[0]}"); done
  for t in "${order[@]}"; do
    for c in ${CASES//,/ }; do
      log "round $round: $t $c ($REQUESTS requests after $WARMUP warm-up)"
      measure "$t" "$c" "$round"
      log "  $t $c: $RESULT instructions/request"
      RES[$t.$c]+="$RESULT "
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- proxy 2>/dev/null || commit="$commit+uncommitted"
{
  echo "# User-space instructions per request (benches/callgrind.sh)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $commit, $REQUESTS requests after $WARMUP warm-up, $ROUNDS round(s) (median)."
  echo "h1: h2load --h1 -c $H1_CONNS; h2: h2load -c $H2_CONNS -m $H2_STREAMS (h2c); upstream nginx over HTTP/1.1 keep-alive."
  echo "weft: $BIN/weft-proxy${BEFORE_DIR:+; weft-before: $BEFORE_DIR/weft-proxy} (WEFT_WORKER_THREADS=1)"
  echo
  hdr="| target |"; sep="|---|"
  for c in ${CASES//,/ }; do hdr+=" $c instr/request |"; sep+="---:|"; done
  [[ -n $BEFORE_DIR ]] && { for c in ${CASES//,/ }; do hdr+=" $c vs weft-before |"; sep+="---:|"; done; }
  echo "$hdr"; echo "$sep"
  for t in "${TARGETS[@]}"; do
    row="| $t |"
    for c in ${CASES//,/ }; do
      m=$(median <<<"${RES[$t.$c]}")
      if ((ROUNDS > 1)); then row+=" $m (${RES[$t.$c]% }) |"; else row+=" $m |"; fi
    done
    if [[ -n $BEFORE_DIR ]]; then
      for c in ${CASES//,/ }; do
        m=$(median <<<"${RES[$t.$c]}"); b=$(median <<<"${RES[weft-before.$c]}")
        row+=" $(python3 -c "print(f'{$m / $b:.3f}')") |"
      done
    fi
    echo "$row"
  done
  echo
  if [[ $ANNOTATE == 1 ]]; then echo "Raw dumps and annotations: $OUT"; else echo "Raw dumps: $OUT"; fi
} | tee "$OUT/table.md"
