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
# make, for the build of jemalloc (the command's allocator; a C compiler is
# needed anyway, for tract's kernels): bookworm's, where it is missing.
if ! command -v make >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends make=4.3-4.1 >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends make=4.3-4.1 >/dev/null; }
fi
# Open MPI, for `train --distributed` and its tests (tests/it/distributed.rs): the Debian
# package, pinned to bookworm's version. The tool loads its libmpi.so.40 at run time, so the
# build itself needs no MPI.
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  pkgs="openmpi-bin=4.1.4-3+b1 libopenmpi3=4.1.4-3+b1"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }
fi
echo "Open MPI: $(mpirun --version 2>/dev/null | head -n 1)"
