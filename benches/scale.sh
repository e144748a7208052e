#!/usr/bin/env bash
# Control-plane scale benchmark (issue 15): N simulated proxies (benches/scale, `weft-scale`)
# speaking the real authenticated discovery protocol to one weft-control replica on a policy
# directory and to three replicas on a 3-member etcd cluster. Builds the release binaries,
# runs the matrix, prints one table and writes benches/results/scale.md.
#
#   benches/scale.sh [--quick] [--replicas 1|3|1,3] [--n 100,1000,5000] [--deps K]
#                    [--skip-build] [--skip-install]
#
# --quick: N = 100,1000 (unless --n is given) and a 120 s bound per phase.
# --deps K: dependencies per service (default 3); 0 = no `dependencies:` (every proxy may call
#   every service).
# Environment: SCALE_WAIT_QUIET (default 120s: how long each run waits for loadavg < 1),
# KEEP_WORK=1 (keep every run's directory: logs, CA, etcd data, JSON reports).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
replicas="1,3"
ns=""
deps=""
skip_build=0
skip_install=0
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --replicas) replicas="$2"; shift ;;
        --replicas=*) replicas="${1#*=}" ;;
        --n) ns="$2"; shift ;;
        --n=*) ns="${1#*=}" ;;
        --deps) deps="$2"; shift ;;
        --deps=*) deps="${1#*=}" ;;
        --skip-build) skip_build=1 ;;
        --skip-install) skip_install=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$ns" ]; then
    if [ "$quick" = 1 ]; then ns="100,1000"; else ns="100,1000,5000"; fi
fi
for r in ${replicas//,/ }; do
    case "$r" in 1|3) ;; *) echo "--replicas: 1, 3 or 1,3 (got $r)" >&2; exit 2 ;; esac
done

if [[ ",$replicas," == *",3,"* ]] && [ "$skip_install" = 0 ] && ! command -v etcd >/dev/null; then
    echo "==> installing etcd (Debian etcd-server etcd-client)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server etcd-client >/dev/null
fi

build_note=""
if [ "$skip_build" = 0 ]; then
    echo "==> cargo build --release -p weft-control -p weft-scale"
    if ! cargo build --release -p weft-control -p weft-scale; then
        build_note="the release build failed: the binaries already in target/release were used"
        echo "WARNING: $build_note" >&2
    fi
fi
for b in weft-control weftctl weft-scale; do
    [ -x "target/release/$b" ] || { echo "target/release/$b is missing: build it" >&2; exit 1; }
done

# One socket per simulated proxy on each side; the runs raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d -t weft-scale-matrix-XXXXXX)
cleanup() { if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

timeout_args=()
if [ "$quick" = 1 ]; then timeout_args=(--phase-timeout 120s); fi
deps_args=()
if [ -n "$deps" ]; then deps_args=(--deps "$deps"); fi

reports=()
failures=()
for r in ${replicas//,/ }; do
    for n in ${ns//,/ }; do
        echo "==> N=$n replicas=$r (loadavg $(cat /proc/loadavg))"
        run_dir="$work/n$n-r$r"
        mkdir -p "$run_dir"
        if target/release/weft-scale run --n "$n" --replicas "$r" --bin-dir target/release \
            --work "$run_dir" --json "$run_dir/report.json" \
            --wait-quiet "${SCALE_WAIT_QUIET:-120s}" \
            "${deps_args[@]}" "${timeout_args[@]}" >"$run_dir/report.out" 2>"$run_dir/run.log"; then
            grep '^weft-scale:' "$run_dir/run.log" | sed 's/^/    /'
            reports+=("$run_dir/report.json")
        else
            echo "    FAILED; the end of its log:"
            tail -n 20 "$run_dir/run.log" | sed 's/^/    /'
            failures+=("N=$n replicas=$r: $(tail -n 1 "$run_dir/run.log")")
        fi
    done
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
table=""
if [ ${#reports[@]} -gt 0 ]; then
    table=$(target/release/weft-scale table "${reports[@]}")
fi

out=benches/results/scale.md
mkdir -p benches/results
{
    echo "# Control-plane scale benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $commit"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo); open-file limit $(ulimit -n)"
    echo "- command: \`benches/scale.sh ${args[*]}\`"
    if [ "${deps:-3}" = 0 ]; then
        echo "- mesh: N simulated proxies over N/10 services (namespace \`scale\`), no \`dependencies:\` (every proxy may call every service), one header route and one authorization policy per service"
    else
        echo "- mesh: N simulated proxies over N/10 services (namespace \`scale\`), each service with ${deps:-3} \`dependencies:\` (the next ones), one header route and one authorization policy per service"
    fi
    echo
    echo "$table"
    if [ -n "$build_note" ]; then echo; echo "Note: $build_note."; fi
    if [ ${#failures[@]} -gt 0 ]; then
        echo
        echo "Failed runs:"
        for f in "${failures[@]}"; do echo "- $f"; done
    fi
    echo
    echo "Columns: see benches/README.md, \"Control-plane scale\"."
} >"$out"

echo
cat "$out"
echo
echo "wrote $out"
[ ${#failures[@]} -eq 0 ]
