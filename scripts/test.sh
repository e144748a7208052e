#!/usr/bin/env bash
# Runs Weft's whole test suite on a fresh machine: installs what the tests
# need, checks formatting and lints, builds the binaries the end-to-end tests
# start, then runs every unit and end-to-end test.
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
