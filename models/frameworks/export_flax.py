"""Flax (NNX and Linen) through jax2onnx: the two-encoder model, with JAX's own gradients as the
reference.

    JAX2ONNX_ENABLE_STACKTRACE_METADATA=1 /path/to/venv/bin/python models/frameworks/export_flax.py

Pinned: jax==0.10.2 flax==0.12.8 jax2onnx==0.17.1 onnx==1.23.2 (requirements-flax.txt). Writes
flax.nnx.onnx (NNX, jax2onnx's call-site metadata), flax.functions.onnx (each encoder an ONNX
local function through `@onnx_function`), flax.linen.onnx (Linen, parameters closed over),
flax.ref.npz and their index.json entries.
"""

import os
import sys

os.environ.setdefault("JAX2ONNX_ENABLE_STACKTRACE_METADATA", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen, nnx  # noqa: E402
from jax2onnx import onnx_function, to_onnx  # noqa: E402

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


class AudioEncoder(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(C.AUDIO[1], 8, kernel_size=(3,), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(8, C.D, rngs=rngs)
        self.norm = nnx.LayerNorm(C.D, epsilon=1e-6, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).mean(axis=1)
        return self.norm(jax.nn.gelu(self.fc(h), approximate=True))


class VisualEncoder(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(C.VISUAL[2], 8, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(8, C.D, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(jax.nn.relu(self.conv(x)).mean(axis=(1, 2))))


class Av(nnx.Module):
    def __init__(self, rngs, functions=False):
        wrap = onnx_function if functions else (lambda c: c)
        self.audio_encoder = wrap(AudioEncoder)(rngs)
        self.visual_encoder = wrap(VisualEncoder)(rngs)
        self.logits = nnx.Linear(2 * C.D, C.CLASSES, rngs=rngs)
        self.logits_audio = nnx.Linear(C.D, C.CLASSES, rngs=rngs)
        self.logits_visual = nnx.Linear(C.D, C.CLASSES, rngs=rngs)

    def encode(self, a, v):
        return self.audio_encoder(a), self.visual_encoder(v)

    def __call__(self, a, v):
        za, zv = self.encode(a, v)
        return self.logits(jnp.concatenate([za, zv], axis=1)), self.logits_audio(za), self.logits_visual(zv)


def linen_model():
    """The same model in Linen (classes named as in NNX: jax2onnx records `Class.method`)."""

    class AudioEncoder(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = jax.nn.relu(linen.Conv(8, (3,), padding="VALID", name="conv")(x)).mean(axis=1)
            return linen.LayerNorm(epsilon=1e-6, name="norm")(jax.nn.gelu(linen.Dense(C.D, name="fc")(h)))

    class VisualEncoder(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = jax.nn.relu(linen.Conv(8, (3, 3), padding="VALID", name="conv")(x)).mean(axis=(1, 2))
            return jnp.tanh(linen.Dense(C.D, name="fc")(h))

    class Av(linen.Module):
        def setup(self):
            self.audio_encoder = AudioEncoder()
            self.visual_encoder = VisualEncoder()
            self.logits = linen.Dense(C.CLASSES)
            self.logits_audio = linen.Dense(C.CLASSES)
            self.logits_visual = linen.Dense(C.CLASSES)

        def encode(self, a, v):
            return self.audio_encoder(a), self.visual_encoder(v)

        def __call__(self, a, v):
            za, zv = self.encode(a, v)
            return self.logits(jnp.concatenate([za, zv], axis=1)), self.logits_audio(za), self.logits_visual(zv)

    return Av()


def dagr(zs):
    us = [z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12) for z in zs]
    i, j = C.pairs(us[0].shape[0])
    disp = [jax.nn.logsumexp(-((u[i] - u[j]) ** 2).sum(1) / C.TAU) - np.log(float(len(i))) for u in us]
    d = jnp.sqrt(((us[0] - us[1]) ** 2).sum(1) + 1e-12)
    return C.LAMBDA_DISP * jnp.mean(jnp.stack(disp)) + C.LAMBDA_ANC * jnp.mean(jax.nn.relu(d - C.DELTA))


def ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def key(path):
    return "/".join(str(getattr(p, "key", p)) for p in path).replace("/.value", "")


def flat(tree):
    return {key(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat(tree, values):
    return jax.tree_util.tree_map_with_path(lambda p, v: jnp.asarray(values[key(p)]), tree)


def reference(encode, apply, params, d):
    """encode/apply(params, a, v) in float64; gradients of DAGR and of CE + DAGR."""
    p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
    a, v, y = jnp.asarray(d["in/audio"], jnp.float64), jnp.asarray(d["in/visual"], jnp.float64), jnp.asarray(d["y"])
    za, zv = encode(p64, a, v)
    loss, (ga, gv) = jax.value_and_grad(lambda z: dagr(list(z)))((za, zv))

    def total(p):
        return sum(ce(l, y) for l in apply(p, a, v)) + dagr(list(encode(p, a, v)))

    t, g = jax.value_and_grad(total)(p64)
    out = {"dagr/loss": np.asarray(loss), "dagr/grad/audio": np.asarray(ga), "dagr/grad/visual": np.asarray(gv),
           "total_loss": np.asarray(t), "enc/audio": np.asarray(za), "enc/visual": np.asarray(zv)}
    out.update({f"grad/{k}": v for k, v in flat(g).items()})
    return out


def export_nnx(functions, d):
    model = Av(nnx.Rngs(0), functions=functions)
    graphdef, params = nnx.split(model, nnx.Param)
    values = C.random_weights({k: v.shape for k, v in flat(params).items()})
    params = unflat(params, values)
    nnx.update(model, params)

    def encode(p, a, v):
        return nnx.merge(graphdef, p).encode(a, v)

    def apply(p, a, v):
        return nnx.merge(graphdef, p)(a, v)

    ref = reference(encode, apply, params, d)
    name = "functions" if functions else "nnx"
    path = os.path.join(C.HERE, f"flax.{name}.onnx")
    to_onnx(model, [("B", *C.AUDIO), ("B", *C.VISUAL)], opset=21, return_mode="file", output_path=path,
            input_names=["audio", "visual"], output_names=C.HEADS)
    return path, values, ref


def export_linen(d):
    model = linen_model()
    a0, v0 = jnp.zeros((1, *C.AUDIO), jnp.float32), jnp.zeros((1, *C.VISUAL), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), a0, v0)["params"]
    values = C.random_weights({k: v.shape for k, v in flat(params).items()}, seed=5)
    params = unflat(params, values)

    def encode(p, a, v):
        return model.apply({"params": p}, a, v, method=type(model).encode)

    def apply(p, a, v):
        return model.apply({"params": p}, a, v)

    ref = reference(encode, apply, params, d)
    path = os.path.join(C.HERE, "flax.linen.onnx")
    to_onnx(lambda a, v: apply(params, a, v), [("B", *C.AUDIO), ("B", *C.VISUAL)], opset=21,
            return_mode="file", output_path=path, input_names=["audio", "visual"], output_names=C.HEADS)
    return path, values, ref


def main():
    d = C.data()
    for what, fn in (("nnx", lambda: export_nnx(False, d)), ("functions", lambda: export_nnx(True, d)),
                     ("linen", lambda: export_linen(d))):
        path, values, ref = fn()
        ref.update(d)
        C.write(f"flax_{what}", ref, {what: (path, C.param_map(path, values))}, ["audio", "visual"])
        print("wrote", path)


if __name__ == "__main__":
    main()
