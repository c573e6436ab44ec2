"""PaddlePaddle through paddle2onnx: the two-encoder model (NCHW / NCL layouts, as Paddle's
layers take them), with Paddle's own gradients as the reference.

    /path/to/venv/bin/python models/frameworks/export_paddle.py

Pinned: paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx==1.17.0 (requirements-paddle.txt). Writes
paddle.p2o.onnx (`paddle.onnx.export`: paddle2onnx, then Polygraphy's constant folding;
paddle2onnx 2.1 writes the weights as initializers either way, where older versions wrote
Constant nodes),
paddle.ref.npz and their index.json entries.
"""

import os
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


class AudioEncoder(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1D(C.AUDIO[1], 8, 3)
        self.fc = nn.Linear(8, C.D)
        self.norm = nn.LayerNorm(C.D, epsilon=1e-6)

    def forward(self, x):  # [B, C, T]
        return self.norm(F.gelu(self.fc(F.relu(self.conv(x)).mean(axis=2))))


class VisualEncoder(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(C.VISUAL[2], 8, 3)
        self.fc = nn.Linear(8, C.D)

    def forward(self, x):  # [B, C, H, W]
        return paddle.tanh(self.fc(F.relu(self.conv(x)).mean(axis=[2, 3])))


class Av(nn.Layer):
    def __init__(self):
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.visual_encoder = VisualEncoder()
        self.logits = nn.Linear(2 * C.D, C.CLASSES)
        self.logits_audio = nn.Linear(C.D, C.CLASSES)
        self.logits_visual = nn.Linear(C.D, C.CLASSES)

    def encode(self, a, v):
        return self.audio_encoder(a), self.visual_encoder(v)

    def forward(self, a, v):
        za, zv = self.encode(a, v)
        return self.logits(paddle.concat([za, zv], axis=1)), self.logits_audio(za), self.logits_visual(zv)


def dagr(zs):
    us = [z / paddle.clip(paddle.linalg.norm(z, axis=1, keepdim=True), min=1e-12) for z in zs]
    i, j = C.pairs(us[0].shape[0])
    i, j = paddle.to_tensor(i), paddle.to_tensor(j)
    disp = []
    for u in us:
        d2 = ((paddle.gather(u, i) - paddle.gather(u, j)) ** 2).sum(1)
        disp.append(paddle.logsumexp(-d2 / C.TAU) - np.log(float(i.shape[0])))
    d = paddle.sqrt(((us[0] - us[1]) ** 2).sum(1) + 1e-12)
    return C.LAMBDA_DISP * paddle.stack(disp).mean() + C.LAMBDA_ANC * F.relu(d - C.DELTA).mean()


def main():
    d = C.data(nchw=True)
    paddle.seed(0)
    m = Av()
    values = C.random_weights({k: tuple(p.shape) for k, p in m.named_parameters()})
    m.set_state_dict({k: paddle.to_tensor(v) for k, v in values.items()})
    # The reference in float64.
    paddle.set_default_dtype("float64")
    m64 = Av()
    m64.set_state_dict({k: paddle.to_tensor(v.astype(np.float64)) for k, v in values.items()})
    a = paddle.to_tensor(d["in/audio"].astype(np.float64))
    v = paddle.to_tensor(d["in/visual"].astype(np.float64))
    y = paddle.to_tensor(d["y"])
    za, zv = m64.encode(a, v)
    za, zv = za.detach(), zv.detach()
    za.stop_gradient = zv.stop_gradient = False
    loss = dagr([za, zv])
    ga, gv = paddle.grad(loss, [za, zv])
    ref = {"dagr/loss": loss.numpy(), "dagr/grad/audio": ga.numpy(), "dagr/grad/visual": gv.numpy(),
           "enc/audio": za.numpy(), "enc/visual": zv.numpy()}
    total = sum(F.cross_entropy(l, y) for l in m64(a, v)) + dagr(list(m64.encode(a, v)))
    total.backward()
    ref["total_loss"] = total.numpy()
    for k, p in m64.named_parameters():
        ref[f"grad/{k}"] = p.grad.numpy()
    paddle.set_default_dtype("float32")
    ref.update(d)
    path = os.path.join(C.HERE, "paddle.p2o")
    spec = [paddle.static.InputSpec([None, C.AUDIO[1], C.AUDIO[0]], "float32", "audio"),
            paddle.static.InputSpec([None, C.VISUAL[2], C.VISUAL[0], C.VISUAL[1]], "float32", "visual")]
    m.eval()
    paddle.onnx.export(m, path, input_spec=spec, opset_version=17)
    exports = {"p2o": path + ".onnx"}
    C.write("paddle", ref, {k: (p, C.param_map(p, values)) for k, p in exports.items()}, ["audio", "visual"])
    for p in exports.values():
        print("wrote", p)


if __name__ == "__main__":
    main()
