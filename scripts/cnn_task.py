"""The CNN training task that the device scripts share: random audio-visual data and the
`--train` graph of models/av_cnn.legacy.onnx (DAGR + cross-entropy over its three heads)."""

import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"audio": rng.standard_normal((n, 1, 64), dtype=np.float32),
            "visual": rng.standard_normal((n, 3, 16, 16), dtype=np.float32),
            "label": rng.integers(0, 10, n).astype(np.int64)}


def write_task(binary, directory, n):
    """Writes data.npz (n samples) and train.onnx into `directory`; returns (data, paths)."""
    data = random_data(n)
    dpath = os.path.join(directory, "data.npz")
    np.savez(dpath, **data)
    graph = os.path.join(directory, "train.onnx")
    subprocess.run([binary, os.path.join(ROOT, "models", "av_cnn.legacy.onnx"), "--encoders", "audio,visual",
                    "--logits", "logits,logits_audio,logits_visual", "--labels", "label", "--train", "-o", graph],
                   check=True, capture_output=True)
    return data, dpath, graph
