"""Benchmark: training graphs and `dagr-inject train` on ONNX Runtime CPU against PyTorch eager
on CPU, same model, weights, batch and optimizer, side by side.

    cargo build --release
    python scripts/bench_train.py          # needs torch, onnx, onnxruntime (scripts/requirements-bench.txt)

Prints, for the CNN model (models/av_cnn.legacy.onnx) at B = 64:
  1. forward + backward of the training graph vs PyTorch forward + backward (target <= 1.0x);
  2. the DAGR overhead: the training graph with DAGR vs the same graph trained on the task loss
     alone (--no-dagr; only the gradients and the loss are fetched, so ONNX Runtime skips the
     unused DAGR nodes) (target <= 5% extra);
  3. training throughput of `dagr-inject train --backend ort` vs a PyTorch training loop doing
     the same work (SGD with momentum), and the runner's own share of a step (data, binding,
     logging): the step time minus a bare ONNX Runtime run of the same step graph
     (`<out>/step.onnx`: forward, backward and optimizer) (target >= 1.0x, < 2%); and the
     same share as `train` measures it in-process (log.jsonl: 1 - backend_seconds/step_seconds).
Both sides use the same number of threads.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "dagr-inject")
sys.path.insert(0, os.path.join(ROOT, "models"))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
import export  # noqa: E402
from generate import DEFAULT_CFG as CFG, dagr  # noqa: E402
from timing import median_time, median_times  # noqa: E402

LOGITS = ["logits", "logits_audio", "logits_visual"]


def torch_model(path):
    model, _ = export.build("av_cnn")
    export.load_onnx_weights(model, path)
    model.train()
    return model


def torch_loss(model, batch, labels, captured):
    outs = model(torch.from_numpy(batch["audio"]), torch.from_numpy(batch["visual"]))
    task = sum(F.cross_entropy(o, labels) for o in outs)
    return task + dagr([captured["audio_encoder"], captured["visual_encoder"]], CFG)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    torch.set_num_threads(a.threads)
    src = os.path.join(ROOT, "models", "av_cnn.legacy.onnx")
    rng = np.random.default_rng(0)
    b = a.batch
    batch = {"audio": rng.standard_normal((b, 1, 64), dtype=np.float32),
             "visual": rng.standard_normal((b, 3, 16, 16), dtype=np.float32)}
    labels = rng.integers(0, 10, b).astype(np.int64)
    with tempfile.TemporaryDirectory() as d:
        graphs = {}
        for name, extra in [("dagr", []), ("task", ["--no-dagr"])]:
            p = os.path.join(d, f"{name}.onnx")
            subprocess.run([BIN, src, "--encoders", "audio,visual", "--logits", ",".join(LOGITS), "--labels", "label",
                            "--train", "-o", p, "--json"] + extra, check=True, capture_output=True)
            graphs[name] = p
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.log_severity_level = 3  # parameters are inputs on purpose: no warning per parameter
        feed = dict(batch, label=labels)
        runs = {}
        for name, p in graphs.items():
            sess = ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
            outs = [o.name for o in sess.get_outputs() if o.name.endswith("_grad")]
            outs.append("dagr/total_loss" if name == "dagr" else "dagr/task_loss")
            runs[name] = (lambda s, o: (lambda: s.run(o, feed)))(sess, outs)
        model = torch_model(src)
        captured = {}
        for e in ("audio_encoder", "visual_encoder"):
            getattr(model, e).register_forward_hook(lambda m, i, o, e=e: captured.__setitem__(e, o))
        y = torch.from_numpy(labels)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            torch_loss(model, batch, y, captured).backward()

        t_dagr, t_task, t_torch = median_times([runs["dagr"], runs["task"], fwd_bwd], a.reps)
        times = {"dagr": t_dagr, "task": t_task}
        print(f"av_cnn training graph, B = {b}, {a.threads} thread(s), median of {a.reps}")
        print(f"  forward+backward   ours (ORT) {times['dagr'] * 1e3:8.2f} ms   PyTorch {t_torch * 1e3:8.2f} ms   ratio {times['dagr'] / t_torch:5.2f}")
        print(f"  DAGR overhead      with {times['dagr'] * 1e3:8.2f} ms   task only {times['task'] * 1e3:8.2f} ms   extra {100 * (times['dagr'] / times['task'] - 1):5.1f}%")

        # Training throughput: the CLI against a PyTorch loop over the same data.
        n = b * 40
        data = {"audio": rng.standard_normal((n, 1, 64), dtype=np.float32),
                "visual": rng.standard_normal((n, 3, 16, 16), dtype=np.float32),
                "label": rng.integers(0, 10, n).astype(np.int64)}
        dpath = os.path.join(d, "data.npz")
        np.savez(dpath, **data)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))

        def ours_once(k):
            out = os.path.join(d, f"run{k}")
            subprocess.run([BIN, "train", graphs["dagr"], "--data", dpath, "--epochs", "2", "--batch-size", str(b),
                            "--lr", "0.002", "--momentum", "0.9", "--backend", "ort", "--threads", str(a.threads),
                            "--no-shuffle", "--out", out],
                           check=True, capture_output=True, env=env)
            return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))][-1]

        def theirs_once():
            model = torch_model(src)
            captured = {}
            for e in ("audio_encoder", "visual_encoder"):
                getattr(model, e).register_forward_hook(lambda m, i, o, e=e: captured.__setitem__(e, o))
            opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
            t0 = time.perf_counter()
            for s in range(0, n, b):
                sl = slice(s, s + b)
                opt.zero_grad()
                torch_loss(model, {k: data[k][sl] for k in ("audio", "visual")}, torch.from_numpy(data["label"][sl]),
                           captured).backward()
                opt.step()
            return n / (time.perf_counter() - t0)

        pairs = [(ours_once(k), theirs_once()) for k in range(3)]
        ours = statistics.median(p[0]["samples_per_second"] for p in pairs)
        inside = statistics.median(1 - p[0]["backend_seconds"] / p[0]["step_seconds"] for p in pairs)
        theirs = statistics.median(p[1] for p in pairs)
        # The bare run: the same step graph (training graph + optimizer) that `train` runs,
        # fed the same batch, state and scalars, by ONNX Runtime's Python API.
        run_dir = os.path.join(d, "run0")
        sess = ort.InferenceSession(os.path.join(run_dir, "step.onnx"), opts, providers=["CPUExecutionProvider"])
        ck = np.load(os.path.join(run_dir, "checkpoint.npz"))
        full = {}
        for i in sess.get_inputs():
            key = i.name.removeprefix("dagr/opt/")
            if i.name in feed:
                full[i.name] = feed[i.name]
            elif i.name == "dagr/opt/lr":
                full[i.name] = np.array(0.002, dtype=np.float32)
            else:
                full[i.name] = next(ck[k] for k in (f"param/{i.name}", f"bn/{i.name}", key) if k in ck.files)
        bare = median_time(lambda: sess.run(None, full), a.reps)
        step = b / ours
        print(f"  train throughput   ours {ours:8.0f} samples/s   PyTorch {theirs:8.0f} samples/s   ratio {ours / theirs:5.2f}")
        print(f"  runner overhead    step {step * 1e3:8.2f} ms   bare session run {bare * 1e3:8.2f} ms   overhead {100 * (step - bare) / step:5.1f}%")
        print(f"                     measured inside `train` (time outside the backend run): {100 * inside:5.2f}%")


if __name__ == "__main__":
    main()
