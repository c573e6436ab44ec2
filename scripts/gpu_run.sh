#!/usr/bin/env bash
# The one command to run on a lent GPU machine, in the last carry call of
# ../shared/device-cuda.md (the pieces of ONNX Runtime's CUDA build in .ortcuda/, and
# target/release/dagr-inject carried): unpacks ONNX Runtime, points the loader at PyTorch's CUDA
# libraries, checks that a CUDA training run ends where the CPU run does, and runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
cat .ortcuda/p*/part.* | tar -xz -C /tmp
export ORT_DYLIB_PATH=/tmp/ortcuda/libonnxruntime.so.1.31.1
LD_LIBRARY_PATH=/tmp/ortcuda:$(python3 - <<'PY'
import glob, os, sys
d = [p for p in sys.path if p.endswith("site-packages")][0]
print(":".join(sorted({os.path.dirname(f) for f in glob.glob(d + "/nvidia/**/lib*.so*", recursive=True)})))
PY
)
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# A CUDA session either registers or fails the run: dagr-inject never falls back to the CPU.
# First correctness (the same AdamW run on CUDA and on the CPU ends in the same state), then speed.
python3 scripts/check_device_train.py --out "${OUT:-.}"
python3 scripts/bench_train_device.py --device cuda --out "${OUT:-.}"
python3 scripts/bench_train_device.py --device cpu --out "${OUT:-.}/cpu"
