"""Benchmark: data-parallel `train --distributed` under `mpirun -np 2` against one process on
the same data, the same global batch and the same cores, side by side.

    cargo build --release
    python scripts/bench_distributed.py [--size 10] [--batch 64] [--steps 8]

needs torch, onnx (scripts/requirements-bench.txt) to build the model, and Open MPI
(scripts/setup.sh installs it). It builds bench_scale.py's two-tower MLP of `--size` million
parameters, its training graph, and runs 2 epochs of `steps / 2` steps (AdamW, ONNX Runtime):

  * one process, all the machine's cores as intra-op threads (`--threads cores`);
  * one process with `--grad-accum 2` (the same arithmetic as two processes: two micro-batches
    per step, their gradients summed);
  * `mpirun -np 2 ... --distributed`, each process half the cores.

and prints, from each run's last (warm) epoch in log.jsonl, samples per second, the ratios
against one process, and for the two processes the share of a step spent in the collectives
(`collective_seconds / step_seconds`: summing gradients and loss terms, and waiting).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_scale  # noqa: E402

BIN = bench_scale.BIN
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def last_epoch(out):
    return bench_scale.epoch_logs(out)[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    import numpy as np
    torch = bench_scale._torch()
    torch.manual_seed(0)
    cores = os.cpu_count()
    shp = bench_scale.shape_for(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_scale.Towers(**shp)
        n = sum(p.numel() for p in model.parameters())
        rows = args.batch * (args.steps // 2)
        a, v = torch.randn(rows, shp["d_in"]), torch.randn(rows, shp["d_in"])
        y = torch.randint(0, shp["classes"], (rows,))
        data = os.path.join(tmp, "data.npz")
        np.savez(data, audio=a.numpy(), visual=v.numpy(), y=y.numpy())
        src = os.path.join(tmp, "model.onnx")
        bench_scale.export(model, a, v, src)
        train = os.path.join(tmp, "model.train.onnx")
        subprocess.run([BIN, src, "--encoders", "audio_encoder,visual_encoder", "--logits", "logits",
                        "--labels", "y", "--train", "-o", train], check=True, capture_output=True)

        def run(name, threads, extra, launcher=()):
            out = os.path.join(tmp, name)
            cmd = [*launcher, BIN, "train", train, "--data", data, "--epochs", "2", "--batch-size",
                   str(args.batch), "--optimizer", "adamw", "--lr", "1e-4", "--backend", "ort", "--threads",
                   str(threads), "--no-shuffle", "--out", out, *extra]
            p = subprocess.run(cmd, capture_output=True, text=True, env=MPI_ENV)
            if p.returncode != 0:
                raise SystemExit(f"{name} failed: {p.stderr[-2000:]}")
            return last_epoch(out)

        one = run("one", cores, [])
        accum = run("accum", cores, ["--grad-accum", "2"])
        two = run("two", max(cores // 2, 1), ["--distributed"], ("mpirun", "-np", "2", "--oversubscribe"))
        print(f"machine: {cores} cores; {n / 1e6:.0f}M parameters; global batch {args.batch}; "
              f"{args.steps // 2} steps per epoch, the second epoch measured")
        for name, r in [("one process", one), ("one process, --grad-accum 2", accum), ("mpirun -np 2", two)]:
            line = (f"  {name:28} {r['samples_per_second']:9.1f} samples/s "
                    f"({r['samples_per_second'] / one['samples_per_second']:.2f}x one process)")
            if r.get("collective_seconds") is not None:
                line += (f"; collectives {r['collective_seconds']:.3f} s of {r['step_seconds']:.3f} s "
                         f"of steps ({r['collective_seconds'] / r['step_seconds']:.0%})")
            print(line)


if __name__ == "__main__":
    main()
