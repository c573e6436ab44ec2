"""Benchmark: memory and start-up of training at scale, `dagr-inject train` against a PyTorch
loop doing the same work (same model, weights, batch, optimizer, threads), side by side.

    cargo build --release
    python scripts/bench_scale.py [--sizes 10,138] [--steps 4] [--batch 32] [--device cuda]

needs torch, onnx, onnxruntime (scripts/requirements-bench.txt). For each size (millions of
parameters) it builds a two-tower MLP (audio and visual towers of equal width, a fused head),
exports it (legacy exporter, training mode, weights as external data), builds the training
graph with `dagr-inject --train`, and for SGD with momentum and for AdamW runs 2 epochs of
`steps / 2` steps each:

  * `dagr-inject train --backend ort` (or `--backend tract`; checkpoint and export every epoch,
    as always),
  * a PyTorch loop (`torch.optim`, cross-entropy + DAGR, a checkpoint and a saved model per
    epoch, as `train` writes them),

each in its own process, and prints their peak RSS (getrusage of the child: what
`/usr/bin/time -v` reports as maximum resident set size), the time to the first step (ours:
`first_step_seconds` of the log, from the start of the run to the end of step 1: loading,
building the step graph, session creation, filling the state, one step; PyTorch: process start,
imports included, to the end of step 1), the mean time of the later steps, and the ratios ours /
PyTorch. Also `inject` writing the training graph to another directory against `cp` of the same
bytes, and against `cp` followed by fsync (inject makes every file it writes durable).
"""

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DAGR_INJECT_BIN: another build to measure (an A/B of two commits on one machine).
BIN = os.environ.get("DAGR_INJECT_BIN") or os.path.join(ROOT, "target", "release", "dagr-inject")

TORCH_LOOP = r'''
import json, math, os, sys, time
t0 = time.perf_counter()
import numpy as np, torch, torch.nn.functional as F
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
dev = torch.device(cfg["device"])
sys.path.insert(0, cfg["here"])
from bench_scale import Towers, dagr
model = Towers(cfg["d_in"], cfg["width"], cfg["depth"], cfg["d"], cfg["classes"])
model.load_state_dict(torch.load(cfg["weights"]))
model.to(dev)
data = np.load(cfg["data"])
a, v, y = (torch.from_numpy(data[k]) for k in ("audio", "visual", "y"))
if cfg["optimizer"] == "sgd":
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
times, first, steps_total = [], None, 0.0
per_epoch = cfg["steps"] // 2
for epoch in range(2):
    for s in range(per_epoch):
        t = time.perf_counter()
        b = slice(s * cfg["batch"], (s + 1) * cfg["batch"])
        za, zv = model.encode(a[b].to(dev), v[b].to(dev))
        loss = F.cross_entropy(model.head(torch.cat([za, zv], 1)), y[b].to(dev)) + dagr([za, zv])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps_total += now - t
        if first is None:
            first = now - t0
        else:
            times.append(now - t)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(cfg["out"], "ckpt.pt"))
    torch.save(model.state_dict(), os.path.join(cfg["out"], "model.pt"))
print(json.dumps({"first_step": first, "step": sum(times) / max(len(times), 1), "steps_total": steps_total,
                  "max_memory_allocated": torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0,
                  "max_memory_reserved": torch.cuda.max_memory_reserved() if dev.type == "cuda" else 0}))
'''


def _torch():
    import torch
    return torch


def Towers(d_in, width, depth, d, classes):  # noqa: N802 (a module factory)
    """Two MLP towers (`audio_encoder`, `visual_encoder`) of `depth` Linear+ReLU layers of
    `width`, to `d`; a head on their concatenation."""
    torch = _torch()
    nn = torch.nn

    def tower():
        layers = [nn.Linear(d_in, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, d))
        return nn.Sequential(*layers)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_encoder = tower()
            self.visual_encoder = tower()
            self.head = nn.Linear(2 * d, classes)

        def encode(self, a, v):
            return self.audio_encoder(a), self.visual_encoder(v)

        def forward(self, a, v):
            za, zv = self.encode(a, v)
            return self.head(torch.cat([za, zv], 1))

    return M()


def dagr(zs, tau=0.5, delta=0.5, lambda_disp=0.1, lambda_anc=0.1):
    """DAGR, default configuration (dagr-spec.md), for the PyTorch side."""
    torch = _torch()
    F = torch.nn.functional
    us = [F.normalize(z, dim=1, eps=1e-12) for z in zs]
    b = us[0].shape[0]
    i, j = torch.triu_indices(b, b, offset=1)
    disp = [torch.logsumexp(-((u[i] - u[j]) ** 2).sum(1) / tau, 0) - torch.log(torch.tensor(float(len(i))))
            for u in us]
    d = torch.sqrt(((us[0] - us[1]) ** 2).sum(1) + 1e-12)
    return lambda_disp * torch.stack(disp).mean() + lambda_anc * torch.relu(d - delta).mean()


