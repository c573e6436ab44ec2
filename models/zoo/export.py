"""The zoo: real architectures, as users bring them, exported by every PyTorch exporter.

Each model pairs two encoders of real families (torchvision ResNet / MobileNetV3 / EfficientNet /
ViT, Hugging Face CLIP text / BERT / DistilBERT, GRU / LSTM / wav2vec-style audio, and an encoder
built from the shape idioms exporters turn into shape arithmetic: view(b, -1), chunk, split,
einsum, cumsum, F.pad, F.interpolate), built from configs with small widths and seeded random
weights (nothing is downloaded), fused by a linear head. Run from the repository root with
PyTorch, torchvision, transformers, onnx and onnxscript (not needed by the tests, which read
the committed files):

    python models/zoo/export.py [NAME ...]

Writes, for each model NAME, in models/zoo/:
  NAME.legacy.onnx         torch.onnx.export(dynamo=False), opset 17, dynamic batch
  NAME.legacy_static.onnx  the same with a static batch (4)
  NAME.dynamo.onnx         torch.onnx.export(dynamo=True, optimize=False), opset 18, dynamic batch
  NAME.dynamo20.onnx       the same at opset 20
  NAME.ref.npz             inputs at batch 4 (`in/<input>`) and 3 (`in3/<input>`), labels `y`,
                           and PyTorch autograd in float64 of the model in eval mode:
                           `enc/<m>` encoder outputs, `dagr/loss`, `dagr/grad/<m>` (DAGR with the
                           tool's defaults), `total_loss` (cross-entropy + DAGR) and
                           `grad/<param>` its gradient per parameter (torch names)
and models/zoo/index.json: per model, its modalities and encoder modules, its inputs, and per
export the ONNX initializer each torch parameter became (`transposed` where the exporter stored
a Linear weight transposed for MatMul).
"""

import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "fixtures"))
from generate import DEFAULT_CFG, dagr  # noqa: E402

D = 32
CLASSES = 10
BATCH = 4


# ---- encoders ---------------------------------------------------------------------------------

class TinyResNet18(nn.Module):
    """torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2], 7x7 stem, max pool, average
    pool) at widths 4-8-16-32."""

    def __init__(self, d=D):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        class Narrow(ResNet):
            def __init__(self):
                nn.Module.__init__(self)
                self._norm_layer = nn.BatchNorm2d
                self.inplanes, self.dilation, self.groups, self.base_width = 4, 1, 1, 64
                self.conv1 = nn.Conv2d(3, 4, kernel_size=7, stride=2, padding=3, bias=False)
                self.bn1 = nn.BatchNorm2d(4)
                self.relu = nn.ReLU(inplace=True)
                self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                self.layer1 = self._make_layer(BasicBlock, 4, 2)
                self.layer2 = self._make_layer(BasicBlock, 8, 2, stride=2)
                self.layer3 = self._make_layer(BasicBlock, 16, 2, stride=2)
                self.layer4 = self._make_layer(BasicBlock, 32, 2, stride=2)
                self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
                self.fc = nn.Linear(32, d)

        self.net = Narrow()

    def forward(self, x):
        return self.net(x)


class MobileNet(nn.Module):
    """torchvision mobilenet_v3_small(width_mult=0.25): HardSwish, HardSigmoid (squeeze and
    excitation), depthwise convolutions."""

    def __init__(self, d=D):
        super().__init__()
        import torchvision

        m = torchvision.models.mobilenet_v3_small(width_mult=0.25)
        self.features, self.avgpool = m.features, m.avgpool
        self.proj = nn.Linear(m.features[-1].out_channels, d)

    def forward(self, x):
        return self.proj(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNet(nn.Module):
    """torchvision EfficientNet-B0 configuration at width 0.25 and depth 0.25 (SiLU, squeeze
    and excitation; stochastic depth is off in eval mode)."""

    def __init__(self, d=D):
        super().__init__()
        from torchvision.models import efficientnet

        conf, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
        m = efficientnet.EfficientNet(conf, 0.0, last_channel=last)
        self.features, self.avgpool = m.features, m.avgpool
        self.proj = nn.Linear(m.features[-1].out_channels, d)

    def forward(self, x):
        return self.proj(torch.flatten(self.avgpool(self.features(x)), 1))


class ViT(nn.Module):
    """torchvision VisionTransformer (class token expanded over the batch, x[:, 0] pooling)."""

    def __init__(self, d=D):
        super().__init__()
        import torchvision

        self.vit = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=d, mlp_dim=2 * d, num_classes=d
        )

    def forward(self, x):
        return self.vit(x)


