"""PaddlePaddle models a user brings, through paddle2onnx: `paddle.vision.models` CNNs with seeded
perturbed weights (nothing downloaded) and encoders made of Paddle's LSTM, GRU and
TransformerEncoder. Each is made a two-tower model (two copies of the encoder giving 32 values
each, a `logits` head on their concatenation; inputs `visual` and `depth`), exported with
`paddle.onnx.export` at opset 17 (dynamic batch, or static with `--static`) and given to
`dagr-inject MODEL --encoders visual,depth --train` (paddle2onnx records no module names: the
encoders are found by input); then every ONNX tensor holding a Paddle parameter has its gradient
compared with Paddle's autograd in float64 of the same loss (cross-entropy + DAGR, default
configuration), and tract with ONNX Runtime (`real_model_check.py` says how).

    cargo build --release
    python scripts/check_real_models_paddle.py [--static] [NAME ...]   # models/frameworks/requirements-paddle.txt
"""

import os
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import paddle.vision.models as pm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models", "frameworks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import real_model_check as R  # noqa: E402
from export_paddle import dagr  # noqa: E402

B, TOKENS, VOCAB, CLASSES = 4, 12, 100, 10


class Sequence(nn.Layer):
    """A recurrent or attention encoder over [B, T, 8] (or token ids), 32 values out."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.rnn = nn.LSTM(8, 24)
        elif kind == "gru":
            self.rnn = nn.GRU(8, 24)
        elif kind == "bilstm":
            self.rnn = nn.LSTM(8, 12, direction="bidirect")
        else:
            self.embed = nn.Embedding(VOCAB, 32)
            self.pos = self.create_parameter([1, TOKENS, 32])
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0)
            self.rnn = nn.TransformerEncoder(layer, 2)
        self.proj = nn.Linear(24 if kind != "transformer" else 32, 32)

    def forward(self, x):
        if self.kind == "transformer":
            return self.proj(self.rnn(self.embed(x) + self.pos).mean(axis=1))
        out, _ = self.rnn(x)
        return self.proj(out[:, -1])


def vision(make):
    return make, ("image", (3, 64, 64))


MODELS = {
    "resnet18": vision(lambda: pm.resnet18(num_classes=32)),
    "resnet50": vision(lambda: pm.resnet50(num_classes=32)),
    "mobilenet_v1": vision(lambda: pm.mobilenet_v1(scale=0.25, num_classes=32)),
    "mobilenet_v2": vision(lambda: pm.mobilenet_v2(scale=0.35, num_classes=32)),
    "mobilenet_v3_small": vision(lambda: pm.mobilenet_v3_small(num_classes=32)),
    "shufflenet_v2": vision(lambda: pm.shufflenet_v2_x0_25(num_classes=32)),
    "squeezenet1_1": vision(lambda: pm.squeezenet1_1(num_classes=32)),
    "densenet121": vision(lambda: pm.densenet121(num_classes=32)),
    "googlenet": (lambda: GoogLeNetMain(), ("image", (3, 192, 192))),  # its auxiliary heads want 3x3 maps
    "lstm": (lambda: Sequence("lstm"), ("audio", (16, 8))),
    "gru": (lambda: Sequence("gru"), ("audio", (16, 8))),
    "bilstm": (lambda: Sequence("bilstm"), ("audio", (16, 8))),
    "transformer": (lambda: Sequence("transformer"), ("text", (TOKENS,))),
}


class GoogLeNetMain(nn.Layer):
    """Paddle's GoogLeNet returns its main and two auxiliary outputs: the main one."""

    def __init__(self):
        super().__init__()
        self.m = pm.googlenet(num_classes=32)

    def forward(self, x):
        return self.m(x)[0]


class Pair(nn.Layer):
    def __init__(self, make):
        super().__init__()
        self.visual_encoder = make()
        self.depth_encoder = make()
        self.head = nn.Linear(64, CLASSES)

    def encode(self, a, b):
        return [self.visual_encoder(a), self.depth_encoder(b)]

    def forward(self, a, b):
        return self.head(paddle.concat(self.encode(a, b), axis=1))


