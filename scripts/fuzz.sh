#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for SECONDS (default 60), one after the
# other; prints each target's executions and whether it crashed; exits 1 if any crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default: every target of `cargo fuzz list`)
#
# Environment:
#   FUZZ_SANITIZER  address (default) | none: `none` builds and runs faster, catches panics only
#   FUZZ_TIMEOUT    seconds one input may take before libFuzzer calls it a hang (default 25)
#   FUZZ_ARGS       more libFuzzer flags for every target, e.g. "-rss_limit_mb=4096"
#
# Stable Rust only: RUSTC_BOOTSTRAP=1 lets stable rustc accept the -Z flags cargo-fuzz passes
# (-Zsanitizer=address among them). New inputs go to fuzz/target/corpus/<target> (kept between
# runs, not committed); the seeds in fuzz/corpus/<target> and fuzz/regressions/<target> are only
# read. A crash leaves its input in fuzz/artifacts/<target>/ and the log in
# fuzz/target/logs/<target>.log. See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

sanitizer="${FUZZ_SANITIZER:-address}"
timeout_s="${FUZZ_TIMEOUT:-25}"
read -r -a extra <<<"${FUZZ_ARGS:-}"

if (( $# > 0 )); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# One build of every target, with the flags `cargo fuzz run` uses (so the runs rebuild nothing).
start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "fuzz: built every target in $(( $(date +%s) - start ))s (sanitizer: $sanitizer)"

# Per-target libFuzzer flags: detect must reach past the 16 KiB detection bound; the policy
# schema's keys help the YAML target past "unknown field".
target_args() {
    case "$1" in
        detect) echo "-max_len=20000" ;;
        policy_yaml) echo "-dict=fuzz/dict/policy_yaml.dict" ;;
        *) ;;
    esac
}

mkdir -p fuzz/target/logs
summary=()
failed=0
for t in "${targets[@]}"; do
    work="fuzz/target/corpus/$t"
    log="fuzz/target/logs/$t.log"
    mkdir -p "$work" "fuzz/corpus/$t" "fuzz/regressions/$t"
    read -r -a per_target <<<"$(target_args "$t")"
    echo "fuzz: $t for ${secs}s (log: $log)"
    set +e
    cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
        -max_total_time="$secs" -timeout="$timeout_s" -print_final_stats=1 \
        "${per_target[@]}" "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's final stats; else the last status line ("#N ... exec/s").
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    if [[ -z "$execs" ]]; then
        execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)
    fi
    corpus=$(find "$work" -type f | wc -l)
    if (( rc == 0 )); then
        result="ok"
    else
        failed=1
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //' || true)
        reason=$(grep -m1 -o -E 'panicked at [^ ]*|ERROR: (AddressSanitizer|libFuzzer): [a-z-]*' "$log" || true)
        result="CRASHED (exit $rc) ${reason:-see log} ${artifact:+-> $artifact}"
        tail -40 "$log" >&2
    fi
    summary+=("$(printf '%-22s %12s executions  %6s corpus  %s' "$t" "${execs:-?}" "$corpus" "$result")")
done

echo
echo "fuzz summary (${secs}s per target, sanitizer: $sanitizer):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
