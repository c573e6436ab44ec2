"""Keras models a user brings, through tf2onnx: Keras's own applications (CNNs) built with
`weights=None` and seeded perturbations (nothing downloaded), and encoders made of Keras's
recurrent and attention layers (LSTM, GRU, bidirectional, a transformer block over an
embedding). Each is made a two-tower model (two copies of the encoder, a 32-wide projection
each, a `logits` head on their concatenation), exported with `tf2onnx.convert.from_keras` at
opset 17 (dynamic batch, or static with `--static`), and given to `dagr-inject MODEL --train`;
then every ONNX tensor holding a Keras trainable weight (found by value, up to the axis
permutation tf2onnx applied) has its `<tensor>_grad` compared with TensorFlow's GradientTape in
float64 of the same loss (cross-entropy + DAGR, default configuration), and tract with ONNX
Runtime on the same training graph (`real_model_check.py` says how).

    cargo build --release
    python scripts/check_real_models_keras.py [--static] [NAME ...]   # models/frameworks/requirements-keras.txt

Also reported: Keras trainable weights with no tensor of their value in the graph (tf2onnx
folded them into another constant, so they cannot train as such), and tensors the training
graph trains that hold no Keras trainable weight (a moving statistic would be one).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models", "frameworks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import real_model_check as R  # noqa: E402
from export_keras import dagr  # noqa: E402

B, TOKENS, VOCAB, CLASSES = 4, 12, 100, 10
A = keras.applications


def app(make, size):
    return (lambda: make(input_shape=(size, size, 3), include_top=False, weights=None, pooling="avg"),
            ("image", (size, size, 3)))


def sequence(kind):
    def make():
        x = keras.Input((16, 8))
        if kind == "lstm":
            h = keras.layers.LSTM(24)(x)
        elif kind == "gru":
            h = keras.layers.GRU(24)(x)
        elif kind == "bilstm":
            h = keras.layers.Bidirectional(keras.layers.LSTM(12, return_sequences=True))(x)
            h = keras.layers.GRU(16)(h)
        else:
            raise ValueError(kind)
        return keras.Model(x, h)
    return make, ("audio", (16, 8))


def transformer():
    def make():
        x = keras.Input((TOKENS,), dtype="int32")
        e = keras.layers.Embedding(VOCAB, 32)(x)
        # Positions from the input (a layer called on a constant would run once, untracked).
        pos = keras.layers.Embedding(TOKENS, 32)(keras.ops.zeros_like(x) + keras.ops.arange(TOKENS, dtype="int32"))
        h = keras.layers.LayerNormalization(epsilon=1e-6)(e + pos)
        a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + a)
        f = keras.layers.Dense(32)(keras.layers.Dense(64, activation=lambda t: keras.activations.gelu(t, approximate=True))(h))
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + f)
        return keras.Model(x, keras.layers.GlobalAveragePooling1D()(h))
    return make, ("text", (TOKENS,))


MODELS = {
    "mobilenet": app(lambda **k: A.MobileNet(alpha=0.25, **k), 64),
    "mobilenet_v2": app(lambda **k: A.MobileNetV2(alpha=0.35, **k), 64),
    "mobilenet_v3_small": app(A.MobileNetV3Small, 64),
    "efficientnet_b0": app(A.EfficientNetB0, 64),
    "efficientnet_v2_b0": app(A.EfficientNetV2B0, 64),
    "resnet50": app(A.ResNet50, 64),
    "resnet50_v2": app(A.ResNet50V2, 64),
    "densenet121": app(A.DenseNet121, 64),
    "convnext_tiny": app(A.ConvNeXtTiny, 64),
    "nasnet_mobile": app(A.NASNetMobile, 64),
    "xception": app(A.Xception, 75),
    "inception_v3": app(A.InceptionV3, 75),
    "vgg16": app(A.VGG16, 32),
    "lstm": sequence("lstm"),
    "gru": sequence("gru"),
    "bilstm_gru": sequence("bilstm"),
    "transformer": transformer(),
}


def pair(make, shape, dtype):
    """Two towers (`visual_encoder`, `depth_encoder`: the encoder and a Dense(32)) and a head."""
    ins = [keras.Input(shape, name=n, dtype=dtype) for n in ("image", "depth")]
    towers = []
    for name in ("visual_encoder", "depth_encoder"):
        x = keras.Input(shape, dtype=dtype)
        towers.append(keras.Model(x, keras.layers.Dense(32, name="proj")(make()(x)), name=name))
    zs = [t(i) for t, i in zip(towers, ins)]
    logits = keras.layers.Dense(CLASSES, name="logits")(keras.layers.Concatenate()(zs))
    return keras.Model(ins, logits, name="pair"), towers


def perturbed(model, seed=0):
    """Keras's initial values moved a little so that no two weights are equal (they map to ONNX
    tensors by value); moving variances stay positive."""
    g = np.random.default_rng(seed)
    out = []
    for w in model.weights:
        out.append(R.perturb(np.asarray(w.numpy()), g, variance="variance" in w.path))
    return out


def inputs_for(kind, shape, g):
    if kind == "text":
        return [g.integers(0, VOCAB, (B, *shape)).astype(np.int32) for _ in range(2)]
    return [g.standard_normal((B, *shape)).astype(np.float32) for _ in range(2)]


def reference(make, shape, dtype, values, inputs, y):
    """TensorFlow's gradients in float64 of cross-entropy + DAGR for every trainable weight,
    keyed by its index in `model.weights`."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # floatx alone leaves every layer computing in float32
    try:
        m, towers = pair(make, shape, dtype)
        for w, v in zip(m.weights, values):
            w.assign(v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v)
        xs = [tf.constant(x, tf.float64 if dtype == "float32" else tf.int32) for x in inputs]
        head = m.get_layer("logits")
        trainable = {id(w) for w in m.trainable_weights}
        ws = [(i, w) for i, w in enumerate(m.weights) if id(w) in trainable]
        with tf.GradientTape() as tape:
            zs = [t(x, training=False) for t, x in zip(towers, xs)]
            logits = head(tf.concat(zs, 1))
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits))
            loss = ce + dagr(zs)
        grads = tape.gradient(loss, [w for _, w in ws])
        # An embedding's gradient comes as IndexedSlices: made dense.
        return {i: (None if g is None else tf.convert_to_tensor(g).numpy()) for (i, _), g in zip(ws, grads)}, \
            logits.numpy()
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def check(name, make, kind, shape, args, tmp):
    dtype = "int32" if kind == "text" else "float32"
    keras.utils.set_random_seed(0)
    m, _ = pair(make, shape, dtype)
    values = perturbed(m)
    for w, v in zip(m.weights, values):
        w.assign(v)
    g = np.random.default_rng(5)
    inputs = inputs_for(kind, shape, g)
    y = g.integers(0, CLASSES, (B,)).astype(np.int64)

    src = os.path.join(tmp, f"{name}.onnx")
    batch = B if args.static else None
    tfdt = tf.int32 if dtype == "int32" else tf.float32
    spec = tuple(tf.TensorSpec((batch, *shape), tfdt, name=n) for n in ("image", "depth"))
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=args.opset, output_path=src)
    graph = onnx.load(src).graph
    logits = graph.output[0].name
    train = os.path.join(tmp, f"{name}.train.onnx")
    try:
        R.build_training_graph(src, train, ["visual_encoder", "depth_encoder"], logits)
    except R.Refused as e:
        return str(e)
    feed = {i.name: x for i, x in zip(graph.input, inputs)}
    feed["y"] = y
    ours, nodes = R.ort_gradients(train, feed)

    grads, logits64 = reference(make, shape, dtype, values, inputs, y)
    forward, note = R.forward_difference(src, inputs, logits64)
    weights = {i: v for i, v in enumerate(values) if i in grads}
    line = R.compare_with_framework(src, train, feed, ours, weights, grads, tmp, name, "GradientTape")
    flow = R.verify_and_train(src, train, feed, B, tmp)
    return f"export's logits vs Keras float64 {forward:.1e}{note}; {nodes} nodes, {line}; {flow}"


if __name__ == "__main__":
    R.sweep(MODELS, check, "tf2onnx")
