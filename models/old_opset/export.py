"""One two-tower model exported by PyTorch's legacy exporter at the opsets older exports use
(9 to 15), and its PyTorch autograd reference (the test `old_opsets_train_as_pytorch_computes_it`
in tests/it/train_graphs.rs).

    python models/old_opset/export.py   # needs torch, onnx (scripts/requirements-bench.txt)

The towers use what changed form before opset 13, which dagr-inject reads as opset 13
(`dagr_ops::upgrade`): Slice with attributes (opset 9), Squeeze, Unsqueeze, ReduceSum and Split
with attribute axes or sizes, Pad and Clip with attributes, TopK's `k`, Softmax's flattening
axis, Upsample (opset 9) and Resize-10, BatchNormalization in training mode (five outputs).
`audio_encoder`: Conv1d, BatchNorm1d, ReLU, a reflect pad, a slice, a clamp, split halves
summed, softmax over channels, top-2 values. `visual_encoder`: Conv2d, BatchNorm2d, nearest
upsampling by 2, max-pooling, sums over axes, unsqueeze/squeeze. Inputs `audio` [B, 2, 12],
`visual` [B, 3, 8, 8] and `y` (labels); output `logits`.
Writes opsetN.onnx for N in 9..15, and ref.npz: `in/<input>` and `grad/<param>`, the float64
gradient of cross-entropy(logits, y) + DAGR (default configuration, as `--logits logits --labels
y` appends them) for each torch parameter, in training mode (batch statistics).
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


class Audio(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.proj = nn.Linear(6, 8)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))          # [B, 6, 10]
        h = F.pad(h, (1, 2), mode="reflect")[:, :, 1:]  # [B, 6, 12]
        h = torch.clamp(h, -1.5, 1.5)
        a, b = torch.split(h, [5, 7], dim=2)
        h = torch.cat([a.sum(2, keepdim=True), b.sum(2, keepdim=True)], 2)  # [B, 6, 2]
        h = torch.softmax(h, 1) * h
        v = torch.topk(h, 2, dim=1).values           # [B, 2, 2]
        return self.proj(torch.cat([v.flatten(1), h.mean(1)], 1).unsqueeze(1)).squeeze(1)


class Visual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4 * 4 * 4 + 4, 8)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))          # [B, 4, 8, 8]
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # [B, 4, 16, 16]
        h = F.max_pool2d(h, 4)                       # [B, 4, 4, 4]
        s = h.sum(dim=(2, 3))                        # [B, 4]
        return self.proj(torch.cat([h.flatten(1), s.unsqueeze(2).squeeze(2)], 1))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_encoder = Audio()
        self.visual_encoder = Visual()
        self.head = nn.Linear(16, CLASSES)

    def encode(self, audio, visual):
        return [self.audio_encoder(audio), self.visual_encoder(visual)]

    def forward(self, audio, visual):
        return self.head(torch.cat(self.encode(audio, visual), 1))


def main():
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(5)
    audio, visual = torch.randn(B, 2, 12, generator=g), torch.randn(B, 3, 8, 8, generator=g)
    y = torch.tensor([1, 0, 4, 2, 3, 1])
    torch.manual_seed(11)
    model = Pair()
    names = ["audio", "visual"]
    axes = {n: {0: "batch"} for n in names + ["logits"]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for opset in range(9, 16):
        model.load_state_dict(state)
        torch.onnx.export(model, (audio, visual), os.path.join(HERE, f"opset{opset}.onnx"), dynamo=False,
                          input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=opset,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    m64 = Pair().double()
    m64.load_state_dict(state)
    m64.train()
    zs = m64.encode(audio.double(), visual.double())
    logits = m64.head(torch.cat(zs, 1))
    loss = F.cross_entropy(logits, y)
    (loss + dagr(zs, DEFAULT_CFG)[0]).backward()
    arrays = {"in/audio": audio.numpy(), "in/visual": visual.numpy(), "in/y": y.numpy()}
    arrays.update({f"grad/{n}": p.grad.numpy() for n, p in m64.named_parameters()})
    np.savez(os.path.join(HERE, "ref.npz"), **arrays)
    print("loss", float(loss), len(arrays) - 3, "gradients")


if __name__ == "__main__":
    main()
