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
# The Python package as a user installs it: a fresh virtual environment, `pip install .`
# (maturin builds the native module, reusing this build's artifacts), then pytest on the API
# and the `dagr-inject` command it puts on PATH. Versions pinned by the constraints file.
rm -rf .venv-pkg
"${PYTHON:-python3}" -m venv .venv-pkg
PIP_CONSTRAINT="$PWD/scripts/constraints-package.txt" .venv-pkg/bin/python -m pip install --quiet \
  --disable-pip-version-check ".[test]"
.venv-pkg/bin/python -m pytest -q -p no:cacheprovider python/tests 2>&1 | tee -a "$log"
# One closing line over all test binaries (cargo prints one per binary, pytest one).
awk '/^test result:/ { p += $4; f += $6 }
     /^[0-9]+ (passed|failed)/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
