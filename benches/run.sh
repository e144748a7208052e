#!/usr/bin/env bash
# Weft load benchmark: direct (no proxy) vs Weft (outbound sidecar; sidecar-to-sidecar, plaintext
# and mTLS) vs HAProxy vs nginx, in one run on this machine, loopback only. See benches/README.md.
#
#   benches/run.sh            full mode (bounded, ~7 minutes of measurement)
#   benches/run.sh --quick    a few seconds per case (smoke run, ~2 minutes)
#   options: --skip-build (use the release binaries already in target/release)
#            --skip-install (don't apt-get / cargo install the load tools)
#            --only=direct,haproxy,nginx,weft,mtls (a subset; `weft` = weft + weft-mesh,
#              `mtls` = weft-mesh-mtls)
#            --cases=fix,sat,h2,conn,tcp,tcpconn,idle (a subset of the cases; default all)
#            --rounds=N (interleaved rounds, reported as median [min-max]; default 3 in full
#              mode, 1 with --quick)
#            --pgo (measure the profile-guided build: scripts/build-pgo.sh, target/pgo/release)
#
# Writes the table to stdout and benches/results/latest.md (BENCH_OUT: another file).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/benches
HELPER="python3 $BENCH/lib/bench.py"

MODE=full
ONLY=direct,haproxy,nginx,weft,mtls
CASES=fix,sat,h2,conn,tcp,tcpconn,idle
BUILD=1
INSTALL=1
PGO=0
ROUNDS=""
for arg in "$@"; do
  case $arg in
    --quick) MODE=quick ;;
    --skip-build) BUILD=0 ;;
    --skip-install) INSTALL=0 ;;
    --only=*) ONLY=${arg#--only=} ;;
    --cases=*) CASES=${arg#--cases=} ;;
    --rounds=*) ROUNDS=${arg#--rounds=} ;;
    --pgo) PGO=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- durations (seconds)
if [[ $MODE == quick ]]; then
  D_FIX=3; D_SAT=3; D_H2=3; D_TCP=2; D_CONN=2; D_TCPCONN=2; WARM=1; IDLE_HOLD=3
else
  D_FIX=15; D_SAT=15; D_H2=10; D_TCP=10; D_CONN=5; D_TCPCONN=5; WARM=2; IDLE_HOLD=5
fi
if [[ -z $ROUNDS ]]; then
  if [[ $MODE == quick ]]; then ROUNDS=1; else ROUNDS=3; fi
fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds wants a positive integer" >&2; exit 2; }
FIX_RATE=${BENCH_FIX_RATE:-2000}      # req/s of the fixed-rate latency case
FIX_CONNS=10                          # connections of the fixed-rate case (FIX_RATE/10 each)
SAT_CONNS=${BENCH_SAT_CONNS:-64}      # keep-alive connections at saturation
H2_CONNS=4; H2_STREAMS=16             # h2load: connections x concurrent streams each
CONN_CONNS=16                         # concurrent clients of the new-connection case
TCPCONN_CONNS=${BENCH_TCPCONN_CONNS:-32}  # connections in flight in the TCP new-connection case
TCPCONN_SIZE=16                       # bytes each TCP connection sends (and gets echoed)
IDLE_N=${BENCH_IDLE_CONNS:-10000}     # idle keep-alive connections

# ---------------------------------------------------------------- pinning (2 cores)
# Server side (the proxy under test + the upstream nginx + iperf3 server) on SERVER_CPUS, load
# generators (wrk, h2load, oha, iperf3 client, the idle-connection client) and the idle
# weft-control on CLIENT_CPUS. Every proxy gets the same core and one worker thread.
SERVER_CPUS=${BENCH_SERVER_CPUS:-0}
CLIENT_CPUS=${BENCH_CLIENT_CPUS:-1}
srv() { taskset -c "$SERVER_CPUS" "$@"; }
cli() { taskset -c "$CLIENT_CPUS" "$@"; }

# ---------------------------------------------------------------- addresses (loopback only)
# 127.0.3.x: never used by the tests (127.{1..250}.x.y) nor the demo (127.0.0.x).
UP=127.0.3.1          # upstream nginx :8080 (h1) :8082 (h2c); iperf3 server :5201; TCP echo :5400
HAP=127.0.3.10        # HAProxy :8080 h1, :8082 h2c, :5201 tcp, :5400 tcp (echo)
NGX=127.0.3.11        # nginx proxy :8080 h1, :8082 h2c, :5201 tcp, :5400 tcp (echo)
CP=127.0.3.20         # weft-control :15010 grpc, :15011 admin
W_CLIENT=127.0.3.21   # the caller's sidecar (outbound :15001, tcp :5301 / :5302 / :5303 / :5304)
W_MESH=127.0.3.22     # sidecar of service `mesh` (app = upstream :8080)
W_MESH_H2=127.0.3.23  # sidecar of service `mesh-h2` (app = upstream :8082)
W_MESH_TCP=127.0.3.24 # sidecar of service `tcp-mesh` (app = iperf3 :5201)
W_MESH_ECHO=127.0.3.25 # sidecar of service `tcp-echo-mesh` (app = TCP echo :5400)
# weft-mesh-mtls: the same five sidecars and control plane, with a CA, TLS gRPC, join tokens,
# and `mtls: strict` for the callees (a separate phase, after the plaintext sidecars stopped).
CP_M=127.0.3.30       # weft-control --ca-dir (TLS gRPC) :15010, admin :15011
M_CLIENT=127.0.3.31   # the caller's sidecar (identity bench-client)
M_MESH=127.0.3.32     # sidecar of `mesh` (strict mTLS inbound; app = upstream :8080)
M_MESH_H2=127.0.3.33  # sidecar of `mesh-h2` (strict; app = upstream :8082)
M_MESH_TCP=127.0.3.34 # sidecar of `tcp-mesh` (strict; app = iperf3 :5201)
M_MESH_ECHO=127.0.3.35 # sidecar of `tcp-echo-mesh` (strict; app = TCP echo :5400)

need() { command -v "$1" >/dev/null 2>&1; }
log() { printf '==> %s\n' "$*" >&2; }

