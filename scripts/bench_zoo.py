"""Benchmark: training graphs of the zoo's real architectures on ONNX Runtime CPU against PyTorch
eager forward + backward, same weights, batch, cross-entropy and DAGR, same thread count, side by
side (issue 13's performance check).

    cargo build --release
    python scripts/bench_zoo.py [--threads N] [--batch 32]   # needs torch (scripts/requirements-bench.txt)

For each model (ResNet-18 layout + bidirectional GRU, ViT + CLIP text; the legacy exports with a
dynamic batch), prints the time of one forward + backward of `dagr-inject MODEL --train` (every
parameter gradient fetched) against PyTorch's `loss.backward()`, their ratio (target <= 1.0), and
the training graph's node count against the forward model's.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "dagr-inject")
sys.path.insert(0, os.path.join(ROOT, "models", "zoo"))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export as zoo  # noqa: E402
from generate import DEFAULT_CFG, dagr  # noqa: E402
from timing import median_times  # noqa: E402

MODELS = {"resnet_gru": "audio_encoder,visual_encoder", "vit_clip": "image_encoder,text_encoder"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    print(f"threads {args.threads}, batch {args.batch}")
    for name, encoders in MODELS.items():
        src = os.path.join(ROOT, "models", "zoo", f"{name}.legacy.onnx")
        train = os.path.join(tmp, f"{name}.train.onnx")
        subprocess.run(
            [BIN, src, "--encoders", encoders, "--train", "--logits", "logits", "--labels", "y", "-o", train],
            check=True,
            capture_output=True,
        )
        spec, in_names, make = zoo.ZOO[name]
        model = zoo.build(name)
        g = torch.Generator().manual_seed(5)
        inputs = make(g, args.batch)
        y = torch.randint(0, zoo.CLASSES, (args.batch,), generator=g)

        # Ours: the training graph, parameters fed, every gradient fetched.
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(train, so, providers=["CPUExecutionProvider"])
        m = onnx.load(train, load_external_data=False)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        feed = {n: a.numpy() for n, a in zip(in_names, inputs)}
        feed["y"] = y.numpy()
        for i in sess.get_inputs():
            if i.name not in feed and i.name in inits:
                feed[i.name] = inits[i.name]
        missing = [i.name for i in sess.get_inputs() if i.name not in feed]
        assert not missing, f"{name}: inputs not fed: {missing}"
        grads = [o.name for o in sess.get_outputs() if o.name.endswith("_grad")]

        def ours():
            sess.run(grads, feed)

        def theirs():
            model.zero_grad()
            zs = model.encode(*inputs)
            logits = model.head(torch.cat(zs, dim=1))
            loss = F.cross_entropy(logits, y) + dagr(zs, DEFAULT_CFG)[0]
            loss.backward()

        t_ours, t_theirs = median_times([ours, theirs], reps=30)
        fwd = len(onnx.load(src, load_external_data=False).graph.node)
        print(
            f"{name:<12} forward+backward ours {t_ours * 1e3:7.2f} ms, PyTorch {t_theirs * 1e3:7.2f} ms, "
            f"ratio {t_ours / t_theirs:.2f}; nodes {len(m.graph.node)} (forward {fwd}, x{len(m.graph.node) / fwd:.1f}); "
            f"{len(grads)} gradients"
        )


if __name__ == "__main__":
    main()