class ClipText(nn.Module):
    """Hugging Face CLIPTextModel (causal and padding masks, eos-token pooling)."""

    def __init__(self, d=D):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=100, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=16, eos_token_id=99,
                             attn_implementation="eager")
        self.clip = CLIPTextModel(cfg)

    def forward(self, ids, mask):
        return self.clip(input_ids=ids, attention_mask=mask).pooler_output


class Bert(nn.Module):
    """Hugging Face BertModel (position_ids[:, :T], token types, pooler)."""

    def __init__(self, d=D):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=100, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, attn_implementation="eager")
        self.bert = BertModel(cfg)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).pooler_output


class DistilBert(nn.Module):
    """Hugging Face DistilBertModel, first-token pooling."""

    def __init__(self, d=D):
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel

        cfg = DistilBertConfig(vocab_size=100, dim=d, hidden_dim=2 * d, n_layers=2, n_heads=2,
                               max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                               attn_implementation="eager")
        self.bert = DistilBertModel(cfg)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


class GruAudio(nn.Module):
    """Two-layer bidirectional GRU over [batch, time, features], last step."""

    def __init__(self, d=D):
        super().__init__()
        self.gru = nn.GRU(16, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(32, d)

    def forward(self, x):
        y, _ = self.gru(x)
        return self.proj(y[:, -1])


class LstmAudio(nn.Module):
    """LSTM over [time, batch, features] (the default layout), mean over time."""

    def __init__(self, d=D):
        super().__init__()
        self.lstm = nn.LSTM(16, 16)
        self.proj = nn.Linear(16, d)

    def forward(self, x):
        y, (h, c) = self.lstm(x.transpose(0, 1))
        return self.proj(y.mean(dim=0) + h[-1])


class Wav2VecAudio(nn.Module):
    """wav2vec 2.0's feature encoder: Conv1d + GroupNorm + GELU, strided Conv1d + GELU, a
    padded positional convolution with its last frame dropped ([:, :, :-1]), LayerNorm."""

    def __init__(self, d=D):
        super().__init__()
        self.conv0 = nn.Conv1d(1, 16, kernel_size=10, stride=5, bias=False)
        self.norm0 = nn.GroupNorm(16, 16)
        self.conv1 = nn.Conv1d(16, 16, kernel_size=3, stride=2, bias=False)
        self.pos = nn.Conv1d(16, 16, kernel_size=4, padding=2, groups=4)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, d)

    def forward(self, x):
        h = F.gelu(self.norm0(self.conv0(x)))
        h = F.gelu(self.conv1(h))
        h = h + F.gelu(self.pos(h)[:, :, :-1])
        h = self.norm(h.transpose(1, 2))
        return self.proj(h.mean(dim=1))


class ShapeIdiomsA(nn.Module):
    """view(b, -1), chunk, cumsum, F.pad."""

    def __init__(self, d=D):
        super().__init__()
        self.fc = nn.Linear(2 * 8 * 6, d)
        self.gate = nn.Linear(6, 6)

    def forward(self, x):  # [b, 8, 12]
        b = x.shape[0]
        left, right = x.chunk(2, dim=2)
        h = left * torch.sigmoid(self.gate(right))
        h = torch.cumsum(h, dim=1)
        h = F.pad(h, (0, 0, 1, 1))[:, 1:-1]
        return self.fc(torch.cat([h, right], dim=1).view(b, -1))


