"""Flax models a user brings, through jax2onnx: the architectures jax2onnx ships as its own
examples (the vision transformer, DINOv3 with rotary embeddings and storage tokens, the GPT whose
blocks it exports as ONNX functions) and the standard ones written with Flax's layers (ResNet-18
and a MobileNetV2 in NNX with BatchNorm, the same ResNet in Linen, a CLIP-style text transformer
over `nnx.MultiHeadAttention`, LSTM, GRU and bidirectional recurrences through `nnx.RNN`, a
wav2vec-style convolutional audio encoder with GroupNorm). Random weights (nothing downloaded),
seeded perturbations so that no two weights are equal. Each is made a two-tower model (two copies
of the encoder, a 32-wide projection each, a `logits` head on their concatenation), exported with
`jax2onnx.to_onnx` at its default opset (dynamic batch `B`, or static with `--static`), and given
to `dagr-inject MODEL --train`; then every ONNX tensor holding a Flax parameter (found by value,
up to the axis permutation jax2onnx applied) has its `<tensor>_grad` compared with `jax.grad` in
float64 of the same loss (cross-entropy + DAGR, default configuration), tract with ONNX
Runtime on the same training graph (`real_model_check.py` says how), and on each backend
`dagr-inject verify` and 3 steps of `dagr-inject train`.

    cargo build --release
    JAX_PLATFORMS=cpu python scripts/check_real_models_flax.py [--static] [NAME ...]   # models/frameworks/requirements-flax.txt
"""

import contextlib
import os
import sys

os.environ.setdefault("JAX2ONNX_ENABLE_STACKTRACE_METADATA", "1")
# The whole call stack: two towers of one class are then two calls (`Tower_1`, `Tower_2`).
os.environ.setdefault("JAX2ONNX_STACKTRACE_DETAIL", "full")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from flax import linen, nnx  # noqa: E402
from jax2onnx import to_onnx  # noqa: E402
from jax2onnx.plugins.examples.nnx import dinov3, gpt, vit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models", "frameworks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import real_model_check as R  # noqa: E402
from export_flax import ce, dagr, flat, unflat  # noqa: E402

B, TOKENS, VOCAB, CLASSES, WIDTH = 4, 12, 100, 10, 32


# ---- standard architectures written with Flax's layers -------------------------------------

class BasicBlock(nnx.Module):
    """ResNet's basic block (Flax's ImageNet example), BatchNorm in inference mode."""

    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, use_running_average=True, rngs=rngs)
        self.projects = stride != 1 or cin != cout
        if self.projects:
            self.down = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.down_bn = nnx.BatchNorm(cout, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = self.down_bn(self.down(x)) if self.projects else x
        return nnx.relu(h + skip)


class ResNet18(nnx.Module):
    def __init__(self, rngs, widths=(16, 32, 64, 128)):
        self.stem = nnx.Conv(3, widths[0], (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], use_running_average=True, rngs=rngs)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, rngs))
                cin = w
        self.blocks = nnx.List(blocks)
        self.features = cin

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        # Keywords: jax2onnx 0.17.1's patched max_pool takes no positional window.
        x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
        for b in self.blocks:
            x = b(x)
        return x.mean(axis=(1, 2))


