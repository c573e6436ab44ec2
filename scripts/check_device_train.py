"""Correctness of `dagr-inject train --device cuda`: the same run (CNN model, DAGR + three
cross-entropy heads, AdamW with clipping, 12 steps; the fused step and the split step of
`--grad-accum 2`) on ONNX Runtime's CUDA execution provider and on its CPU execution provider must end with the same parameters, optimizer state and
BatchNorm statistics (relative error below 1e-3: cuDNN's convolutions sum in another order).
Needs numpy, the release binary and, for CUDA, ORT_DYLIB_PATH at ONNX Runtime's CUDA build
(scripts/gpu_run.sh sets it up).

    python scripts/check_device_train.py [--out DIR]

Exits non-zero when the two runs differ or the CUDA run fails; writes DIR/check_device.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cnn_task  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "dagr-inject"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as d:
        _, dpath, graph = cnn_task.write_task(a.bin, d, 96)
        worst = 0.0
        # The fused step, and the split step (gradient graph + update graph, --grad-accum 2).
        for accum in (1, 2):
            states = {}
            for dev in ("cpu", "cuda"):
                out = os.path.join(d, f"{dev}{accum}")
                r = subprocess.run([a.bin, "train", graph, "--data", dpath, "--epochs", "1", "--batch-size", "8",
                                    "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01",
                                    "--clip-grad-norm", "1.0", "--backend", "ort", "--device", dev,
                                    "--no-shuffle", "--grad-accum", str(accum), "--out", out],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"train --device {dev} --grad-accum {accum} failed:\n{r.stderr}")
                ck = np.load(os.path.join(out, "checkpoint.npz"))
                # The state tensors; "__checkpoint__" is the run's record (it names the device).
                states[dev] = {k: ck[k] for k in ck.files if k != "__checkpoint__"}
            part = {}
            for k, cpu in states["cpu"].items():
                gpu = states["cuda"][k]
                scale = max(float(np.abs(cpu).max()), 1e-6)
                part[k] = float(np.abs(gpu - cpu).max()) / scale
            w = max(part.values())
            report[f"grad_accum_{accum}"] = {"worst_relative_error": w, "tensors": len(part), "per_tensor": part}
            print(f"CUDA vs CPU after 12 AdamW steps, --grad-accum {accum}: {len(part)} state tensors, "
                  f"worst relative error {w:.2e}")
            worst = max(worst, w)
    report["worst_relative_error"] = worst
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_device.json"), "w") as f:
        json.dump(report, f, indent=1)
    if worst > 1e-3:
        sys.exit("the CUDA run differs from the CPU run")


if __name__ == "__main__":
    main()