# ---------------------------------------------------------------- install the tools
if [[ $INSTALL == 1 ]]; then
  pkgs=()
  need wrk || pkgs+=(wrk)
  need h2load || pkgs+=(nghttp2-client)
  need haproxy || pkgs+=(haproxy)
  need nginx || pkgs+=(nginx-light)
  [[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || pkgs+=(libnginx-mod-stream)
  need iperf3 || pkgs+=(iperf3)
  need taskset || pkgs+=(util-linux)
  need curl || pkgs+=(curl)
  # The release build of Weft needs protoc (etcd-client compiles etcd's .proto files).
  need protoc || pkgs+=(protobuf-compiler libprotobuf-dev)
  if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  # oha (fixed-rate latency with -q). Optional: without it the fixed-rate case uses h2load --h1 --rps.
  if ! need oha && [[ ${BENCH_NO_OHA:-0} != 1 ]]; then
    log "installing oha (cargo install oha --locked; a one-time build of a few minutes)"
    nice -n 5 cargo install oha --locked --quiet >&2 || log "cargo install oha failed: using h2load --h1 --rps for the fixed-rate case"
  fi
fi
for t in wrk h2load haproxy nginx iperf3 taskset curl python3; do
  need "$t" || { echo "run.sh: $t is missing (run without --skip-install)" >&2; exit 1; }
done
export PATH=$HOME/.cargo/bin:$PATH
FIX_TOOL=h2load
need oha && FIX_TOOL=oha

# ---------------------------------------------------------------- build Weft (release)
BIN=${BENCH_BIN_DIR:-$ROOT/target/release}   # BENCH_BIN_DIR: Weft binaries built elsewhere (with --skip-build)
WEFT_NOTE=""
OUT=${BENCH_OUT:-$BENCH/results/latest.md}
BUILD_LOG=${TMPDIR:-/tmp}/weft-bench-build.log
build_weft() { # what, command...: runs the build; on failure shows its tail and notes it
  local what=$1; shift
  log "building Weft: $what ($*)"
  if ! "$@" >"$BUILD_LOG" 2>&1; then
    tail -20 "$BUILD_LOG" >&2
    WEFT_NOTE+="$what failed (see $BUILD_LOG); "
    log "the $what failed; Weft cases use the binaries already in $BIN, if any"
  fi
}
if [[ $PGO == 1 ]]; then
  BIN=${BENCH_BIN_DIR:-$ROOT/target/pgo/release}
  WEFT_NOTE="Weft: profile-guided build ($BIN, scripts/build-pgo.sh); "
  if [[ $BUILD == 1 ]]; then
    build_weft "profile-guided build" "$ROOT/scripts/build-pgo.sh"   # ~25 minutes
  fi
elif [[ $BUILD == 1 ]]; then
  build_weft "release build" cargo build --release --quiet -p weft-proxy -p weft-control
fi
WEFT_OK=1
for b in weft-proxy weft-control; do
  [[ -x $BIN/$b ]] || { WEFT_OK=0; WEFT_NOTE+="$BIN/$b missing; "; }
done

# ---------------------------------------------------------------- state, processes, cleanup
# A run killed with SIGKILL can't run its trap: its processes would keep our addresses. Stop
# them by the PIDs it recorded (only those whose command line names its temp dir).
LAST=/tmp/weft-bench.last
if [[ -s $LAST ]]; then
  read -r old_work <"$LAST" || true
  if [[ -n ${old_work:-} && -f $old_work/pids ]]; then
    while read -r pid _; do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$old_work"; then
        log "stopping PID $pid left over by an earlier run"; kill "$pid" 2>/dev/null || true
      fi
    done <"$old_work/pids"
    sleep 0.5
  fi
fi
busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E '^127\.0\.3\.[0-9]+:' || true)
if [[ -n $busy ]]; then
  echo "run.sh: addresses of the benchmark are in use (an earlier run's leftovers?):" $busy >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/weft-bench.XXXXXX)
echo "$WORK" >"$LAST"
RES=$WORK/results.json   # per round: results.rN.json, merged into this one at the end
PIDS=$WORK/pids
: >"$PIDS"
# 10k idle connections need ~10k descriptors in the proxy and in the client. Containers may cap
# the hard limit (20000 here): take what we can get, and size the proxies to it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
if ((NOFILE < IDLE_N + 200)); then
  IDLE_N=$((NOFILE - 200))
  log "open-file limit is $NOFILE: using $IDLE_N idle connections"
fi
# HAProxy reserves two descriptors per connection (maxsock = 2 x maxconn) and refuses to start
# if ulimit-n can't cover that: size maxconn to the limit and use the same N for every proxy.
MAXCONN=$(((NOFILE - 100) / 2))
if ((IDLE_N > MAXCONN - 50)); then
  IDLE_N=$((MAXCONN - 50))
  log "open-file hard limit $NOFILE (HAProxy needs 2 per connection): using $IDLE_N idle connections"
fi