class ShapeIdiomsB(nn.Module):
    """split, einsum, F.interpolate (nearest and linear), expand."""

    def __init__(self, d=D):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.3)
        self.fc = nn.Linear(4 * 24 + 4, d)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1))

    def forward(self, x):  # [b, 4, 12]
        a, b_ = torch.split(x, [5, 7], dim=2)
        a = torch.einsum("bcl,cd->bdl", a, self.w)
        h = torch.cat([a, b_], dim=2) + self.bias.expand(x.shape[0], -1, -1)
        up = F.interpolate(h, scale_factor=2.0, mode="linear", align_corners=False)
        near = F.interpolate(h, size=6, mode="nearest")
        return self.fc(torch.cat([up.flatten(1), near.sum(dim=2)], dim=1))


# ---- models -----------------------------------------------------------------------------------

class Pair(nn.Module):
    """Two encoders, each fed by its own inputs, and a linear fusion head."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        for m, (enc, _) in spec.items():
            setattr(self, f"{m}_encoder", enc())
        self.head = nn.Linear(D * len(spec), CLASSES)

    def encode(self, *args):
        out, k = [], 0
        for m, (_, n) in self.spec.items():
            out.append(getattr(self, f"{m}_encoder")(*args[k:k + n]))
            k += n
        return out

    def forward(self, *args):
        return self.head(torch.cat(self.encode(*args), dim=1))


def image(g, b):
    return torch.randn(b, 3, 32, 32, generator=g)


def tokens(g, b):
    ids = torch.randint(1, 99, (b, 10), generator=g)
    mask = torch.ones(b, 10, dtype=torch.int64)
    for i in range(b):
        pad = i % 4
        if pad:
            mask[i, 10 - pad:] = 0
            ids[i, 10 - pad:] = 0
        ids[i, 9 - pad] = 99  # CLIP pools at the end-of-text token
    return [ids, mask]


# name -> (modality -> (encoder, number of inputs)), input names, input maker
ZOO = {
    "resnet_gru": (
        {"visual": (TinyResNet18, 1), "audio": (GruAudio, 1)},
        ["image", "audio"],
        lambda g, b: [image(g, b), torch.randn(b, 12, 16, generator=g)],
    ),
    "mobilenet_lstm": (
        {"visual": (MobileNet, 1), "audio": (LstmAudio, 1)},
        ["image", "audio"],
        lambda g, b: [image(g, b), torch.randn(b, 12, 16, generator=g)],
    ),
    "efficientnet_wav2vec": (
        {"visual": (EfficientNet, 1), "audio": (Wav2VecAudio, 1)},
        ["image", "wave"],
        lambda g, b: [image(g, b), torch.randn(b, 1, 160, generator=g)],
    ),
    "vit_clip": (
        {"image": (ViT, 1), "text": (ClipText, 2)},
        ["image", "ids", "mask"],
        lambda g, b: [image(g, b)] + tokens(g, b),
    ),
    "bert_distilbert": (
        {"query": (Bert, 2), "doc": (DistilBert, 2)},
        ["q_ids", "q_mask", "d_ids", "d_mask"],
        lambda g, b: tokens(g, b) + tokens(g, b),
    ),
    "shape_idioms": (
        {"left": (ShapeIdiomsA, 1), "right": (ShapeIdiomsB, 1)},
        ["u", "v"],
        lambda g, b: [torch.randn(b, 8, 12, generator=g), torch.randn(b, 4, 12, generator=g)],
    ),
}

EXPORTS = {
    # file suffix -> (dynamo, opset, dynamic batch)
    "legacy": (False, 17, True),
    "legacy_static": (False, 17, False),
    "dynamo": (True, 18, True),
    "dynamo20": (True, 20, True),
}


def build(name):
    torch.manual_seed(0)
    spec, _, _ = ZOO[name]
    model = Pair(spec)
    # Weights as a trained model has them: no two parameters equal (a fresh initialization has
    # all LayerNorm weights 1 and many biases 0, and an exporter in eval mode merges initializers
    # of equal value into one, which ties them; dagr-inject warns about that, see the README).
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    # Non-trivial BatchNorm statistics, so that mixing up running and batch statistics shows.
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export(model, name, suffix, args, in_names):
    dynamo, opset, dynamic = EXPORTS[suffix]
    path = os.path.join(HERE, f"{name}.{suffix}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            torch.onnx.export(
                model, tuple(args), path, dynamo=False, input_names=in_names, output_names=["logits"],
                dynamic_axes={k: {0: "batch"} for k in in_names + ["logits"]} if dynamic else None,
                opset_version=opset, do_constant_folding=False,
            )
        else:
            batch = torch.export.Dim("batch", min=2, max=1024)
            prog = torch.onnx.export(
                model, tuple(args), dynamo=True, input_names=in_names, output_names=["logits"],
                dynamic_shapes=(tuple({0: batch} for _ in args),), opset_version=opset, external_data=False,
                # For training, as with the legacy exporter's do_constant_folding=False: the
                # optimizer folds BatchNorm into convolutions, pre-transposes weights into new
                # constants and merges initializers of equal value across modules (all
                # LayerNorm weights become one), which trains something else than the model.
                optimize=False,
            )
            prog.save(path, external_data=False)
    return path


def initializer_map(path, model):
    """torch parameter name -> (ONNX initializer, transposed) for the exported file."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    out = {}
    for pname, p in model.named_parameters():
        v = p.detach().numpy()
        if pname in inits and inits[pname].shape == v.shape:
            out[pname] = [pname, False]
            continue
        for iname, a in inits.items():
            if a.dtype != np.float32:
                continue
            if a.shape == v.shape and np.array_equal(a, v):
                out[pname] = [iname, False]
                break
            if v.ndim == 2 and a.shape == v.T.shape and np.array_equal(a, v.T):
                out[pname] = [iname, True]
                break
    return out


