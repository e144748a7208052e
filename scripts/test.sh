#!/usr/bin/env bash
# Runs Weft's whole test suite on a fresh machine: installs what the tests
# need, checks formatting and lints, builds the binaries the end-to-end tests
# start, runs every unit and end-to-end test, the demo check, and a short fuzz run.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

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
# A short bounded fuzz run of every target (the corpora are also replayed by the unit tests
# above); without a sanitizer it builds in a few minutes and catches panics. Longer runs with
# AddressSanitizer: scripts/fuzz.sh 300 (fuzz/README.md).
echo "==> fuzzing (scripts/fuzz.sh 20: 20 s per target, no sanitizer)"
FUZZ_SANITIZER=none scripts/fuzz.sh 20