stop_all() {
  local pid
  # Children first (reverse start order), TERM then KILL, each by its recorded PID only.
  if [[ -s $PIDS ]]; then
    tac "$PIDS" | while read -r pid _; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    tac "$PIDS" | while read -r pid _; do kill -9 "$pid" 2>/dev/null || true; done
  fi
  if [[ ${KEEP_WORK:-0} != 1 ]]; then rm -rf "$WORK"; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

start() { # name, [srv|cli] command... (runs in the background, PID recorded)
  local name=$1; shift
  # Expand srv/cli here so that the recorded PID is the program itself (taskset execs it),
  # not a subshell running a shell function.
  case $1 in
    srv) shift; set -- taskset -c "$SERVER_CPUS" "$@" ;;
    cli) shift; set -- taskset -c "$CLIENT_CPUS" "$@" ;;
  esac
  "$@" >"$WORK/$name.log" 2>&1 &
  echo "$! $name" >>"$PIDS"
  eval "PID_${name//-/_}=$!"
}
stop() { # name: stop one process started with `start`
  local var="PID_${1//-/_}" pid
  pid=${!var:-}
  [[ -n $pid ]] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
wait_url() { # url, [host header], tries of 0.1 s
  local url=$1 host=${2:-} tries=${3:-100}
  for _ in $(seq 1 "$tries"); do
    if curl -fsS -o /dev/null -m 1 ${host:+-H "host: $host"} "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
wait_cp() { # ip, roots.pem: weft-control's admin API (HTTPS, its CA) answers /healthz
  local _
  for _ in $(seq 1 150); do
    if [[ -s $2 ]] && curl -fsS -o /dev/null -m 1 --cacert "$2" "https://$1:15011/healthz" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
wait_echo() { # host, port: a TCP connection through it gets its bytes echoed (tries of 0.1 s)
  local _
  for _ in $(seq 1 100); do
    if python3 "$BENCH/lib/tcp_conns.py" "$1" "$2" --once 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
wait_port() { # host, port
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- upstream (nginx) + iperf3
mkdir -p "$WORK/up" "$WORK/hap" "$WORK/ngx" "$WORK/weft/policies" "$WORK/weft-mtls/policies" "$WORK/weft-mtls/tokens"
cat >"$WORK/up/nginx.conf" <<EOF
daemon off;
master_process off;
user root;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
error_log $WORK/up/error.log warn;
pid $WORK/up/nginx.pid;
events { worker_connections $((NOFILE - 100)); }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/up/body;
  server {
    listen $UP:8080 backlog=4096;
    listen $UP:8082 http2 backlog=4096;
    location / { default_type text/plain; return 200 "hello from the upstream\n"; }
  }
}
EOF
log "starting the upstream (nginx, 1 worker, core $SERVER_CPUS), iperf3 -s and the TCP echo server"
start upstream srv nginx -c "$WORK/up/nginx.conf" -p "$WORK/up"
start iperf srv iperf3 -s -B $UP -p 5201 --logfile "$WORK/iperf3-server.log"
# TCP echo (the TCP new-connection case): echoes TCPCONN_SIZE bytes, then closes first.
start echo srv python3 "$BENCH/lib/tcp_echo.py" $UP 5400 --close-after $TCPCONN_SIZE
wait_url "http://$UP:8080/" || { cat "$WORK/upstream.log" >&2; echo "run.sh: upstream nginx did not start" >&2; exit 1; }
wait_port $UP 5201 || { echo "run.sh: iperf3 server did not start" >&2; exit 1; }
wait_port $UP 5400 || { cat "$WORK/echo.log" >&2; echo "run.sh: TCP echo server did not start" >&2; exit 1; }

# ---------------------------------------------------------------- HAProxy
cat >"$WORK/hap/haproxy.cfg" <<EOF
global
  nbthread 1
  # Explicit ulimit-n: HAProxy would otherwise insist on 2 x maxconn descriptors, more than a
  # container's hard limit allows; idle clients need one each (server connections are pooled).
  ulimit-n $NOFILE
  maxconn $MAXCONN
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
listen tcp
  mode tcp
  bind $HAP:5201
  server s1 $UP:5201
listen tcpecho
  mode tcp
  bind $HAP:5400 backlog 4096
  server s1 $UP:5400
EOF

# ---------------------------------------------------------------- nginx as proxy
cat >"$WORK/ngx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
error_log $WORK/ngx/error.log warn;
pid $WORK/ngx/nginx.pid;
events { worker_connections $((NOFILE - 100)); }
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
stream {
  server { listen $NGX:5201; proxy_pass $UP:5201; }
  server { listen $NGX:5400 backlog=4096; proxy_pass $UP:5400; }
}
EOF

# ---------------------------------------------------------------- Weft
# One control plane, five sidecars. `weft` = the caller's sidecar only (outbound listener ->
# upstream nginx as a static endpoint). `weft-mesh` = caller's sidecar -> callee's sidecar
# (inbound) -> upstream: the full mesh path, with the callee registered by the control plane.
weft_policy() { # file, mtls mode of the callees (mesh, mesh-h2, tcp-mesh, tcp-echo-mesh)
  cat >"$1" <<EOF
services:
  - {name: bench-client, namespace: bench}
  - name: upstream          # outbound-only: static endpoint = the upstream nginx (h1)
    namespace: bench
    endpoints: [{address: "$UP:8080"}]
  - {name: mesh, namespace: bench, mtls: $2}      # endpoints: the registered sidecar
  - {name: mesh-h2, namespace: bench, mtls: $2}   # endpoints: the registered sidecar
  - name: tcp-direct
    namespace: bench
    protocol: tcp
    port: 5301
    endpoints: [{address: "$UP:5201"}]
  - {name: tcp-mesh, namespace: bench, protocol: tcp, port: 5302, mtls: $2}
  - name: tcp-echo          # the TCP new-connection case, caller's sidecar only
    namespace: bench
    protocol: tcp
    port: 5303
    endpoints: [{address: "$UP:5400"}]
  - {name: tcp-echo-mesh, namespace: bench, protocol: tcp, port: 5304, mtls: $2}
EOF
}
# Plaintext mesh: the control channel is plaintext (--insecure-grpc) and the sidecars have no
# join token, so no identity: sidecar-to-sidecar is plaintext, which callers allow only to
# `mtls: disabled` services (they fail closed, 503, for strict and permissive ones).
weft_policy "$WORK/weft/policies/bench.yaml" disabled
# mTLS mesh: `strict` callees accept mTLS only (a plaintext connection is closed and counted as
# weft_inbound_connections_total{tls="refused"}), so plaintext can't sneak into the numbers.
weft_policy "$WORK/weft-mtls/policies/bench.yaml" strict
weft_bootstrap() { # file, service, ip, app, [mtls: control plane ip, CA roots, token file]
  cat >"$1" <<EOF
node: {service: $2, namespace: bench, id: $2-0}
admin: $3:15000
inbound: {address: "$3:15006", app: "$4"}
outbound: {address: "$3:15001", tcp_bind_ip: $3}
drain_timeout: 1s
EOF
  if [[ -n ${5:-} ]]; then
    printf 'control_plane: https://%s:15010\ncontrol_plane_ca: %s\njoin_token_file: %s\n' "$5" "$6" "$7" >>"$1"
  else
    echo "control_plane: http://$CP:15010" >>"$1"
  fi
}
weft_bootstrap "$WORK/weft/client.yaml" bench-client $W_CLIENT "$UP:9"
weft_bootstrap "$WORK/weft/mesh.yaml" mesh $W_MESH "$UP:8080"
weft_bootstrap "$WORK/weft/mesh-h2.yaml" mesh-h2 $W_MESH_H2 "$UP:8082"
weft_bootstrap "$WORK/weft/tcp-mesh.yaml" tcp-mesh $W_MESH_TCP "$UP:5201"
weft_bootstrap "$WORK/weft/tcp-echo-mesh.yaml" tcp-echo-mesh $W_MESH_ECHO "$UP:5400"
MCA=$WORK/weft-mtls/ca
for spec in "bench-client $M_CLIENT $UP:9" "mesh $M_MESH $UP:8080" "mesh-h2 $M_MESH_H2 $UP:8082" "tcp-mesh $M_MESH_TCP $UP:5201" "tcp-echo-mesh $M_MESH_ECHO $UP:5400"; do
  read -r svc ip app <<<"$spec"
  weft_bootstrap "$WORK/weft-mtls/$svc.yaml" "$svc" "$ip" "$app" $CP_M "$MCA/roots.pem" "$WORK/weft-mtls/tokens/$svc.token"
done

# One data-path worker per proxy: weft-proxy reads WEFT_WORKER_THREADS (bootstrap
# `worker_threads`; 1 = a current-thread runtime), like haproxy nbthread 1 / nginx 1 worker.
export WEFT_WORKER_THREADS=1
WEFT_THREADS_NOTE="weft-proxy: WEFT_WORKER_THREADS=1 (one current-thread data-path runtime), pinned with taskset"
export RUST_LOG=${BENCH_RUST_LOG:-warn}

# ---------------------------------------------------------------- measurement helpers
TARGETS=(direct weft weft-mesh weft-mesh-mtls haproxy nginx)
CLK=$($HELPER clk-tck)

# h1/h2/tcp addresses and Host header per target.
h1_addr() { case $1 in direct) echo $UP:8080 ;; haproxy) echo $HAP:8080 ;; nginx) echo $NGX:8080 ;; weft|weft-mesh) echo $W_CLIENT:15001 ;; weft-mesh-mtls) echo $M_CLIENT:15001 ;; esac; }
h2_addr() { case $1 in direct) echo $UP:8082 ;; haproxy) echo $HAP:8082 ;; nginx) echo $NGX:8082 ;; weft|weft-mesh) echo $W_CLIENT:15001 ;; weft-mesh-mtls) echo $M_CLIENT:15001 ;; esac; }
tcp_addr() { case $1 in direct) echo "$UP 5201" ;; haproxy) echo "$HAP 5201" ;; nginx) echo "$NGX 5201" ;; weft) echo "$W_CLIENT 5301" ;; weft-mesh) echo "$W_CLIENT 5302" ;; weft-mesh-mtls) echo "$M_CLIENT 5302" ;; esac; }
echo_addr() { case $1 in direct) echo "$UP 5400" ;; haproxy) echo "$HAP 5400" ;; nginx) echo "$NGX 5400" ;; weft) echo "$W_CLIENT 5303" ;; weft-mesh) echo "$W_CLIENT 5304" ;; weft-mesh-mtls) echo "$M_CLIENT 5304" ;; esac; }
h1_host() { case $1 in weft) echo upstream.bench ;; weft-mesh|weft-mesh-mtls) echo mesh.bench ;; *) echo "" ;; esac; }
# The h2 case: weft, like HAProxy and nginx, proxies h2c from the client to the upstream's
# HTTP/1.1 port, so the upstream (on the proxy's core) does the same work for all three.
h2_host() { case $1 in weft) echo upstream.bench ;; weft-mesh|weft-mesh-mtls) echo mesh-h2.bench ;; *) echo "" ;; esac; }
# The callees' sidecars (inbound listeners) of a mesh target: their admin IPs.
inbound_ips() { case $1 in weft-mesh) echo "$W_MESH $W_MESH_H2 $W_MESH_TCP $W_MESH_ECHO" ;; weft-mesh-mtls) echo "$M_MESH $M_MESH_H2 $M_MESH_TCP $M_MESH_ECHO" ;; esac; }
# The callee's sidecar of the TCP new-connection case (tcp-echo-mesh).
echo_ip() { case $1 in weft-mesh) echo "$W_MESH_ECHO" ;; weft-mesh-mtls) echo "$M_MESH_ECHO" ;; esac; }
# weft_inbound_connections_total{tls=LABEL}, summed over the sidecars at the given IPs.
inbound_conns() { # label, ip...
  local label=$1 ip total=0 v
  shift
  for ip in "$@"; do
    v=$(curl -fsS -m 2 "http://$ip:15000/metrics" 2>/dev/null |
      awk -v m="weft_inbound_connections_total{tls=\"$label\"}" '$1 == m && !done {print $2; done = 1}' || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
tls_snapshot() { # target: "mtls plaintext refused" inbound connection counts of its callees
  local ips
  ips=$(inbound_ips "$1")
  echo "$(inbound_conns mtls $ips) $(inbound_conns plaintext $ips) $(inbound_conns refused $ips)"
}

# PIDs whose CPU and memory count for a target, by case (h1 | h2 | tcp | echo).
proxy_pids() {
  case $1 in
    direct) echo "" ;;
    haproxy) echo "${PID_haproxy:-}" ;;
    nginx) echo "${NGX_WORKERS:-}" ;;
    weft) echo "${PID_w_client:-}" ;;
    weft-mesh)
      case ${2:-h1} in
        h1) echo "${PID_w_client:-} ${PID_w_mesh:-}" ;;
        h2) echo "${PID_w_client:-} ${PID_w_mesh_h2:-}" ;;
        tcp) echo "${PID_w_client:-} ${PID_w_mesh_tcp:-}" ;;
        echo) echo "${PID_w_client:-} ${PID_w_mesh_echo:-}" ;;
      esac ;;
    weft-mesh-mtls)
      case ${2:-h1} in
        h1) echo "${PID_m_client:-} ${PID_m_mesh:-}" ;;
        h2) echo "${PID_m_client:-} ${PID_m_mesh_h2:-}" ;;
        tcp) echo "${PID_m_client:-} ${PID_m_mesh_tcp:-}" ;;
        echo) echo "${PID_m_client:-} ${PID_m_mesh_echo:-}" ;;
      esac ;;
  esac
}

