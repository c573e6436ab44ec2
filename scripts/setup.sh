#!/usr/bin/env bash
# Set-up for tests and the ONNX Runtime backend: a Python virtual environment in .venv with the
# PyPI onnxruntime wheel (its libonnxruntime.so is what the `ort` backend loads) and the onnx
# package (onnx.checker runs on every graph the tests emit). Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import onnxruntime, onnx, numpy; assert onnxruntime.__version__ == "1.31.1"' 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi
lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -n 1)
echo "ONNX Runtime library: $lib"
