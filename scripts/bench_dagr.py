"""Benchmark: the injected DAGR subgraph (forward + dagr/grad/*) on ONNX Runtime CPU against the
same computation in PyTorch eager on CPU (forward + autograd backward), side by side.

    cargo build --release
    python scripts/bench_dagr.py            # needs torch, onnxruntime, numpy (scripts/requirements-bench.txt)

Prints one row per (B, D) with both median times and the ratio ours/PyTorch (target <= 0.8).
Also times `dagr-inject` rewriting the largest model in models/ against the floor of any
Python rewrite: `onnx.load` + appending one node + `onnx.save` (target <= 0.3).
Both sides use the same number of threads (--threads, default: all cores).
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from timing import median_time
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "dagr-inject")


def torch_dagr(zs, tau=0.5, delta=0.5, ld=0.1, la=0.1):
    us = [F.normalize(z, dim=1) for z in zs]
    per = []
    for u in us:
        b = u.shape[0]
        d2 = torch.cdist(u, u).pow(2)
        iu = torch.triu_indices(b, b, 1)
        s = -d2[iu[0], iu[1]] / tau
        per.append(torch.logsumexp(s, 0) - math.log(s.numel()))
    anc = torch.relu((us[0] - us[1]).norm(dim=1) - delta).mean()
    return ld * torch.stack(per).mean() + la * anc


def bench_subgraph(threads, reps):
    torch.set_num_threads(threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    print(f"DAGR forward + gradients, M = 2, {threads} thread(s), median of {reps}")
    print(f"{'B':>6} {'D':>5} {'ours (ORT) ms':>14} {'PyTorch ms':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as d:
        for dim in (128, 512):
            path = os.path.join(d, f"block{dim}.onnx")
            subprocess.run([BIN, "block", "--dim", str(dim), "--names", "a,b", "-o", path], check=True, capture_output=True)
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            outs = ["dagr/loss", "dagr/grad/a", "dagr/grad/b"]
            for b in (64, 256, 1024):
                rng = np.random.default_rng(0)
                za = rng.standard_normal((b, dim), dtype=np.float32)
                zb = rng.standard_normal((b, dim), dtype=np.float32)
                t_ours = median_time(lambda: sess.run(outs, {"a": za, "b": zb}), reps)
                ta = torch.from_numpy(za)
                tb = torch.from_numpy(zb)

                def step():
                    x = ta.clone().requires_grad_(True)
                    y = tb.clone().requires_grad_(True)
                    loss = torch_dagr([x, y])
                    gx, gy = torch.autograd.grad(loss, [x, y])
                    return loss.item(), gx, gy

                t_torch = median_time(step, reps)
                # Same numbers on both sides (a benchmark of a wrong computation is worthless).
                ours = sess.run(outs, {"a": za, "b": zb})
                ref = step()
                assert abs(ours[0] - ref[0]) < 1e-4 * max(1.0, abs(ref[0])), (ours[0], ref[0])
                print(f"{b:>6} {dim:>5} {t_ours * 1e3:>14.3f} {t_torch * 1e3:>11.3f} {t_ours / t_torch:>6.2f}")


def bench_rewrite(reps):
    models = [os.path.join(ROOT, "models", f) for f in os.listdir(os.path.join(ROOT, "models")) if f.endswith(".onnx")]
    largest = max(models, key=os.path.getsize)
    script = (
        "import onnx, sys\n"
        "m = onnx.load(sys.argv[1])\n"
        "m.graph.node.append(onnx.helper.make_node('Identity', [m.graph.output[0].name], ['x']))\n"
        "onnx.save(m, sys.argv[2])\n"
    )
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "o.onnx")
        enc = "audio,visual,text" if "tri" in largest else "audio,visual"
        t_ours = median_time(lambda: subprocess.run([BIN, largest, "--encoders", enc, "-o", out], check=True, capture_output=True), reps)
        t_py = median_time(lambda: subprocess.run([sys.executable, "-c", script, largest, out], check=True), reps)
    print(f"\nrewrite {os.path.basename(largest)} ({os.path.getsize(largest) // 1024} KiB), whole process, median of {reps}")
    print(f"  dagr-inject (full DAGR injection)      {t_ours * 1e3:8.1f} ms")
    print(f"  python onnx load + 1 node + save floor {t_py * 1e3:8.1f} ms")
    print(f"  ratio                                  {t_ours / t_py:8.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    bench_subgraph(a.threads, a.reps)
    bench_rewrite(max(5, a.reps // 3))