# fixed-rate HTTP/1.1 keep-alive latency
case_fix() { # target
  local t=$1 addr host out=$WORK/$1.fix.out
  addr=$(h1_addr "$t"); host=$(h1_host "$t")
  if [[ $FIX_TOOL == oha ]]; then
    cli oha --no-tui --output-format json -z "${D_FIX}s" -c $FIX_CONNS -q "$FIX_RATE" \
      --latency-correction ${host:+--host "$host"} "http://$addr/" >"$out" 2>&1 || true
    $HELPER oha "$RES" "$t" fix "$out"
  else
    cli h2load --h1 -t 1 -c $FIX_CONNS --rps $((FIX_RATE / FIX_CONNS)) -D "$D_FIX" \
      --warm-up-time=1 --log-file="$WORK/$t.fix.log" \
      ${host:+-H ":authority: $host"} "http://$addr/" >"$out" 2>&1 || true
    $HELPER h2load "$RES" "$t" fix "$out" "$WORK/$t.fix.log"
  fi
}

# saturation HTTP/1.1 keep-alive (wrk): req/s, latency, CPU per request, RSS under load
case_sat() {
  local t=$1 addr host out=$WORK/$1.sat.out pids c0 c1 u0 u1 reqs sampler=""
  addr=$(h1_addr "$t"); host=$(h1_host "$t"); pids=$(proxy_pids "$t" h1)
  cli wrk -t 1 -c $SAT_CONNS -d "${WARM}s" -s "$BENCH/lib/wrk_json.lua" "http://$addr/" >/dev/null 2>&1 || true
  c0=$($HELPER cpu $pids); u0=$($HELPER cpu-user $pids)
  if [[ -n $pids ]]; then
    $HELPER sample-rss "$WORK/$t.rss.load" "$((D_SAT - 1))" $pids &
    sampler=$!
  fi
  WRK_HOST=$host cli wrk -t 1 -c $SAT_CONNS -d "${D_SAT}s" --timeout 5s -s "$BENCH/lib/wrk_json.lua" \
    "http://$addr/" >"$out" 2>&1 || true
  c1=$($HELPER cpu $pids); u1=$($HELPER cpu-user $pids)
  if [[ -n $sampler ]]; then wait "$sampler" || true; fi
  $HELPER wrk "$RES" "$t" sat "$out"
  reqs=$($HELPER get "$RES" "$t" sat.requests)
  if [[ -n $pids && -n $reqs ]]; then
    $HELPER put "$RES" "$t" cpu.sat "$(python3 -c "print(($c1-$c0)/$CLK*1e6/$reqs)")"
    $HELPER put "$RES" "$t" cpu.sat.user "$(python3 -c "print(($u1-$u0)/$CLK*1e6/$reqs)")"
  fi
  if [[ -n $pids && -s $WORK/$t.rss.load ]]; then
    $HELPER put "$RES" "$t" rss.load "$(python3 -c "print($(cat "$WORK/$t.rss.load")/1024)")"
  fi
}

