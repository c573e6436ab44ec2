"""Correctness of `dagr-inject train --device cuda`: the same runs (the CNN model, DAGR + three
cross-entropy heads, SGD with momentum; the MLP model, AdamW; both with clipping, 12 steps, as
the fused step and as the split step of `--grad-accum 2`) on ONNX Runtime's CUDA execution
provider and on its CPU execution provider must end with the same parameters, optimizer state
and BatchNorm statistics (relative error below 1e-3: cuDNN's convolutions sum in another order).
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
    worst = 0.0
    # SGD with momentum on the CNN (every tensor: the update is linear in the gradient, so a conv
    # bias before BatchNorm, whose true gradient is zero, keeps rounding noise at noise size), and
    # AdamW on the MLP (Adam turns such noise into full-size steps that no two summation orders
    # agree on, so not on the CNN); each as the fused step and as the split step (--grad-accum 2).
    runs = [("av_cnn", ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01", "--clip-grad-norm", "1.0"]),
            ("av_mlp", ["--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01",
                        "--clip-grad-norm", "1.0"])]
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for model, flags in runs:
            os.makedirs(os.path.join(d, model))
            _, dpath, graph = cnn_task.write_task(a.bin, os.path.join(d, model), 96, model)
            for accum in (1, 2):
                states = {}
                for dev in ("cpu", "cuda"):
                    out = os.path.join(d, model, f"{dev}{accum}")
                    r = subprocess.run([a.bin, "train", graph, "--data", dpath, "--epochs", "1", "--batch-size", "8",
                                        *flags, "--backend", "ort", "--device", dev, "--no-shuffle",
                                        "--grad-accum", str(accum), "--out", out], capture_output=True, text=True)
                    if r.returncode != 0:
                        sys.exit(f"{model}: train --device {dev} --grad-accum {accum} failed:\n{r.stderr}")
                    ck = np.load(os.path.join(out, "checkpoint.npz"))
                    # The state tensors; "__checkpoint__" is the run's record (it names the device).
                    states[dev] = {k: ck[k] for k in ck.files if k != "__checkpoint__"}
                np.savez(os.path.join(a.out, f"states_{model}_{accum}.npz"),
                         **{f"{dev}:{k}": v for dev, st in states.items() for k, v in st.items()})
                # Each tensor against itself, or against a thousandth of the largest tensor of
                # its kind (parameters, a slot of the optimizer, BatchNorm statistics) where that
                # is larger: a slot whose true value is zero (the momentum of a conv bias before
                # BatchNorm) holds the rounding noise of each summation order, on both devices.
                kind = lambda k: k.split("/")[0]  # noqa: E731
                top = {}
                for k, cpu in states["cpu"].items():
                    top[kind(k)] = max(top.get(kind(k), 0.0), float(np.abs(cpu).max()))
                part = {}
                for k, cpu in states["cpu"].items():
                    gpu = states["cuda"][k]
                    scale = max(float(np.abs(cpu).max()), 1e-3 * top[kind(k)], 1e-12)
                    part[k] = float(np.abs(gpu - cpu).max()) / scale
                w = max(part.values())
                report[f"{model}_{flags[1]}_grad_accum_{accum}"] = {"worst_relative_error": w, "per_tensor": part}
                print(f"{model}, {flags[1]}, --grad-accum {accum}: CUDA vs CPU after 12 steps, {len(part)} state "
                      f"tensors, worst relative error {w:.2e}")
                worst = max(worst, w)
    report["worst_relative_error"] = worst
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_device.json"), "w") as f:
        json.dump(report, f, indent=1)
    if worst > 1e-3:
        sys.exit("the CUDA run differs from the CPU run")


if __name__ == "__main__":
    main()
