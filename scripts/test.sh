#!/usr/bin/env bash
# Runs Weft's whole test suite on a fresh machine: installs what the tests
# need, checks formatting and lints, builds the binaries the end-to-end tests
# start, then runs every unit and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() { # packages...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    echo "==> installing ${missing[*]}"
    local sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
apt_install curl netcat-openbsd

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> building binaries for the end-to-end tests"
cargo build --workspace --bins --quiet
echo "==> cargo test"
cargo test --workspace --no-fail-fast -- --test-threads=2
echo "==> demo check (scripts/demo.sh --check)"
scripts/demo.sh --check
