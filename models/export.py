"""Export the multimodal models dagr-inject is tested on, with both PyTorch ONNX exporters.

Run from the repository root (needs PyTorch, onnx and onnxscript; not needed by the tests,
which use the committed .onnx files):

    python models/export.py

Writes, for each model NAME:
  models/NAME.legacy.onnx  torch.onnx.export(dynamo=False, training=TRAINING, no constant folding)
  models/NAME.dynamo.onnx  torch.onnx.export(dynamo=True), the default exporter since PyTorch 2.9
and models/NAME.inputs.npz, a batch of example inputs (arrays named like the graph inputs).
Weights are seeded, so the files are reproducible for a given PyTorch version.
"""

import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET_LEGACY = 17
OPSET_DYNAMO = 18


class AudioMLP(nn.Module):
    def __init__(self, d_in=40, d=32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, 64)
        self.fc2 = nn.Linear(64, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class VisualMLP(nn.Module):
    def __init__(self, d_in=48, d=32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, 64)
        self.fc2 = nn.Linear(64, d)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class AvMlp(nn.Module):
    """Two-modality MLP: audio and visual feature vectors, one fused classifier."""

    def __init__(self, classes=10, d=32):
        super().__init__()
        self.audio_encoder = AudioMLP(d=d)
        self.visual_encoder = VisualMLP(d=d)
        self.fusion_head = nn.Linear(2 * d, classes)

    def forward(self, audio, visual):
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        return self.fusion_head(torch.cat([a, v], dim=1))


class AudioCNN(nn.Module):
    """Conv1d encoder with BatchNorm, as in the DGL baseline's audio branch."""

    def __init__(self, d=32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, kernel_size=5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 16, kernel_size=3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, d)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=2)
        return self.fc(x)


class VisualCNN(nn.Module):
    """Conv2d encoder with MaxPool and GELU, as in the DGL baseline's visual branch."""

    def __init__(self, d=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, d)

    def forward(self, x):
        x = self.pool(F.gelu(self.conv1(x)))
        x = self.pool(F.gelu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class AvCnn(nn.Module):
    """DGL-style audio-visual model: a unimodal head per modality plus a concat fusion head."""

    def __init__(self, classes=10, d=32):
        super().__init__()
        self.audio_encoder = AudioCNN(d)
        self.visual_encoder = VisualCNN(d)
        self.head_audio = nn.Linear(d, classes)
        self.head_visual = nn.Linear(d, classes)
        self.head_fusion = nn.Linear(2 * d, classes)

    def forward(self, audio, visual):
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        logits = self.head_fusion(torch.cat([a, v], dim=1))
        return logits, self.head_audio(a), self.head_visual(v)


class TokenEncoder(nn.Module):
    """Token encoder: Embedding, LayerNorm, one self-attention block (Softmax), mean pooling."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.scale = d ** -0.5

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        att = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale, dim=-1)
        h = h + torch.matmul(att, self.v(h))
        return self.out(h.mean(dim=1))


class TriModal(nn.Module):
    """Three modalities: audio and visual feature vectors, and text tokens."""

    def __init__(self, classes=10, d=32):
        super().__init__()
        self.audio_encoder = AudioMLP(d=d)
        self.visual_encoder = VisualMLP(d=d)
        self.text_encoder = TokenEncoder(d=d)
        self.fusion_head = nn.Linear(3 * d, classes)

    def forward(self, audio, visual, text):
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        t = self.text_encoder(text)
        return self.fusion_head(torch.cat([a, v, t], dim=1))


def example_inputs(name, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "av_mlp":
        return {"audio": torch.randn(batch, 40, generator=g), "visual": torch.randn(batch, 48, generator=g)}
    if name == "av_cnn":
        return {
            "audio": torch.randn(batch, 1, 64, generator=g),
            "visual": torch.randn(batch, 3, 16, 16, generator=g),
        }
    if name == "tri_token":
        return {
            "audio": torch.randn(batch, 40, generator=g),
            "visual": torch.randn(batch, 48, generator=g),
            "text": torch.randint(0, 50, (batch, 12), generator=g),
        }
    raise ValueError(name)


MODELS = {
    "av_mlp": (AvMlp, ["logits"]),
    "av_cnn": (AvCnn, ["logits", "logits_audio", "logits_visual"]),
    "tri_token": (TriModal, ["logits"]),
}


def build(name):
    torch.manual_seed(0)
    cls, outputs = MODELS[name]
    model = cls()
    # Give BatchNorm non-trivial running statistics, so that a graph that mixes up training and
    # inference statistics is caught by the tests.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model, outputs


def load_onnx_weights(model, path):
    """Copy the initializers of the ONNX file at `path` into `model` (same parameter names)."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(path).graph.initializer}
    state = model.state_dict()
    for k in state:
        if k in weights:
            state[k] = weights[k].reshape(state[k].shape)
    model.load_state_dict(state)
    return model


def export(name):
    model, outputs = build(name)
    inputs = example_inputs(name)
    args = tuple(inputs.values())
    in_names = list(inputs.keys())
    dyn = {k: {0: "batch"} for k in in_names + outputs}

    legacy = os.path.join(HERE, f"{name}.legacy.onnx")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            legacy,
            dynamo=False,
            input_names=in_names,
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=OPSET_LEGACY,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
        )

    dynamo = os.path.join(HERE, f"{name}.dynamo.onnx")
    model, outputs = build(name)
    model.train()
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {k: {0: batch} for k in in_names}
    prog = torch.onnx.export(
        model,
        args,
        dynamo=True,
        input_names=in_names,
        output_names=outputs,
        dynamic_shapes=shapes,
        opset_version=OPSET_DYNAMO,
        external_data=False,
        # The exporter's optimizer folds training-mode BatchNorm into Conv with running statistics,
        # which changes training semantics; keep the graph as translated.
        optimize=False,
    )
    prog.save(dynamo, external_data=False)

    np.savez(os.path.join(HERE, f"{name}.inputs.npz"), **{k: v.numpy() for k, v in inputs.items()})
    print("wrote", legacy, dynamo)


if __name__ == "__main__":
    for n in sys.argv[1:] or list(MODELS):
        export(n)
