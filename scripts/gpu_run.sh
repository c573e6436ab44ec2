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
# First correctness (the same runs on CUDA and on the CPU end in the same state, fused and
# split steps), then device memory against PyTorch at 10M and 138M parameters (both state
# updates), then speed. DEVICE_CHECK_ONLY=1 stops after the correctness check. Each part
# runs under its own time limit, and a failing part does not stop the later ones.
out=${OUT:-.}
status=0
part() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || { echo "FAILED ($?): $*"; status=1; }; }
part 150 python3 scripts/check_device_train.py --out "$out"
if [ "${DEVICE_CHECK_ONLY:-0}" = 1 ]; then exit $status; fi
for mode in two-sets in-place; do
  part 200 python3 scripts/bench_scale.py --device cuda --sizes 10,138 --steps 4 --threads 8 --state-update $mode
done
part 90 python3 scripts/bench_train_device.py --device cuda --out "$out"
part 90 python3 scripts/bench_train_device.py --device cpu --out "$out/cpu"
exit $status
