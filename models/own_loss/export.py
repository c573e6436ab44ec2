"""Models exported with their own loss, as a user who trains in PyTorch exports them, and the
PyTorch autograd reference of that loss plus DAGR (the test `own_loss` in tests/it/zoo.rs).

    python models/own_loss/export.py   # needs torch, onnx, onnxscript (scripts/requirements-bench.txt)

Two towers (`audio_encoder`, `visual_encoder`, MLPs) and a head; inputs `audio`, `visual` and
`y`; outputs `logits` and `loss`. Each model's loss as PyTorch writes it in ONNX:
  ce        F.cross_entropy(logits, y): the legacy exporter writes SoftmaxCrossEntropyLoss with
            ignore_index -100 whatever the call says; one label is -100 (ignored).
  weighted  F.nll_loss(F.log_softmax(logits), y, weight=w, ignore_index=2): legacy fuses it into
            SoftmaxCrossEntropyLoss with class weights, dynamo writes LogSoftmax and
            NegativeLogLikelihoodLoss; labels include the ignored class 2.
Writes NAME.legacy.onnx, NAME.dynamo.onnx and NAME.ref.npz: `in/<input>` and `grad/<param>`,
the float64 gradient of loss + DAGR (default configuration) for each torch parameter.
"""

import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "fixtures"))
from generate import DEFAULT_CFG, dagr  # noqa: E402

B, CLASSES = 6, 5


class Pair(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.audio_encoder = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
        self.visual_encoder = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(16, CLASSES)
        self.register_buffer("w", torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5]))

    def encode(self, audio, visual):
        return [self.audio_encoder(audio), self.visual_encoder(visual)]

    def task(self, zs, y):
        logits = self.head(torch.cat(zs, 1))
        if self.kind == "ce":
            return logits, F.cross_entropy(logits, y)
        return logits, F.nll_loss(F.log_softmax(logits, 1), y, weight=self.w.to(logits.dtype), ignore_index=2)

    def forward(self, audio, visual, y):
        return self.task(self.encode(audio, visual), y)


def main():
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(3)
    audio, visual = torch.randn(B, 12, generator=g), torch.randn(B, 10, generator=g)
    for kind, y in [("ce", [1, -100, 4, 2, 0, 3]), ("weighted", [2, 0, 4, 2, 1, 3])]:
        y = torch.tensor(y)
        torch.manual_seed(7)
        model = Pair(kind).eval()
        args, names = (audio, visual, y), ["audio", "visual", "y"]
        axes = {n: {0: "batch"} for n in names + ["logits"]}
        torch.onnx.export(model, args, os.path.join(HERE, f"{kind}.legacy.onnx"), dynamo=False, input_names=names,
                          output_names=["logits", "loss"], dynamic_axes=axes, opset_version=17,
                          do_constant_folding=False)
        batch = torch.export.Dim("batch", min=2)
        ep = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=["logits", "loss"],
                               dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), optimize=False)
        ep.save(os.path.join(HERE, f"{kind}.dynamo.onnx"))
        m64 = Pair(kind).double()
        m64.load_state_dict(model.state_dict())
        zs = m64.encode(audio.double(), visual.double())
        _, loss = m64.task(zs, y)
        (loss + dagr(zs, DEFAULT_CFG)[0]).backward()
        arrays = {"in/audio": audio.numpy(), "in/visual": visual.numpy(), "in/y": y.numpy()}
        arrays.update({f"grad/{n}": p.grad.numpy() for n, p in m64.named_parameters()})
        np.savez(os.path.join(HERE, f"{kind}.ref.npz"), **arrays)
        print(kind, "loss", float(loss), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
