"""Keras 3 (TensorFlow backend): the two-encoder model, exported three ways, with TensorFlow's
own gradients as the reference.

    /path/to/venv/bin/python models/frameworks/export_keras.py

Pinned: tensorflow-cpu==2.21.0 keras==3.15.1 tf2onnx==1.17.0 onnx==1.23.2 (see
requirements-keras.txt). Writes keras.tf2onnx.onnx (tf2onnx.convert.from_keras),
keras.savedmodel.onnx (the tf2onnx command line on a SavedModel), keras.export.onnx (Keras's own
`model.export(format="onnx")`, opset 15), keras.ref.npz and their index.json entries.
"""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def build():
    """audio [B, T, C] -> Conv1D -> pool -> Dense -> LayerNorm; visual [B, H, W, C] -> Conv2D ->
    pool -> Dense; heads on each and on their concatenation."""
    a_in = keras.Input(C.AUDIO, name="audio")
    v_in = keras.Input(C.VISUAL, name="visual")
    a = keras.layers.Conv1D(8, 3, activation="relu", name="conv")(a_in)
    a = keras.layers.GlobalAveragePooling1D(name="pool")(a)
    a = keras.layers.Dense(C.D, name="fc")(a)
    a = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(a)
    audio_encoder = keras.Model(a_in, a, name="audio_encoder")
    v = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(v_in)
    v = keras.layers.GlobalAveragePooling2D(name="pool")(v)
    v = keras.layers.Dense(C.D, activation="tanh", name="fc")(v)
    visual_encoder = keras.Model(v_in, v, name="visual_encoder")
    ai = keras.Input(C.AUDIO, name="audio")
    vi = keras.Input(C.VISUAL, name="visual")
    za, zv = audio_encoder(ai), visual_encoder(vi)
    fused = keras.layers.Concatenate(name="fusion")([za, zv])
    outs = [
        keras.layers.Dense(C.CLASSES, name="logits")(fused),
        keras.layers.Dense(C.CLASSES, name="logits_audio")(za),
        keras.layers.Dense(C.CLASSES, name="logits_visual")(zv),
    ]
    return keras.Model([ai, vi], outs, name="av")


def weights_of(model):
    """Every weight by a unique name: `audio_encoder/conv/kernel` (Keras's own `path` of a layer
    inside a nested model omits the model)."""
    out = {}
    for layer in model.layers:
        for sub in layer.layers if isinstance(layer, keras.Model) else [layer]:
            for w in sub.weights:
                key = f"{layer.name}/{w.path}" if sub is not layer else w.path
                assert key not in out, key
                out[key] = w
    return out


def dagr(zs):
    import tensorflow as tf

    us = [z / tf.maximum(tf.norm(z, axis=1, keepdims=True), 1e-12) for z in zs]
    i, j = C.pairs(us[0].shape[0])
    disp = []
    for u in us:
        d2 = tf.reduce_sum((tf.gather(u, i) - tf.gather(u, j)) ** 2, axis=1)
        disp.append(tf.reduce_logsumexp(-d2 / C.TAU) - np.log(float(len(i))))
    d = tf.sqrt(tf.reduce_sum((us[0] - us[1]) ** 2, axis=1) + 1e-12)
    anc = tf.reduce_mean(tf.nn.relu(d - C.DELTA))
    return C.LAMBDA_DISP * tf.reduce_mean(tf.stack(disp)) + C.LAMBDA_ANC * anc


def reference(values, d):
    import tensorflow as tf

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # floatx alone leaves every layer computing in float32
    m = build()
    for k, w in weights_of(m).items():
        w.assign(values[k].astype(np.float64))
    a, v = (tf.constant(d["in/audio"], tf.float64), tf.constant(d["in/visual"], tf.float64))
    enc_a = m.get_layer("audio_encoder")
    enc_v = m.get_layer("visual_encoder")
    with tf.GradientTape() as tape:
        za, zv = enc_a(a), enc_v(v)
        loss = dagr([za, zv])
    ga, gv = tape.gradient(loss, [za, zv])
    out = {"dagr/loss": loss.numpy(), "dagr/grad/audio": ga.numpy(), "dagr/grad/visual": gv.numpy(),
           "enc/audio": za.numpy(), "enc/visual": zv.numpy()}
    ws = weights_of(m)
    with tf.GradientTape() as tape:
        za, zv = enc_a(a), enc_v(v)
        logits = m([a, v])
        y = tf.constant(d["y"])
        ce = sum(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, l)) for l in logits)
        total = ce + dagr([za, zv])
    grads = tape.gradient(total, list(ws.values()))
    out["total_loss"] = total.numpy()
    for k, g in zip(ws, grads):
        out[f"grad/{k}"] = g.numpy()
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    return out


def main():
    import tensorflow as tf

    d = C.data()
    m = build()
    shapes = {k: tuple(w.shape) for k, w in weights_of(m).items()}
    values = C.random_weights(shapes)
    for k, w in weights_of(m).items():
        w.assign(values[k])
    ref = reference(values, d)
    ref.update(d)
    exports = {}
    import tf2onnx

    spec = (tf.TensorSpec((None, *C.AUDIO), tf.float32, name="audio"),
            tf.TensorSpec((None, *C.VISUAL), tf.float32, name="visual"))
    p = os.path.join(C.HERE, "keras.tf2onnx.onnx")
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=17, output_path=p)
    exports["tf2onnx"] = p
    with tempfile.TemporaryDirectory() as tmp:
        m.export(os.path.join(tmp, "sm"), format="tf_saved_model")
        p = os.path.join(C.HERE, "keras.savedmodel.onnx")
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", os.path.join(tmp, "sm"),
                        "--opset", "17", "--output", p], check=True, capture_output=True)
        exports["savedmodel"] = p
    p = os.path.join(C.HERE, "keras.export.onnx")
    m.export(p, format="onnx")
    exports["export"] = p
    C.write("keras", ref, {k: (p, C.param_map(p, values)) for k, p in exports.items()}, ["audio", "visual"])
    for k, p in exports.items():
        print("wrote", p)


if __name__ == "__main__":
    main()