def shape_for(millions, d_in=256, d=256, depth=4):
    """The tower width that gives about `millions` M parameters."""
    # 2 towers x (d_in*w + (depth-1)*w*w + w*d): solve (depth-1) w^2 + (d_in + d) w = P / 2.
    p = millions * 1e6 / 2
    a, b = depth - 1, d_in + d
    w = int((-b + (b * b + 4 * a * p) ** 0.5) / (2 * a))
    return dict(d_in=d_in, width=w, depth=depth, d=d, classes=10)


def export(model, a, v, path):
    """Export `model` (legacy exporter, training mode, a dynamic batch) to `path`, its weights
    as external data in `model.onnx.data` beside it."""
    import onnx
    torch = _torch()
    torch.onnx.export(model, (a[:2], v[:2]), path, dynamo=False, input_names=["audio", "visual"],
                      output_names=["logits"], dynamic_axes={"audio": {0: "batch"}, "visual": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    onnx.save(onnx.load(path), path, save_as_external_data=True, location="model.onnx.data")


class GpuPeak:
    """The GPU's peak used memory (NVML, sampled every 10 ms) above what was used when sampling
    began, in MB: what a process run meanwhile held on the device (its CUDA context, arena and
    allocations), whatever allocator it used."""

    def __enter__(self):
        import threading
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
        self.base = self._used()
        self.peak = self.base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._used())
                self._stop.wait(0.01)

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.mb = (self.peak - self.base) / 1e6


def measured(cmd, env=None):
    """Run `cmd` in a child of a fresh Python process; (its stdout, peak RSS in MB, wall s)."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "w = time.perf_counter() - t; "
               "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:], "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'wall': w}))")
    r = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                                  env=env, check=True).stdout)
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {r['err']}")
    return r["out"], r["rss"], r["wall"]


def epoch_logs(out_dir):
    """`train`'s log.jsonl: per epoch, the wall time of its steps (`step_seconds`) and the part
    of it inside the backend (`backend_seconds`)."""
    return [json.loads(x) for x in open(os.path.join(out_dir, "log.jsonl"))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,138")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="train on the CPU or on CUDA (then device memory is reported too: ours and "
                         "PyTorch's, as NVML sees the process, and torch.cuda.max_memory_allocated)")
    ap.add_argument("--optimizers", default="sgd,adamw",
                    help="which optimizers to run, of sgd (with momentum) and adamw")
    ap.add_argument("--state-update", default="auto", choices=["auto", "two-sets", "in-place"],
                    help="how `train` keeps the state (its --state-update)")
    ap.add_argument("--backend", default="ort", choices=["ort", "tract"],
                    help="the backend `train` runs on (tract: on the CPU)")
    args = ap.parse_args()
    import numpy as np
    torch = _torch()
    torch.manual_seed(0)
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"machine: {os.cpu_count()} cores, device {args.device}; threads {args.threads}; batch {args.batch}; "
          f"{args.steps} steps in 2 epochs; --backend {args.backend} --state-update {args.state_update}")
    for size in [float(s) for s in args.sizes.split(",")]:
        shp = shape_for(size)
        with tempfile.TemporaryDirectory() as tmp:
            model = Towers(**shp)
            n = sum(p.numel() for p in model.parameters())
            weights = os.path.join(tmp, "weights.pt")
            torch.save(model.state_dict(), weights)
            a = torch.randn(args.batch * (args.steps // 2), shp["d_in"])
            v = torch.randn(args.batch * (args.steps // 2), shp["d_in"])
            y = torch.randint(0, shp["classes"], (args.batch * (args.steps // 2),))
            data = os.path.join(tmp, "data.npz")
            np.savez(data, audio=a.numpy(), visual=v.numpy(), y=y.numpy())
            src = os.path.join(tmp, "model.onnx")
            export(model, a, v, src)
            # The runs below are separate processes: this one lets go of the model, so that at
            # the largest sizes its copy does not take memory from theirs.
            del model
            gc.collect()
            graph_dir = os.path.join(tmp, "graph")
            os.makedirs(graph_dir)
            train = os.path.join(graph_dir, "model.train.onnx")
            _, inj_rss, inj_wall = measured([BIN, src, "--encoders", "audio_encoder,visual_encoder", "--logits",
                                             "logits", "--labels", "y", "--train", "-o", train])
            t = time.perf_counter()
            shutil.copyfile(os.path.join(tmp, "model.onnx.data"), os.path.join(tmp, "copy.data"))
            cp_wall = time.perf_counter() - t
            # The same copy made durable, as `inject` makes every file it writes (fsync).
            t = time.perf_counter()
            shutil.copyfile(os.path.join(tmp, "model.onnx.data"), os.path.join(tmp, "copy2.data"))
            fd = os.open(os.path.join(tmp, "copy2.data"), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            cp_sync_wall = time.perf_counter() - t
            # Every run below writes checkpoints and models of the model's size: the copies go,
            # and so does each run's directory once measured (at 1B parameters and AdamW the
            # runs together would need over 70 GB of disk).
            os.remove(os.path.join(tmp, "copy.data"))
            os.remove(os.path.join(tmp, "copy2.data"))
            print(f"\n{n / 1e6:.0f}M parameters ({n * 4 / 1e6:.0f} MB float32): width {shp['width']}, "
                  f"depth {shp['depth']}")
            print(f"  inject --train to another directory: {inj_wall:.2f} s (peak RSS {inj_rss:.0f} MB); "
                  f"cp of the weights: {cp_wall:.2f} s ({inj_wall / cp_wall:.2f}x), "
                  f"cp + fsync: {cp_sync_wall:.2f} s ({inj_wall / cp_sync_wall:.2f}x)")
            for opt in args.optimizers.split(","):
                out = os.path.join(tmp, f"run_{opt}")
                flags = ["--optimizer", opt] + (["--momentum", "0.9", "--lr", "0.01"] if opt == "sgd" else
                                                ["--lr", "1e-4"])
                cuda = args.device == "cuda"
                with (GpuPeak() if cuda else contextlib.nullcontext()) as ours_gpu:
                    _, ours_rss, ours_wall = measured(
                        [BIN, "train", train, "--data", data, "--epochs", "2", "--batch-size", str(args.batch),
                         "--backend", args.backend, "--threads", str(args.threads), "--original", src, "--out", out,
                         "--no-shuffle", "--state-update", args.state_update, "--device", args.device, *flags])
                logs = epoch_logs(out)
                # Per epoch: the wall time of its steps and the part inside the backend; the
                # last epoch's steps are warm, as PyTorch's steps after its first.
                ours_step = logs[-1]["backend_seconds"] / (args.steps // 2)
                ours_first = logs[0]["first_step_seconds"]
                ours_steps_total = sum(x["step_seconds"] for x in logs)
                tdir = os.path.join(tmp, f"torch_{opt}")
                os.makedirs(tdir)
                cfg = dict(shp, threads=args.threads, here=here, weights=weights, data=data, optimizer=opt,
                           steps=args.steps, batch=args.batch, out=tdir, device=args.device)
                with (GpuPeak() if cuda else contextlib.nullcontext()) as torch_gpu:
                    tout, torch_rss, torch_wall = measured([sys.executable, "-c", TORCH_LOOP, json.dumps(cfg)])
                tr = json.loads(tout.strip().splitlines()[-1])
                if cuda:
                    alloc = tr["max_memory_allocated"] / 1e6
                    print(f"  {opt:5}  device memory (NVML, the whole process): ours {ours_gpu.mb:6.0f} MB, "
                          f"PyTorch {torch_gpu.mb:6.0f} MB, {ours_gpu.mb / torch_gpu.mb:.2f}x | against "
                          f"torch.cuda.max_memory_allocated {alloc:6.0f} MB (reserved "
                          f"{tr['max_memory_reserved'] / 1e6:.0f} MB): {ours_gpu.mb / alloc:.2f}x")
                around_ours = ours_wall - ours_steps_total
                around_torch = torch_wall - tr["steps_total"]
                shutil.rmtree(out)
                shutil.rmtree(tdir)
                print(f"  {opt:5}  peak RSS: ours {ours_rss:6.0f} MB, PyTorch {torch_rss:6.0f} MB, "
                      f"{ours_rss / torch_rss:.2f}x | time to first step: {ours_first:6.2f} s, "
                      f"{tr['first_step']:6.2f} s, {ours_first / tr['first_step']:.2f}x | "
                      f"whole run: {ours_wall:6.2f} s, {torch_wall:6.2f} s, "
                      f"{ours_wall / torch_wall:.2f}x | around the steps (start-up, checkpoints, export): "
                      f"{around_ours:6.2f} s, {around_torch:6.2f} s, {around_ours / around_torch:.2f}x | "
                      f"one step: {ours_step:.3f} s in the backend, PyTorch {tr['step']:.3f} s, "
                      f"{ours_step / tr['step']:.2f}x")


if __name__ == "__main__":
    main()
