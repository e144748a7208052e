#!/usr/bin/env bash
# Profile-guided release build of weft-proxy and weft-control (LLVM PGO).
#
#   scripts/build-pgo.sh                 # -> target/pgo/release/{weft-proxy,weft-control}
#   scripts/build-pgo.sh --skip-install  # don't apt-get llvm-profdata / the training's load tools
#
# 1. builds both binaries instrumented (`-Cprofile-generate`, target/pgo-generate),
# 2. trains them on benches/run.sh --quick --only=weft,mtls (HTTP/1.1 and HTTP/2 proxying,
#    fixed-rate and saturating, new connections, TCP bulk and new TCP connections, 9,900 idle
#    connections; outbound sidecar alone and sidecar to sidecar, plaintext and mTLS: the data
#    path, loopback only, about 2 minutes),
# 3. merges the profile (llvm-profdata) and builds both again with it (`-Cprofile-use`,
#    target/pgo). The same sources and Cargo profile as `cargo build --release`; only the
#    optimizer's choices (inlining, code layout, branch order) follow the measured hot paths:
#    benches/RESULTS.md, "Profile-guided build".
#
# About 25 minutes on 2 cores (two fat-LTO builds of a cold target directory). llvm-profdata
# must read the raw profiles of rustc's LLVM: rustup's llvm-tools if installed (the same LLVM),
# else Debian's llvm-profdata-19 or newer (installed here if missing; 19 reads rustc 1.95's
# LLVM 22 raw profiles). A version that cannot read them fails the merge, and the script.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
INSTALL=1
for arg in "$@"; do
  case $arg in
    --skip-install) INSTALL=0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "build-pgo.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }

find_profdata() {
  local p v
  for p in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata; do
    [[ -x $p ]] && { echo "$p"; return 0; }
  done
  for v in 24 23 22 21 20 19; do
    command -v "llvm-profdata-$v" >/dev/null 2>&1 && { echo "llvm-profdata-$v"; return 0; }
  done
  return 1
}
if ! PROFDATA=$(find_profdata); then
  if [[ $INSTALL == 1 ]]; then
    log "installing llvm-19 (llvm-profdata-19, apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends llvm-19 >/dev/null
  fi
  PROFDATA=$(find_profdata) || {
    echo "build-pgo.sh: no llvm-profdata (rustup component add llvm-tools, or apt-get install llvm-19)" >&2
    exit 1
  }
fi

GEN=$ROOT/target/pgo-generate
DATA=$(mktemp -d /tmp/weft-pgo.XXXXXX)
trap 'rm -rf "$DATA"' EXIT

log "1/3 instrumented build (target/pgo-generate)"
RUSTFLAGS="-Cprofile-generate=$DATA/raw" CARGO_TARGET_DIR=$GEN \
  cargo build --release --quiet -p weft-proxy -p weft-control
# Build scripts get RUSTFLAGS too and left profiles of their own while building: not wanted.
rm -rf "$DATA/raw"

log "2/3 training: benches/run.sh --quick --only=weft,mtls (log: $DATA/train.log)"
train_opts=(--quick --skip-build --only=weft,mtls)
[[ $INSTALL == 1 ]] || train_opts+=(--skip-install)
if ! BENCH_BIN_DIR=$GEN/release BENCH_OUT=$DATA/train.md \
  "$ROOT/benches/run.sh" "${train_opts[@]}" >"$DATA/train.log" 2>&1; then
  tail -20 "$DATA/train.log" >&2
  echo "build-pgo.sh: the training run failed" >&2
  exit 1
fi
shopt -s nullglob
raw=("$DATA"/raw/*.profraw)
((${#raw[@]})) || { echo "build-pgo.sh: the training left no profile in $DATA/raw" >&2; exit 1; }
"$PROFDATA" merge -o "$DATA/weft.profdata" "${raw[@]}"
log "profile: $("$PROFDATA" show "$DATA/weft.profdata" | grep -m1 'Total functions') ($PROFDATA)"

log "3/3 profile-guided build (target/pgo)"
RUSTFLAGS="-Cprofile-use=$DATA/weft.profdata" CARGO_TARGET_DIR=$ROOT/target/pgo \
  cargo build --release --quiet -p weft-proxy -p weft-control
log "built target/pgo/release/weft-proxy and target/pgo/release/weft-control"
