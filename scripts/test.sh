#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), formatting, then every test.
# Tests that need ONNX Runtime or onnx.checker fail, never skip, when set-up is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo test --locked
