"""Benchmark: training graphs of the zoo's real architectures on ONNX Runtime CPU against PyTorch
eager forward + backward, same weights, batch, cross-entropy and DAGR, same thread count, side by
side (issue 13's performance check).

    cargo build --release
    python scripts/bench_zoo.py [--threads N] [--batch 32] [--full]   # needs torch (scripts/requirements-bench.txt)

For each model (ResNet-18 layout + bidirectional GRU, ViT + CLIP text; the legacy exports with a
dynamic batch), prints the time of one forward + backward of `dagr-inject MODEL --train` (every
parameter gradient fetched) against PyTorch's `loss.backward()`, their ratio (target <= 1.0), and
the training graph's node count against the forward model's. `--full` adds torchvision's
ResNet-18 at its real width (needs torchvision), two towers over two 64x64 images, exported
here with the legacy exporter (dynamic batch, eval mode as the zoo's).
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
    ap.add_argument("--full", action="store_true", help="also torchvision's ResNet-18 at full width, 64x64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    print(f"threads {args.threads}, batch {args.batch}")
    models = dict(MODELS)
    if args.full:
        models["resnet18_full"] = "visual_encoder,depth_encoder"
    for name, encoders in models.items():
        if name == "resnet18_full":
            model, in_names, inputs, y, src = resnet18_pair(tmp, args.batch)
        else:
            src = os.path.join(ROOT, "models", "zoo", f"{name}.legacy.onnx")
            spec, in_names, make = zoo.ZOO[name]
            model = zoo.build(name)
            g = torch.Generator().manual_seed(5)
            inputs = make(g, args.batch)
            y = torch.randint(0, zoo.CLASSES, (args.batch,), generator=g)
        train = os.path.join(tmp, f"{name}.train.onnx")
        subprocess.run(
            [BIN, src, "--encoders", encoders, "--train", "--logits", "logits", "--labels", "y", "-o", train],
            check=True,
            capture_output=True,
        )

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


def distinct_weights(model):
    """As the zoo's models: no two parameters equal (an exporter in eval mode merges equal
    initializers, which would leave fewer gradients to compute) and non-trivial BatchNorm
    statistics. Returns the model."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def resnet18_pair(tmp, batch):
    """Two torchvision ResNet-18 towers (512 features, a 64-wide projection each) over two
    64x64 images, a linear head: exported to `tmp` with the legacy exporter, eval mode."""
    import torchvision

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual_encoder = torchvision.models.resnet18(num_classes=64)
            self.depth_encoder = torchvision.models.resnet18(num_classes=64)
            self.head = torch.nn.Linear(128, zoo.CLASSES)

        def encode(self, a, b):
            return [self.visual_encoder(a), self.depth_encoder(b)]

        def forward(self, a, b):
            return self.head(torch.cat(self.encode(a, b), dim=1))

    torch.manual_seed(0)
    model = distinct_weights(Pair()).eval()
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(batch, 3, 64, 64, generator=g) for _ in range(2)]
    y = torch.randint(0, zoo.CLASSES, (batch,), generator=g)
    names = ["image", "depth"]
    src = os.path.join(tmp, "resnet18_full.onnx")
    torch.onnx.export(model, tuple(x[:2] for x in inputs), src, dynamo=False, input_names=names,
                      output_names=["logits"], dynamic_axes={k: {0: "batch"} for k in names + ["logits"]},
                      opset_version=17, do_constant_folding=False)
    return model, names, inputs, y, src


if __name__ == "__main__":
    main()