# HTTP/2 cleartext, several streams per connection (h2load)
case_h2() {
  local t=$1 addr host out=$WORK/$1.h2.out pids c0 c1 reqs
  addr=$(h2_addr "$t"); host=$(h2_host "$t"); pids=$(proxy_pids "$t" h2)
  c0=$($HELPER cpu $pids)
  cli h2load -t 1 -c $H2_CONNS -m $H2_STREAMS -D "$D_H2" --warm-up-time="$WARM" \
    ${host:+-H ":authority: $host"} "http://$addr/" >"$out" 2>&1 || true
  c1=$($HELPER cpu $pids)
  $HELPER h2load "$RES" "$t" h2 "$out"
  reqs=$($HELPER get "$RES" "$t" h2.requests)
  if [[ -n $pids && -n $reqs ]]; then
    # CPU includes the warm-up second's requests, which h2load doesn't count: an upper bound.
    $HELPER put "$RES" "$t" cpu.h2 "$(python3 -c "print(($c1-$c0)/$CLK*1e6/$reqs)")"
  fi
}

# new connections per second: HTTP/1.1 with Connection: close, one request per connection
case_conn() {
  local t=$1 addr host out=$WORK/$1.conn.out s0="" s1
  addr=$(h1_addr "$t"); host=$(h1_host "$t")
  [[ $t == weft-mesh* ]] && s0=$(tls_snapshot "$t")
  WRK_CLOSE=1 WRK_HOST=$host cli wrk -t 1 -c $CONN_CONNS -d "${D_CONN}s" --timeout 5s \
    -s "$BENCH/lib/wrk_json.lua" "http://$addr/" >"$out" 2>&1 || true
  $HELPER wrk "$RES" "$t" conn "$out"
  if [[ -n $s0 ]]; then
    # Sidecar-to-sidecar connections opened during this case (the caller's sidecar pools them:
    # a closed downstream connection does not close the upstream one).
    s1=$(tls_snapshot "$t")
    $HELPER put "$RES" "$t" conn.inbound "$(($(echo "$s1" | cut -d' ' -f1) + $(echo "$s1" | cut -d' ' -f2) - $(echo "$s0" | cut -d' ' -f1) - $(echo "$s0" | cut -d' ' -f2)))"
  fi
}

# TCP throughput (iperf3, one stream, client -> server)
case_tcp() {
  local t=$1 out=$WORK/$1.tcp.out h p
  read -r h p <<<"$(tcp_addr "$t")"
  cli iperf3 -c "$h" -p "$p" -t "$D_TCP" -J >"$out" 2>&1 || true
  $HELPER iperf "$RES" "$t" tcp "$out"
}

# TCP new connections per second: connect -> send TCPCONN_SIZE bytes -> read the echo and the
# server's EOF -> close, TCPCONN_CONNS in flight (lib/tcp_conns.py). Through weft-mesh-mtls every
# connection is one HTTP/2 CONNECT stream on the caller's pooled mTLS connections to the callee
# (the tunnel, on by default; WEFT_TUNNEL=off in the proxies' environment gives a full handshake
# per connection instead): tcpconn.inbound records the callee's weft_inbound_connections_total
# delta (mTLS connections accepted) against the client's connections.
case_tcpconn() {
  local t=$1 out=$WORK/$1.tcpconn.out h p pids c0 c1 s0="" s1 ip n m0 p0 m1 p1
  read -r h p <<<"$(echo_addr "$t")"
  pids=$(proxy_pids "$t" echo)
  ip=$(echo_ip "$t")
  if [[ -n $ip ]]; then s0="$(inbound_conns mtls "$ip") $(inbound_conns plaintext "$ip")"; fi
  c0=$($HELPER cpu $pids)
  cli python3 "$BENCH/lib/tcp_conns.py" "$h" "$p" --secs "$D_TCPCONN" --conc $TCPCONN_CONNS \
    --size $TCPCONN_SIZE >"$out" 2>&1 || true
  c1=$($HELPER cpu $pids)
  $HELPER tcpconns "$RES" "$t" tcpconn "$out"
  n=$($HELPER get "$RES" "$t" tcpconn.opened)
  if [[ -n $pids && -n $n && $n != 0 ]]; then
    # Every connection the client opened (those still in flight at the deadline included).
    $HELPER put "$RES" "$t" cpu.tcpconn "$(python3 -c "print(($c1-$c0)/$CLK*1e6/$n)")"
  fi
  if [[ -n $s0 ]]; then
    s1="$(inbound_conns mtls "$ip") $(inbound_conns plaintext "$ip")"
    read -r m0 p0 <<<"$s0"; read -r m1 p1 <<<"$s1"
    $HELPER put "$RES" "$t" tcpconn.inbound "mtls +$((m1 - m0)), plaintext +$((p1 - p0)) / ${n:-?} client conns"
  fi
}

