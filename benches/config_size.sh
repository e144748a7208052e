#!/usr/bin/env bash
# Sidecar config-size benchmark (issue 17, item 1): one real weft-proxy sidecar
# (WEFT_WORKER_THREADS=1) whose scope holds N services (no `dependencies:`), fed by a real
# weft-control (plaintext gRPC, --insecure-grpc) on a generated policy: every service with 3-10
# static endpoints (127.0.6.x, nobody listens there except svc-0's upstream nginx), one header
# route and one authorization policy. Per N it measures the sidecar's RSS after the first
# snapshot, the bytes it received (weft_config_received_bytes_total), build + swap per push
# (weft_config_apply_duration_seconds) and the CPU its control threads spend per push, the
# time from an apply to the sidecar's ACK, and p50/p99 of a
# fixed-rate HTTP/1.1 stream through the sidecar, steady and while the control plane pushes an
# endpoint change every 100 ms. Prints one table with the issue's targets and writes
# benches/results/config_size.md.
#
#   benches/config_size.sh [--quick] [--n 100,1000,5000] [--rate 500] [--duration S]
#                          [--skip-build] [--profile] [--pin] [--sched]
#
# --quick: N = 100,1000 (unless --n is given) and 8 s per load phase (default 15 s).
# --skip-build: use target/release as is (default: cargo build --release of weft-proxy and
#   weft-control first). BENCH_BIN_DIR: take the binaries from another directory.
# --profile: also `perf record` the sidecar's control threads during the pushes and print
#   where it spends its time (the report stays in the work directory: use KEEP_WORK=1).
# --pin: the sidecar on CPU 0, the control plane, nginx and h2load on CPU 1 (taskset), the
#   control plane SCHED_IDLE (chrt --idle: it stands in for a control plane on another machine
#   and only gets what CPU 1 leaves idle): the p99 during pushes then shows the sidecar's own
#   build, not the control plane's compile starving the load generator and the upstream.
# --sched: also `perf sched record` the machine during the pushes and report every time the
#   sidecar's data-path thread was woken and kept waiting > 0.3 ms for its CPU, by what that CPU
#   ran before (an idle vCPU waking up, a kernel thread, the sidecar's own snapshot build).
# Binds 127.0.6.1-3 and 127.0.6.2:18081-18083 only. KEEP_WORK=1 keeps logs and raw outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

quick=0
ns=""
rate=500
duration=""
build=1
profile=()
pin=()
sched=()
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --n) ns="$2"; shift ;;
        --n=*) ns="${1#*=}" ;;
        --rate) rate="$2"; shift ;;
        --rate=*) rate="${1#*=}" ;;
        --duration) duration="$2"; shift ;;
        --duration=*) duration="${1#*=}" ;;
        --skip-build) build=0 ;;
        --profile) profile=(--profile) ;;
        --pin) pin=(--pin) ;;
        --sched) sched=(--sched) ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "config_size.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$ns" ]; then
    if [ "$quick" = 1 ]; then ns="100,1000"; else ns="100,1000,5000"; fi
fi
if [ -z "$duration" ]; then
    if [ "$quick" = 1 ]; then duration=8; else duration=15; fi
fi
for n in ${ns//,/ }; do
    [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 20000 ]] || { echo "config_size.sh: --n: numbers 2..20000 (got $n)" >&2; exit 2; }
done
[[ $rate =~ ^[0-9]+$ && $rate -ge 5 ]] || { echo "config_size.sh: --rate: at least 5 (got $rate)" >&2; exit 2; }
[[ $duration =~ ^[0-9]+$ && $duration -ge 2 && $duration -le 300 ]] || { echo "config_size.sh: --duration: 2..300 s (got $duration)" >&2; exit 2; }

needs=(h2load nginx ss curl python3)
[ ${#profile[@]} -eq 0 ] || needs+=(perf)
[ ${#pin[@]} -eq 0 ] || needs+=(taskset)
[ ${#sched[@]} -eq 0 ] || needs+=(perf)
for t in "${needs[@]}"; do
    command -v "$t" >/dev/null || { echo "config_size.sh: $t is missing (benches/run.sh installs nginx and h2load: nghttp2-client)" >&2; exit 1; }
done

BIN=${BENCH_BIN_DIR:-$ROOT/target/release}
build_note=""
if [ "$build" = 1 ] && [ -z "${BENCH_BIN_DIR:-}" ]; then
    echo "==> cargo build --release -p weft-proxy -p weft-control"
    if ! cargo build --release --quiet -p weft-proxy -p weft-control; then
        build_note="the release build failed: the binaries already in target/release were used"
        echo "WARNING: $build_note" >&2
    fi
fi
for b in weft-proxy weft-control; do
    [ -x "$BIN/$b" ] || { echo "config_size.sh: $BIN/$b is missing: build it" >&2; exit 1; }
done

busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E '^127\.0\.6\.[123]:' || true)
[ -z "$busy" ] || { echo "config_size.sh: addresses in use: $busy" >&2; exit 1; }

work=$(mktemp -d -t weft-config-size-XXXXXX)
child=""
cleanup() {
    # The driver stops its own processes (nginx, weft-control, weft-proxy) by PID on SIGTERM.
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

loads=()
reports=()
failures=()
for n in ${ns//,/ }; do
    la=$(cut -d' ' -f1-3 /proc/loadavg)
    loads+=("N=$n: $la")
    echo "==> N=$n (load average $la)"
    # Bounded: the driver's own waits are bounded; this is the backstop.
    timeout --signal=TERM 900 python3 "$ROOT/benches/lib/config_size.py" run --n "$n" --bin-dir "$BIN" \
        --work "$work/n$n" --json "$work/n$n.json" --rate "$rate" --duration "$duration" "${profile[@]}" "${pin[@]}" "${sched[@]}" &
    child=$!
    if wait "$child"; then
        reports+=("$work/n$n.json")
    else
        failures+=("N=$n: the driver failed (exit $?); see the log above")
    fi
    child=""
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
table=""
if [ ${#reports[@]} -gt 0 ]; then
    table=$(python3 "$ROOT/benches/lib/config_size.py" table "${reports[@]}")
fi

out=benches/results/config_size.md
mkdir -p benches/results
{
    echo "# Sidecar config size (issue 17)"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $commit"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo)"
    echo "- load average (1/5/15 min) at the start of each N: ${loads[*]}"
    echo "- command: \`benches/config_size.sh ${args[*]}\`"
    echo "- mesh: N services in namespace \`cs\` (plus the sidecar's own, \`client\`), no \`dependencies:\`; 3-10 static endpoints each; one header route and one authorization policy each; load: h2load --h1, 5 connections, $rate req/s for $duration s per phase, to svc-0 (3 nginx endpoints) through the sidecar's outbound listener; pushes: svc-(N-1)'s endpoints rewritten every 100 ms through the admin API"
    if [ ${#pin[@]} -gt 0 ]; then echo "- pinned (--pin): the sidecar on CPU 0; weft-control (SCHED_IDLE), nginx, h2load and the driver on CPU 1, all in one session (one scheduling autogroup)"; fi
    echo
    echo "$table"
    if [ -n "$build_note" ]; then echo; echo "Note: $build_note."; fi
    if [ ${#failures[@]} -gt 0 ]; then
        echo
        echo "Failed runs:"
        for f in "${failures[@]}"; do echo "- $f"; done
    fi
    echo
    echo "Columns: see benches/README.md, \"Sidecar config size\"."
} >"$out"

echo
cat "$out"
echo
echo "wrote $out"
[ ${#failures[@]} -eq 0 ]