def reference(model, name, args, y):
    """PyTorch autograd in float64 of the encoders, DAGR, and cross-entropy + DAGR."""
    m64 = build(name).double()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    a64 = [a.double() if a.is_floating_point() else a for a in args]
    zs = m64.encode(*a64)
    zs = [z.detach().requires_grad_(True) for z in zs]
    loss, _, _, _ = dagr(zs, DEFAULT_CFG)
    grads = torch.autograd.grad(loss, zs)
    out = {"dagr/loss": loss.detach().numpy()}
    for m, z, g in zip(ZOO[name][0], zs, grads):
        out[f"enc/{m}"] = z.detach().numpy()
        out[f"dagr/grad/{m}"] = g.numpy()
    m64.zero_grad()
    zs = m64.encode(*a64)
    logits = m64.head(torch.cat(zs, dim=1))
    total = F.cross_entropy(logits, y) + dagr(zs, DEFAULT_CFG)[0]
    total.backward()
    out["total_loss"] = total.detach().numpy()
    for pname, p in m64.named_parameters():
        out[f"grad/{pname}"] = p.grad.numpy() if p.grad is not None else np.zeros(p.shape)
    return out


def main(names):
    index_path = os.path.join(HERE, "index.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else {}
    for name in names:
        spec, in_names, make = ZOO[name]
        model = build(name)
        g = torch.Generator().manual_seed(1)
        args = make(g, BATCH)
        args3 = make(g, 3)
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        ref = reference(model, name, args, y)
        ref.update({f"in/{k}": a.numpy() for k, a in zip(in_names, args)})
        ref.update({f"in3/{k}": a.numpy() for k, a in zip(in_names, args3)})
        ref["y"] = y.numpy()
        # Per-element references in float32 (1e-7 relative, far below the tests' 1e-4), losses
        # in float64.
        ref = {k: v.astype(np.float32) if v.dtype == np.float64 and v.ndim > 0 else v for k, v in ref.items()}
        np.savez_compressed(os.path.join(HERE, f"{name}.ref.npz"), **ref)
        entry = {"modalities": list(spec), "inputs": in_names, "exports": {}}
        for suffix in EXPORTS:
            try:
                path = export(build(name), name, suffix, args, in_names)
                entry["exports"][suffix] = initializer_map(path, model)
                print("wrote", path)
            except Exception as e:  # an exporter that cannot export this model: recorded
                print(f"{name}.{suffix}: export failed: {type(e).__name__}: {str(e)[:300]}")
                entry["exports"][suffix] = None
        index[name] = entry
    with open(index_path, "w") as f:
        json.dump(index, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ZOO))