# RSS idle, and with IDLE_N idle keep-alive connections (proxies only)
case_idle() {
  local t=$1 addr host pids out=$WORK/$1.idle.out ok
  addr=$(h1_addr "$t"); host=$(h1_host "$t"); pids=$(proxy_pids "$t" h1)
  [[ -n $pids ]] || return 0
  start "idle_$t" cli python3 "$BENCH/lib/idle_conns.py" "${addr%:*}" "${addr##*:}" "$IDLE_N" \
    ${host:+--host-header "$host"} --hold 300
  for _ in $(seq 1 600); do
    grep -q '^ready' "$WORK/idle_$t.log" 2>/dev/null && break
    kill -0 "$(eval echo "\$PID_idle_${t//-/_}")" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q '^ready' "$WORK/idle_$t.log" 2>/dev/null; then
    $HELPER fail "$RES" "$t" rss.10k "idle client: $(tail -1 "$WORK/idle_$t.log" 2>/dev/null)"
    stop "idle_$t"; return 0
  fi
  sleep "$IDLE_HOLD"
  $HELPER put "$RES" "$t" rss.10k "$(python3 -c "print($($HELPER rss $pids)/1024)")"
  ok=$(sed -n 's/^ready ok=\([0-9]*\).*/\1/p' "$WORK/idle_$t.log")
  $HELPER put "$RES" "$t" idle.ok "$ok/$IDLE_N"
  # Does the proxy still answer while holding them?
  if ! curl -fsS -o /dev/null -m 2 ${host:+-H "host: $host"} "http://$addr/"; then
    $HELPER put "$RES" "$t" idle.ok "$ok/$IDLE_N, then a new request FAILED"
  fi
  log "$t: $(head -1 "$WORK/idle_$t.log"); RSS $($HELPER get "$RES" "$t" rss.10k) MB"
  stop "idle_$t"
  sleep 1
}

has_case() { [[ ",$CASES," == *",$1,"* ]]; }

run_target() { # target
  local t=$1 s0="" s1 m0 p0 r0 m1 p1 r1
  [[ $t == weft-mesh* ]] && s0=$(tls_snapshot "$t")
  if has_case fix; then log "[$t] fixed rate ($FIX_RATE req/s, $FIX_TOOL, ${D_FIX}s)"; case_fix "$t"; fi
  if has_case sat; then log "[$t] HTTP/1.1 saturation (wrk -c $SAT_CONNS, ${D_SAT}s)"; case_sat "$t"; fi
  if has_case h2; then log "[$t] HTTP/2 (h2load -c $H2_CONNS -m $H2_STREAMS, ${D_H2}s)"; case_h2 "$t"; fi
  if has_case conn; then log "[$t] new connections (wrk Connection: close, ${D_CONN}s)"; case_conn "$t"; fi
  if has_case tcp; then log "[$t] TCP throughput (iperf3, ${D_TCP}s)"; case_tcp "$t"; fi
  if has_case tcpconn; then
    log "[$t] TCP new connections (tcp_conns.py -c $TCPCONN_CONNS, connect/echo/close, ${D_TCPCONN}s)"; case_tcpconn "$t"
  fi
  if [[ -n $s0 ]]; then
    # What the callees' inbound listeners accepted during this target's cases, by transport.
    s1=$(tls_snapshot "$t")
    read -r m0 p0 r0 <<<"$s0"; read -r m1 p1 r1 <<<"$s1"
    $HELPER put "$RES" "$t" tls.inbound "mtls +$((m1 - m0)), plaintext +$((p1 - p0)), refused +$((r1 - r0))"
    $HELPER put "$RES" "$t" tls.mtls "$((m1 - m0))"
    $HELPER put "$RES" "$t" tls.plaintext "$((p1 - p0))"
    log "[$t] callees' inbound connections: $($HELPER get "$RES" "$t" tls.inbound)"
  fi
}

fail_all() { # target, reason
  local m
  for m in fix.rps sat.rps h2.rps conn.rps tcp.mbps tcpconn.rps rss.idle; do $HELPER fail "$RES" "$1" "$m" "$2"; done
}

idle_rss() { # target: RSS after start, before traffic (one request to warm up)
  local pids
  pids=$(proxy_pids "$1" h1)
  [[ -n $pids ]] || return 0
  sleep 1
  $HELPER put "$RES" "$1" rss.idle "$(python3 -c "print($($HELPER rss $pids)/1024)")"
}

# ---------------------------------------------------------------- the run
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "mode $MODE; pinning: server side (proxy + upstream) on CPU $SERVER_CPUS, load generators on CPU $CLIENT_CPUS"

on() { [[ ",$ONLY," == *",$1,"* ]]; }

phase_direct() {
# direct
if on direct; then run_target direct; fi

}

phase_haproxy() {
# HAProxy
if on haproxy; then
log "starting HAProxy (nbthread 1, CPU $SERVER_CPUS)"
start haproxy srv haproxy -db -f "$WORK/hap/haproxy.cfg"
if wait_url "http://$HAP:8080/"; then
  idle_rss haproxy
  run_target haproxy
  if has_case idle && ((ROUND == 1)); then case_idle haproxy; fi
else
  fail_all haproxy "haproxy did not start: $(tail -1 "$WORK/haproxy.log")"
fi
stop haproxy
fi

}

phase_nginx() {
# nginx
if on nginx; then
log "starting nginx (worker_processes 1, CPU $SERVER_CPUS)"
start nginx srv nginx -c "$WORK/ngx/nginx.conf" -p "$WORK/ngx"
if wait_url "http://$NGX:8080/"; then
  NGX_WORKERS=$($HELPER children "$PID_nginx")
  idle_rss nginx
  run_target nginx
  if has_case idle && ((ROUND == 1)); then case_idle nginx; fi
else
  fail_all nginx "nginx did not start: $(tail -1 "$WORK/nginx.log")"
fi
stop nginx
fi

}

# Did any sidecar die during the run? Errors the sidecars logged (at warn and above)?
check_sidecars() { # log-name prefix (w | m), label, name...
  local prefix=$1 label=$2 p var nerr
  shift 2
  for p in "$@"; do
    var="PID_$p"
    if ! kill -0 "${!var}" 2>/dev/null; then
      WEFT_NOTE+="$label: weft-proxy $p exited during the run: $(tail -1 "$WORK/$p.log" | cut -c1-160); "
    fi
  done
  # (The plaintext sidecars' start-up warning "no join_token: running without a mesh identity"
  # is what that phase asks for: not counted.)
  nerr=$(cat "$WORK"/"$prefix"_*.log 2>/dev/null | grep -E ' (WARN|ERROR) ' | grep -c -v 'no join_token' || true)
  if [[ $nerr -gt 0 ]]; then
    WEFT_NOTE+="$label: the sidecars logged $nerr WARN/ERROR lines, e.g.: $(cat "$WORK"/"$prefix"_*.log | grep -E ' (WARN|ERROR) ' | grep -v -m1 'no join_token' | cut -c1-200 | sed 's/\x1b\[[0-9;]*m//g'); "
  fi
}

phase_weft() {
# Weft, plaintext mesh
if ! on weft; then
  :
elif [[ $WEFT_OK == 1 ]]; then
  log "starting weft-control (--insecure-grpc, CPU $CLIENT_CPUS) and 5 weft-proxy sidecars without identities (CPU $SERVER_CPUS, 1 worker thread)"
  start control cli "$BIN/weft-control" --policies "$WORK/weft/policies" \
    --grpc $CP:15010 --admin $CP:15011 --insecure-grpc  # no CA in use: the plaintext mesh
  if wait_cp $CP "$WORK/weft/policies/.weft-ca/roots.pem"; then
    start w_client srv "$BIN/weft-proxy" --config "$WORK/weft/client.yaml"
    start w_mesh srv "$BIN/weft-proxy" --config "$WORK/weft/mesh.yaml"
    start w_mesh_h2 srv "$BIN/weft-proxy" --config "$WORK/weft/mesh-h2.yaml"
    start w_mesh_tcp srv "$BIN/weft-proxy" --config "$WORK/weft/tcp-mesh.yaml"
    start w_mesh_echo srv "$BIN/weft-proxy" --config "$WORK/weft/tcp-echo-mesh.yaml"
    ready=1
    for ip in $W_CLIENT $W_MESH $W_MESH_H2 $W_MESH_TCP $W_MESH_ECHO; do
      wait_url "http://$ip:15000/ready" "" 150 || { ready=0; log "sidecar $ip not ready"; }
    done
    # Registration is asynchronous: wait until the caller's sidecar routes to both paths.
    wait_url "http://$W_CLIENT:15001/" upstream.bench 100 || ready=0
    wait_url "http://$W_CLIENT:15001/" mesh.bench 100 || ready=0
    wait_echo $W_CLIENT 5303 || { ready=0; log "no TCP route to tcp-echo through $W_CLIENT:5303"; }
    wait_echo $W_CLIENT 5304 || { ready=0; log "no TCP route to tcp-echo-mesh through $W_CLIENT:5304"; }
    if [[ $ready == 1 ]]; then
      idle_rss weft
      $HELPER put "$RES" weft-mesh rss.idle "$(python3 -c "print($($HELPER rss $(proxy_pids weft-mesh h1))/1024)")"
      run_target weft
      run_target weft-mesh
      if has_case idle && ((ROUND == 1)); then case_idle weft; fi
    else
      why="sidecars not ready / no route (logs: control, w_client); first error: $({ grep -h -m1 -i 'error' "$WORK"/w_client.log "$WORK"/control.log 2>/dev/null || true; } | head -1 | cut -c1-100)"
      fail_all weft "$why"; fail_all weft-mesh "$why"
    fi
    check_sidecars w "plaintext (round $ROUND)" w_client w_mesh w_mesh_h2 w_mesh_tcp w_mesh_echo
  else
    fail_all weft "weft-control did not start: $(tail -1 "$WORK/control.log")"
    fail_all weft-mesh "weft-control did not start"
  fi
  # Free CPU $SERVER_CPUS (and the memory) before the mTLS phase.
  for p in w_mesh_echo w_mesh_tcp w_mesh_h2 w_mesh w_client control; do stop "$p"; done
else
  fail_all weft "not built: $WEFT_NOTE"; fail_all weft-mesh "not built"
fi

}

phase_mtls() {
# Weft, mTLS mesh: the same path; the control plane runs its CA (TLS gRPC), every sidecar joins
# with its service's token and gets a SPIFFE certificate, the callees are `mtls: strict`.
if ! on mtls; then
  :
elif [[ $WEFT_OK == 1 ]]; then
  log "starting weft-control (--ca-dir, TLS gRPC, CPU $CLIENT_CPUS) and 5 weft-proxy sidecars with join tokens (CPU $SERVER_CPUS)"
  start control_m cli "$BIN/weft-control" --policies "$WORK/weft-mtls/policies" --ca-dir "$MCA" \
    --grpc $CP_M:15010 --admin $CP_M:15011
  if wait_cp $CP_M "$MCA/roots.pem"; then
    tok_ok=1
    for svc in bench-client mesh mesh-h2 tcp-mesh tcp-echo-mesh; do
      "$BIN/weft-control" token --ca-dir "$MCA" --service "$svc" --namespace bench \
        >"$WORK/weft-mtls/tokens/$svc.token" 2>>"$WORK/control_m.log" || tok_ok=0
    done
    start m_client srv "$BIN/weft-proxy" --config "$WORK/weft-mtls/bench-client.yaml"
    start m_mesh srv "$BIN/weft-proxy" --config "$WORK/weft-mtls/mesh.yaml"
    start m_mesh_h2 srv "$BIN/weft-proxy" --config "$WORK/weft-mtls/mesh-h2.yaml"
    start m_mesh_tcp srv "$BIN/weft-proxy" --config "$WORK/weft-mtls/tcp-mesh.yaml"
    start m_mesh_echo srv "$BIN/weft-proxy" --config "$WORK/weft-mtls/tcp-echo-mesh.yaml"
    ready=$tok_ok
    for ip in $M_CLIENT $M_MESH $M_MESH_H2 $M_MESH_TCP $M_MESH_ECHO; do
      wait_url "http://$ip:15000/ready" "" 150 || { ready=0; log "sidecar $ip not ready"; }
    done
    # Registration and certificates are asynchronous: wait until a request goes through
    # (a strict callee refuses the caller until both have their certificates).
    wait_url "http://$M_CLIENT:15001/" mesh.bench 150 || ready=0
    h2ok=0
    for _ in $(seq 1 100); do
      if curl -fsS -o /dev/null -m 1 --http2-prior-knowledge -H 'host: mesh-h2.bench' "http://$M_CLIENT:15001/" 2>/dev/null; then h2ok=1; break; fi
      sleep 0.1
    done
    [[ $h2ok == 1 ]] || { ready=0; log "no h2 route to mesh-h2.bench through $M_CLIENT"; }
    wait_echo $M_CLIENT 5304 || { ready=0; log "no TCP route to tcp-echo-mesh through $M_CLIENT:5304"; }
    if [[ $ready == 1 ]]; then
      $HELPER put "$RES" weft-mesh-mtls rss.idle "$(python3 -c "print($($HELPER rss $(proxy_pids weft-mesh-mtls h1))/1024)")"
      run_target weft-mesh-mtls
      # Strict means strict: a plaintext request straight to a callee's inbound listener must fail.
      code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' -H 'host: mesh.bench' "http://$M_MESH:15006/" || true)
      if [[ $code == 000 ]]; then
        WEFT_NOTE+="weft-mesh-mtls: a plaintext request straight to the strict callee's inbound listener ($M_MESH:15006) was refused (connection closed); "
      else
        WEFT_NOTE+="weft-mesh-mtls: a plaintext request to the strict callee's inbound listener got HTTP $code (expected a refusal); "
      fi
      if [[ $($HELPER get "$RES" weft-mesh-mtls tls.mtls) == 0 || -z $($HELPER get "$RES" weft-mesh-mtls tls.mtls) ]]; then
        WEFT_NOTE+="weft-mesh-mtls: the callees counted no mTLS connections: the column is NOT an mTLS measurement; "
      fi
    else
      why="mTLS sidecars not ready / no route (tokens ok: $tok_ok; logs: control_m, m_client); first error: $({ grep -h -m1 -E 'ERROR|WARN' "$WORK"/m_client.log "$WORK"/m_mesh.log "$WORK"/control_m.log 2>/dev/null || true; } | head -1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-120)"
      fail_all weft-mesh-mtls "$why"
    fi
    check_sidecars m "mTLS (round $ROUND)" m_client m_mesh m_mesh_h2 m_mesh_tcp m_mesh_echo
  else
    fail_all weft-mesh-mtls "weft-control --ca-dir did not start: $(tail -1 "$WORK/control_m.log")"
  fi
  for p in m_mesh_echo m_mesh_tcp m_mesh_h2 m_mesh m_client control_m; do stop "$p"; done
else
  fail_all weft-mesh-mtls "not built: $WEFT_NOTE"
fi

}

# ---------------------------------------------------------------- the rounds
# N interleaved rounds: every target once per round (the order rotates from round to round, so
# a slow drift of the machine does not always hit the same target), each round into its own
# results file; the report shows the median of the rounds with min-max. The idle-connection case
# (RSS with 10k connections: memory, not speed) runs in the first round only.
PHASES=(direct haproxy nginx weft mtls)
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  RES=$WORK/results.r$ROUND.json
  echo '{}' >"$RES"
  shift_by=$(((ROUND - 1) % ${#PHASES[@]}))
  order=("${PHASES[@]:shift_by}" "${PHASES[@]:0:shift_by}")
  log "round $ROUND of $ROUNDS: ${order[*]}"
  for ph in "${order[@]}"; do "phase_$ph"; done
done
RES=$WORK/results.json
$HELPER merge "$RES" "$WORK"/results.r*.json

# ---------------------------------------------------------------- report
T_END=$(date +%s)
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -1)
[[ -n $dirty ]] && commit+=" (working tree has uncommitted changes)"
python3 - "$WORK/meta.json" <<EOF
import json, sys
notes = [n.strip() for n in """${WEFT_NOTE}""".split("; ") if n.strip()]
notes.append("""${WEFT_THREADS_NOTE}""")
meta = {
  "date": "$(date -u '+%Y-%m-%d %H:%M UTC')",
  "commit": """$commit""",
  "cores": "$(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))",
  "command": "benches/run.sh $*",
  "load": "load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every number)",
  "idle_n": $IDLE_N,
  "rounds": $ROUNDS,
  "mode": "$MODE ($ROUNDS interleaved round(s), median [min-max]): fixed ${FIX_RATE} req/s ${D_FIX}s, saturation ${D_SAT}s (wrk -c $SAT_CONNS), h2 ${D_H2}s (h2load -c $H2_CONNS -m $H2_STREAMS), conn ${D_CONN}s (-c $CONN_CONNS), tcp ${D_TCP}s, tcp conns ${D_TCPCONN}s (-c $TCPCONN_CONNS, $TCPCONN_SIZE B), cases $CASES, $IDLE_N idle conns; total $((T_END - T_START))s",
  "pinning": "proxy under test + upstream nginx + iperf3 server on CPU $SERVER_CPUS; load generators + weft-control on CPU $CLIENT_CPUS; haproxy nbthread 1, nginx worker_processes 1, weft-proxy 1 worker thread",
  "tools": "fixed rate: $FIX_TOOL; saturation + new conns: wrk; h2: h2load; tcp: iperf3; tcp new conns: benches/lib/tcp_conns.py -> tcp_echo.py (Python, epoll); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | cut -d: -f2 | xargs)",
  "notes": notes,
}
json.dump(meta, open(sys.argv[1], "w"))
EOF
echo
$HELPER report "$RES" "$WORK/meta.json" "$OUT"
echo
log "written to $OUT"
