"""Keras through tf2onnx, the nodes tf2onnx adds without an op path: an LSTM (an ONNX LSTM,
`LSTM__837`, between `Transpose`/`Squeeze` helpers), a GRU (a `Loop` whose condition nodes are
named after the frozen TensorFlow function), and a Conv2D + BatchNormalization block (folded
into `Conv__508` and constants). `tests/it/locate.rs` resolves each encoder by its module scope,
and builds and verifies the training graph.

    /path/to/venv/bin/python models/frameworks/export_keras_rnn.py   # requirements-keras.txt

Writes keras.rnn.onnx (seeded random weights, dynamic batch, opset 17).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def build():
    a_in, v_in, m_in = keras.Input(C.AUDIO), keras.Input(C.VISUAL), keras.Input(C.AUDIO)
    a = keras.layers.Dense(C.D, name="fc")(keras.layers.LSTM(12, name="lstm")(a_in))
    audio = keras.Model(a_in, a, name="audio_encoder")
    v = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(v_in)
    v = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(v))
    v = keras.layers.Dense(C.D, name="fc")(keras.layers.GlobalAveragePooling2D(name="pool")(v))
    visual = keras.Model(v_in, v, name="visual_encoder")
    mo = keras.layers.Dense(C.D, name="fc")(keras.layers.GRU(12, name="gru")(m_in))
    motion = keras.Model(m_in, mo, name="motion_encoder")
    ins = [keras.Input(C.AUDIO, name="audio"), keras.Input(C.VISUAL, name="visual"), keras.Input(C.AUDIO, name="motion")]
    zs = [audio(ins[0]), visual(ins[1]), motion(ins[2])]
    logits = keras.layers.Dense(C.CLASSES, name="logits")(keras.layers.Concatenate(name="fusion")(zs))
    return keras.Model(ins, logits, name="av")


def main():
    keras.utils.set_random_seed(0)
    m = build()
    g = np.random.default_rng(3)
    for w in m.weights:
        v = w.numpy()
        w.assign(np.abs(v) + 0.5 if "variance" in w.path else v + 0.1 * g.standard_normal(v.shape).astype(v.dtype))
    spec = (tf.TensorSpec((None, *C.AUDIO), tf.float32, name="audio"),
            tf.TensorSpec((None, *C.VISUAL), tf.float32, name="visual"),
            tf.TensorSpec((None, *C.AUDIO), tf.float32, name="motion"))
    p = os.path.join(C.HERE, "keras.rnn.onnx")
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=17, output_path=p)
    print("wrote", p)


if __name__ == "__main__":
    main()