class InvertedResidual(nnx.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3 (`feature_group_count`), project 1x1."""

    def __init__(self, cin, cout, stride, expand, rngs):
        hidden = cin * expand
        self.expand = nnx.Conv(cin, hidden, (1, 1), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(hidden, use_running_average=True, rngs=rngs)
        self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding="SAME", feature_group_count=hidden,
                                  use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(hidden, use_running_average=True, rngs=rngs)
        self.project = nnx.Conv(hidden, cout, (1, 1), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, use_running_average=True, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        h = jax.nn.relu6(self.bn0(self.expand(x)))
        h = jax.nn.relu6(self.bn1(self.depthwise(h)))
        h = self.bn2(self.project(h))
        return x + h if self.residual else h


class MobileNetV2(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 16, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
        spec = [(16, 8, 1, 1), (8, 16, 2, 4), (16, 16, 1, 4), (16, 24, 2, 4), (24, 24, 1, 4)]
        self.blocks = nnx.List([InvertedResidual(ci, co, s, e, rngs) for ci, co, s, e in spec])
        self.features = 24

    def __call__(self, x):
        x = jax.nn.relu6(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return x.mean(axis=(1, 2))


class TextTransformer(nnx.Module):
    """CLIP's text tower: token and learned position embeddings, pre-LN causal self-attention
    blocks (`nnx.MultiHeadAttention`), the feature at each sequence's highest token id."""

    def __init__(self, rngs, width=32, heads=4, layers=2):
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (TOKENS, width)))
        self.ln1 = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(layers)])
        self.attn = nnx.List([nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs) for _ in range(layers)])
        self.ln2 = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(layers)])
        self.fc1 = nnx.List([nnx.Linear(width, 4 * width, rngs=rngs) for _ in range(layers)])
        self.fc2 = nnx.List([nnx.Linear(4 * width, width, rngs=rngs) for _ in range(layers)])
        self.ln_final = nnx.LayerNorm(width, rngs=rngs)
        self.features = width

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        mask = nnx.make_causal_mask(tokens)
        for ln1, attn, ln2, fc1, fc2 in zip(self.ln1, self.attn, self.ln2, self.fc1, self.fc2):
            x = x + attn(ln1(x), mask=mask)
            x = x + fc2(jax.nn.gelu(fc1(ln2(x)), approximate=False))
        x = self.ln_final(x)
        eos = jnp.argmax(tokens, axis=-1)
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class Recurrent(nnx.Module):
    """`nnx.RNN` over a sequence of frames (lax.scan), the last step's state."""

    def __init__(self, rngs, kind, features=8, hidden=24):
        self.kind = kind
        if kind == "lstm":
            self.rnn = nnx.RNN(nnx.LSTMCell(features, hidden, rngs=rngs))
        elif kind == "gru":
            self.rnn = nnx.RNN(nnx.GRUCell(features, hidden, rngs=rngs))
        elif kind == "bilstm":
            self.rnn = nnx.Bidirectional(nnx.RNN(nnx.LSTMCell(features, hidden // 2, rngs=rngs)),
                                         nnx.RNN(nnx.LSTMCell(features, hidden // 2, rngs=rngs)))
        else:
            raise ValueError(kind)
        self.features = hidden

    def __call__(self, x):
        # The zero initial state given (left to `nnx.RNN`, it is drawn through the module's
        # random-number state, which an export's trace cannot advance).
        def zeros(width):
            return jnp.zeros((x.shape[0], width), x.dtype)
        if self.kind == "lstm":
            carry = (zeros(self.features), zeros(self.features))
        elif self.kind == "gru":
            carry = zeros(self.features)
        else:
            half = self.features // 2
            carry = ((zeros(half), zeros(half)), (zeros(half), zeros(half)))
        return self.rnn(x, initial_carry=carry)[:, -1]


class ConvAudio(nnx.Module):
    """wav2vec 2.0's feature encoder, small: 1-D convolutions over the waveform, GroupNorm (one
    group per channel) after the first, exact GELU, then mean over time."""

    def __init__(self, rngs, width=16):
        self.convs = nnx.List([nnx.Conv(1, width, (10,), strides=5, use_bias=False, padding="VALID", rngs=rngs),
                               nnx.Conv(width, width, (3,), strides=2, use_bias=False, padding="VALID", rngs=rngs),
                               nnx.Conv(width, width, (2,), strides=2, use_bias=False, padding="VALID", rngs=rngs)])
        self.norm = nnx.GroupNorm(width, num_groups=width, rngs=rngs)
        self.features = width

    def __call__(self, x):
        for i, c in enumerate(self.convs):
            x = c(x)
            if i == 0:
                x = self.norm(x)
            x = jax.nn.gelu(x, approximate=False)
        return x.mean(axis=1)


# ---- jax2onnx's own examples ----------------------------------------------------------------

class ViT(nnx.Module):
    def __init__(self, rngs, embedding):
        self.vit = vit.VisionTransformer(height=28, width=28, num_hiddens=32, num_layers=2, num_heads=4, mlp_dim=64,
                                         num_classes=WIDTH, embed_dims=(16, 32, 32), embedding_type=embedding,
                                         embedding_dropout_rate=0.0, attention_dropout_rate=0.0,
                                         mlp_dropout_rate=0.0, rngs=rngs)
        self.features = WIDTH

    def __call__(self, x):
        return self.vit(x, deterministic=True)


class Dino(nnx.Module):
    def __init__(self, rngs):
        self.dino = dinov3.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                             num_storage_tokens=2, rngs=rngs)
        self.features = 32

    def __call__(self, x):
        return self.dino(x).mean(axis=1)


class GptText(nnx.Module):
    """jax2onnx's GPT (embeddings and blocks as ONNX functions) without its vocabulary head,
    mean over tokens."""

    def __init__(self, rngs):
        self.embeddings = gpt.GPTEmbeddings(vocab_size=VOCAB, n_embd=32, block_size=TOKENS, dropout=0.0, rngs=rngs)
        self.stack = gpt.GPTTransformerStack(n_layer=2, n_head=4, n_embd=32, block_size=TOKENS, dropout=0.0,
                                             rngs=rngs)
        self.ln = nnx.LayerNorm(32, rngs=rngs)
        self.features = 32

    def __call__(self, tokens):
        return self.ln(self.stack(self.embeddings(tokens, deterministic=True), deterministic=True)).mean(axis=1)


# ---- two towers ------------------------------------------------------------------------------

class Tower(nnx.Module):
    def __init__(self, make, rngs):
        self.body = make(rngs)
        self.proj = nnx.Linear(self.body.features, 32, rngs=rngs)

    def __call__(self, x):
        return self.proj(self.body(x))


class Pair(nnx.Module):
    def __init__(self, make, rngs):
        self.visual_encoder = Tower(make, rngs)
        self.depth_encoder = Tower(make, rngs)
        self.logits = nnx.Linear(64, CLASSES, rngs=rngs)

    def encode(self, a, b):
        return self.visual_encoder(a), self.depth_encoder(b)

    def __call__(self, a, b):
        return self.logits(jnp.concatenate(self.encode(a, b), axis=1))


def linen_pair():
    """The ResNet pair in Linen, its classes named as the NNX ones (jax2onnx records classes:
    `--encoders Tower_1,Tower_2` for both)."""

    class LinenBlock(linen.Module):
        width: int
        stride: int

        @linen.compact
        def __call__(self, x):
            bn = lambda: linen.BatchNorm(use_running_average=True)  # noqa: E731
            h = linen.relu(bn()(linen.Conv(self.width, (3, 3), self.stride, padding=1, use_bias=False)(x)))
            h = bn()(linen.Conv(self.width, (3, 3), padding=1, use_bias=False)(h))
            if x.shape[-1] != self.width or self.stride != 1:
                x = bn()(linen.Conv(self.width, (1, 1), self.stride, use_bias=False)(x))
            return linen.relu(h + x)

    class Tower(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(16, (7, 7), 2, padding=3, use_bias=False)(x)
            x = linen.relu(linen.BatchNorm(use_running_average=True)(x))
            x = linen.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
            for i, w in enumerate((16, 32, 64, 128)):
                x = LinenBlock(w, 2 if i else 1)(x)
                x = LinenBlock(w, 1)(x)
            return linen.Dense(32, name="proj")(x.mean(axis=(1, 2)))

    class Pair(linen.Module):
        def setup(self):
            self.visual_encoder = Tower()
            self.depth_encoder = Tower()
            self.logits = linen.Dense(CLASSES)

        def encode(self, a, b):
            return self.visual_encoder(a), self.depth_encoder(b)

        def __call__(self, a, b):
            return self.logits(jnp.concatenate(self.encode(a, b), axis=1))

    return Pair


MODELS = {
    "resnet18": (lambda r: ResNet18(r), ("image", (64, 64, 3))),
    "mobilenet_v2": (lambda r: MobileNetV2(r), ("image", (32, 32, 3))),
    "linen_resnet": ("linen", ("image", (32, 32, 3))),
    "vit_conv": (lambda r: ViT(r, "conv"), ("gray", (28, 28, 1))),
    "vit_patch": (lambda r: ViT(r, "patch"), ("gray", (28, 28, 1))),
    "dinov3": (lambda r: Dino(r), ("image", (3, 32, 32))),  # NCHW, as jax2onnx's example takes it
    "gpt": (lambda r: GptText(r), ("text", (TOKENS,))),
    "clip_text": (lambda r: TextTransformer(r), ("text", (TOKENS,))),
    "lstm": (lambda r: Recurrent(r, "lstm"), ("audio", (16, 8))),
    "gru": (lambda r: Recurrent(r, "gru"), ("audio", (16, 8))),
    "bilstm": (lambda r: Recurrent(r, "bilstm"), ("audio", (16, 8))),
    "conv_audio": (lambda r: ConvAudio(r), ("wave", (400, 1))),
}


@contextlib.contextmanager
def x64():
    """float64 for the references only: a model built or exported with x64 on would hold
    float64 parameters (`jax.random.normal` defaults to it) and constants."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def perturbed(values, seed=0):
    """Flax's initial values moved a little so that no two weights are equal (they map to ONNX
    tensors by value); variances stay positive."""
    g = np.random.default_rng(seed)
    out = {}
    for k, v in values.items():
        out[k] = R.perturb(v, g, variance=k.endswith("var"))
    return out


def inputs_for(kind, shape, g):
    if kind == "text":
        return [g.integers(0, VOCAB, (B, *shape)).astype(np.int32) for _ in range(2)]
    return [g.standard_normal((B, *shape)).astype(np.float32) for _ in range(2)]


def loss64(encode, apply, x, y):
    """params -> cross-entropy of the head + DAGR on the two encoder outputs, in float64."""
    def f(p):
        return ce(apply(p, *x), y) + dagr(list(encode(p, *x)))
    return f


def build(name, make):
    """(exported function of two inputs, params, rest of the state, encode(p, a, b),
    apply(p, a, b)) with perturbed values."""
    if make == "linen":
        Pair_ = linen_pair()
        model = Pair_()
        x0 = jnp.zeros((1, 32, 32, 3), jnp.float32)
        variables = model.init(jax.random.PRNGKey(0), x0, x0)
        params = unflat(variables["params"], perturbed(flat(variables["params"])))
        stats = unflat(variables["batch_stats"], perturbed(flat(variables["batch_stats"]), seed=1))

        def encode(p, a, b):
            return model.apply({"params": p, "batch_stats": stats}, a, b, method=Pair_.encode)

        def apply(p, a, b):
            return model.apply({"params": p, "batch_stats": stats}, a, b)
        return (lambda a, b: apply(params, a, b)), params, encode, apply

    model = Pair(make, nnx.Rngs(0))
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params = unflat(params, perturbed(flat(params)))
    stats = unflat(stats, perturbed(flat(stats), seed=1))
    nnx.update(model, params, stats)

    def wide(state):
        return jax.tree_util.tree_map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                                      state)

    def encode(p, a, b):
        return nnx.merge(graphdef, p, wide(stats), rest).encode(a, b)

    def apply(p, a, b):
        return nnx.merge(graphdef, p, wide(stats), rest)(a, b)
    if isinstance(model.visual_encoder.body, Recurrent):
        # A module whose `nnx.RNN` splits it again inside (nnx.scan) cannot be traced from
        # outside ("Cannot extract graph node from different trace level"): the module is
        # rebuilt inside the exported function from copies of its state.
        def copy(state):
            return jax.tree_util.tree_map(jnp.asarray, state)
        return (lambda a, b: nnx.merge(graphdef, copy(params), copy(stats), copy(rest))(a, b)), params, encode, apply
    return model, params, encode, apply


def check(name, make, kind, shape, args, tmp):
    # jax2onnx 0.17.1 in a fresh process writes the class token of its ViT example and a
    # concatenation of DINOv3 as float64 beside float32 tensors (an invalid model, which
    # dagr-inject refuses as such); after x64 has been on once, it writes float32.
    with x64():
        pass
    fn, params, encode, apply = build(name, make)
    g = np.random.default_rng(5)
    inputs = inputs_for(kind, shape, g)
    y = g.integers(0, CLASSES, (B,)).astype(np.int64)

    src = os.path.join(tmp, f"{name}.onnx")
    dtype = jnp.int32 if kind == "text" else jnp.float32
    if args.static:
        specs = [jax.ShapeDtypeStruct((B, *shape), dtype)] * 2
    elif kind == "text":  # one symbolic shape for both inputs: their batch is one symbol
        specs = [jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"B, {TOKENS}"), jnp.int32)] * 2
    else:
        specs = [("B", *shape)] * 2
    to_onnx(fn, specs, return_mode="file", output_path=src, input_names=["image", "depth"], output_names=["logits"])
    graph = onnx.load(src).graph
    train = os.path.join(tmp, f"{name}.train.onnx")
    try:
        R.build_training_graph(src, train, ["Tower_1", "Tower_2"], "logits")
    except R.Refused as e:
        return str(e)
    feed = {i.name: x for i, x in zip(graph.input, inputs)}
    feed["y"] = y
    ours, nodes = R.ort_gradients(train, feed)

    with x64():
        p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
        xs = [jnp.asarray(x, jnp.float64) if x.dtype == np.float32 else jnp.asarray(x) for x in inputs]
        grads = flat(jax.grad(loss64(encode, apply, xs, jnp.asarray(y)))(p64))
        forward, note = R.forward_difference(src, inputs, np.asarray(apply(p64, *xs)))
    weights = flat(params)
    line = R.compare_with_framework(src, train, feed, ours, weights, grads, tmp, name, "jax.grad")
    flow = R.verify_and_train(src, train, feed, B, tmp)
    return f"export's logits vs Flax float64 {forward:.1e}{note}; {nodes} nodes, {line}; {flow}"


if __name__ == "__main__":
    R.sweep(MODELS, check, "jax2onnx")