def perturbed(model, seed=0):
    """Paddle's initial values moved a little so that no two parameters are equal (they map to
    ONNX tensors by value); BatchNorm variances stay positive."""
    g = np.random.default_rng(seed)
    out, by_tensor = {}, {}
    for k, t in model.state_dict().items():
        # An RNN's state lists each weight twice (`rnn.weight_ih_l0`, `rnn.0.cell.weight_ih`):
        # one tensor, one value.
        if t.name in by_tensor:
            out[k] = by_tensor[t.name]
            continue
        out[k] = R.perturb(t.numpy(), g, variance=k.endswith("_variance"))
        by_tensor[t.name] = out[k]
    return out


def load(model, values):
    """Set the state; Paddle's RNN layers keep a flattened copy of their weights, which they
    rebuild only when asked."""
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in values.items()})
    for layer in model.sublayers():
        if hasattr(layer, "flatten_parameters"):
            layer.flatten_parameters()


def check(name, make, kind, shape, args, tmp):
    paddle.seed(0)
    m = Pair(make)
    values = perturbed(m)
    load(m, values)
    m.eval()
    g = np.random.default_rng(5)
    if kind == "text":
        inputs = [g.integers(0, VOCAB, (B, *shape)).astype(np.int64) for _ in range(2)]
    else:
        inputs = [g.standard_normal((B, *shape)).astype(np.float32) for _ in range(2)]
    y = g.integers(0, CLASSES, (B,)).astype(np.int64)

    prefix = os.path.join(tmp, name)
    dt = "int64" if kind == "text" else "float32"
    spec = [paddle.static.InputSpec([B if args.static else None, *shape], dt, n) for n in ("visual", "depth")]
    paddle.onnx.export(m, prefix, input_spec=spec, opset_version=args.opset)
    src = prefix + ".onnx"
    train = prefix + ".train.onnx"
    import onnx

    graph = onnx.load(src).graph
    try:
        R.build_training_graph(src, train, ["visual", "depth"], graph.output[0].name)
    except R.Refused as e:
        return str(e)
    feed = {i.name: x for i, x in zip(graph.input, inputs)}
    feed["y"] = y
    ours, nodes = R.ort_gradients(train, feed)

    # The reference in float64, eval mode (BatchNorm with its running statistics).
    paddle.set_default_dtype("float64")
    try:
        paddle.seed(0)
        m64 = Pair(make)
        if any(p.dtype != paddle.float64 for p in m64.parameters()):
            m64.to(dtype="float64")  # DenseNet makes its BatchNorm parameters float32 whatever the default
        load(m64, {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in values.items()})
        # Paddle's fused RNN keeps what its backward needs only in train mode; the sequence
        # encoders have no BatchNorm or dropout, so their function is the same.
        m64.eval() if kind == "image" else m64.train()
        xs = [paddle.to_tensor(x.astype(np.float64) if kind != "text" else x) for x in inputs]
        zs = m64.encode(*xs)
        logits = m64.head(paddle.concat(zs, axis=1))
        loss = F.cross_entropy(logits, paddle.to_tensor(y)) + dagr(zs)
        loss.backward()
        params = dict(m64.named_parameters())
        grads = {k: (None if p.grad is None else p.grad.numpy()) for k, p in params.items()}
        logits64 = logits.numpy()
    finally:
        paddle.set_default_dtype("float32")
    forward, note = R.forward_difference(src, inputs, logits64)
    weights = {k: values[k] for k in grads}
    line = R.compare_with_framework(src, train, feed, ours, weights, grads, tmp, name, "Paddle autograd")
    flow = R.verify_and_train(src, train, feed, B, tmp)
    return f"export's logits vs Paddle float64 {forward:.1e}{note}; {nodes} nodes, {line}; {flow}"


if __name__ == "__main__":
    R.sweep(MODELS, check, "paddle2onnx")
