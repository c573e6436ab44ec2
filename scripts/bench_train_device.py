"""Training throughput of `dagr-inject train` against a PyTorch training loop doing the same
work (CNN model, DAGR + cross-entropy over three heads, SGD with momentum, B = 64), on the CPU
or on CUDA. Needs only PyTorch and numpy (what the lent GPU machine has), plus the release
binary and, for CUDA, ONNX Runtime's CUDA build in ORT_DYLIB_PATH (see scripts/gpu_run.sh).

    python scripts/bench_train_device.py --device cuda [--out DIR]

Prints samples/s of both and the ratio (target >= 1.0), and writes DIR/bench_device.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
import cnn_task  # noqa: E402
import export  # noqa: E402
from generate import DEFAULT_CFG as CFG, dagr  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "dagr-inject"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    b, n = a.batch, a.batch * a.batches
    res = {"device": a.device, "batch": b, "samples": n}
    with tempfile.TemporaryDirectory() as d:
        data, dpath, graph = cnn_task.write_task(a.bin, d, n)
        out = os.path.join(d, "run")
        r = subprocess.run([a.bin, "train", graph, "--data", dpath, "--epochs", "2", "--batch-size", str(b),
                            "--lr", "0.002", "--momentum", "0.9", "--backend", "ort", "--device", a.device,
                            "--no-shuffle", "--out", out], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"dagr-inject train failed on {a.device}:\n{r.stderr}")
        logs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
        res["ours_samples_per_second"] = logs[-1]["samples_per_second"]  # second epoch: warm
        # The runner's own share of a step: time outside the backend's run.
        res["ours_runner_share"] = 1 - logs[-1]["backend_seconds"] / logs[-1]["step_seconds"]
    dev = torch.device(a.device)
    model, _ = export.build("av_cnn")
    model.to(dev).train()
    captured = {}
    for e in ("audio_encoder", "visual_encoder"):
        getattr(model, e).register_forward_hook(lambda m, i, o, e=e: captured.__setitem__(e, o))
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}

    def epoch():
        for s in range(0, n, b):
            sl = slice(s, s + b)
            outs = model(tensors["audio"][sl].to(dev), tensors["visual"][sl].to(dev))
            y = tensors["label"][sl].to(dev)
            loss = sum(F.cross_entropy(o, y) for o in outs)
            loss = loss + dagr([captured["audio_encoder"], captured["visual_encoder"]], CFG)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        if a.device == "cuda":
            torch.cuda.synchronize()

    epoch()  # warm-up, as our first epoch
    t = time.perf_counter()
    epoch()
    res["pytorch_samples_per_second"] = n / (time.perf_counter() - t)
    res["ratio"] = res["ours_samples_per_second"] / res["pytorch_samples_per_second"]
    print(json.dumps(res, indent=1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_device.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
