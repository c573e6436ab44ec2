"""The training tasks that the device scripts share: random audio-visual data and the `--train`
graph of models/av_cnn.legacy.onnx (DAGR + cross-entropy over its three heads) or of
models/av_mlp.legacy.onnx."""

import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Per model: its inputs' shapes (without the batch) and its logits outputs.
TASKS = {
    "av_cnn": ({"audio": (1, 64), "visual": (3, 16, 16)}, "logits,logits_audio,logits_visual"),
    "av_mlp": ({"audio": (40,), "visual": (48,)}, "logits"),
}


def random_data(n, seed=0, model="av_cnn"):
    rng = np.random.default_rng(seed)
    data = {k: rng.standard_normal((n, *shape), dtype=np.float32) for k, shape in TASKS[model][0].items()}
    data["label"] = rng.integers(0, 10, n).astype(np.int64)
    return data


def write_task(binary, directory, n, model="av_cnn"):
    """Writes data.npz (n samples) and train.onnx of `model` into `directory`; returns (data,
    data path, graph path)."""
    data = random_data(n, model=model)
    dpath = os.path.join(directory, "data.npz")
    np.savez(dpath, **data)
    graph = os.path.join(directory, "train.onnx")
    subprocess.run([binary, os.path.join(ROOT, "models", f"{model}.legacy.onnx"), "--encoders", "audio,visual",
                    "--logits", TASKS[model][1], "--labels", "label", "--train", "-o", graph],
                   check=True, capture_output=True)
    return data, dpath, graph
