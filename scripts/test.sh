#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), formatting, then every test.
# Tests that need ONNX Runtime or onnx.checker fail, never skip, when set-up is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --tests 2>&1 | tee "$log"
# One closing line over all test binaries (cargo prints one per binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
