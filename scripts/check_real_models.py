"""Real architectures a user brings, built from their configs with seeded random weights (nothing
downloaded): torchvision's CNNs and transformers, Hugging Face text, vision and audio encoders.
Each is made a two-tower model (two copies of the encoder, a 32-wide projection each, a linear
head), exported with the legacy or the dynamo exporter (dynamic batch, or static with
`--static`), and given to
`dagr-inject MODEL --train`; then, with every parameter gradient fetched:

- ONNX Runtime against PyTorch autograd in float64 (cross-entropy + DAGR, `fixtures/generate.py`),
  the largest difference of any gradient relative to that gradient's largest entry (floored at
  1e-3 of the model's largest gradient);
- tract against ONNX Runtime on the same training graph, the same measure (the floor at 1e-3 of
  ONNX Runtime's largest gradient).

    cargo build --release
    python scripts/check_real_models.py [--exporter legacy|dynamo] [--static] [--opset N] [NAME ...]   # needs torch, torchvision, transformers

`--opset N` exports with the legacy exporter at opset N (default 17; older ones, 9 to 16, are
read as opset 16 by dagr-inject itself).

Differences at 1e-6 are float32 rounding. Larger ones have had one of these causes, each shown
by a float64 reference or by the values: a ReLU or max-pooling input within rounding of its kink
(the two runtimes' convolutions round differently: AlexNet, VGG, GoogLeNet, RegNet), a
gradient zero in exact arithmetic (attention key biases: rounding noise against a tiny
maximum), an embedding's `padding_idx` row (PyTorch never updates it; the export does not
record it, so it trains here: BERT, ALBERT, ELECTRA, DeBERTa when a token id is the pad id).
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import real_model_check as R  # noqa: E402
from bench_zoo import distinct_weights  # noqa: E402
from generate import DEFAULT_CFG, dagr  # noqa: E402

B, TOKENS, VOCAB = 4, 12, 100


def torchvision_models():
    import torchvision.models as tv

    def vit():
        return tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                    mlp_dim=128, num_classes=32)

    image = ("image", (3, 64, 64))
    big = ("image", (3, 224, 224))
    return {
        "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=32), image),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=32), image),
        "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=32), image),
        "efficientnet_v2_s": (lambda: tv.efficientnet_v2_s(num_classes=32), image),
        "convnext_tiny": (lambda: tv.convnext_tiny(num_classes=32), image),
        "regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=32), image),
        "densenet121": (lambda: tv.densenet121(num_classes=32), image),
        "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=32), image),
        "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=32), image),
        "googlenet": (lambda: tv.googlenet(num_classes=32, aux_logits=False, init_weights=True), image),
        "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=32), image),
        "resnext50_32x4d": (lambda: tv.resnext50_32x4d(num_classes=32), image),
        "swin_t": (lambda: tv.swin_t(num_classes=32), image),
        "vit": (vit, image),
        "alexnet": (lambda: tv.alexnet(num_classes=32), big),
        "vgg11_bn": (lambda: tv.vgg11_bn(num_classes=32), big),
    }


class RecurrentAudio(torch.nn.Module):
    """torch.nn's recurrent layers as an audio encoder over [B, T, F] features: a two-layer
    bidirectional LSTM (batch first) averaged over time, or a GRU run time-major whose final
    hidden state is the output (the exporters' Y_h)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        if cell == "lstm":
            self.rnn = torch.nn.LSTM(16, 24, num_layers=2, bidirectional=True, batch_first=True)
            self.out = torch.nn.Linear(48, 32)
        else:
            self.rnn = torch.nn.GRU(16, 24, num_layers=2)
            self.out = torch.nn.Linear(24, 32)

    def forward(self, x):
        if self.cell == "lstm":
            h, _ = self.rnn(x)
            return self.out(h.mean(1))
        _, hn = self.rnn(x.transpose(0, 1))
        return self.out(hn[-1])


def torch_recurrent_models():
    audio = ("audio", (16, 16))
    return {
        "torch_lstm": (lambda: RecurrentAudio("lstm"), audio),
        "torch_gru": (lambda: RecurrentAudio("gru"), audio),
    }


def hf_models():
    import transformers as tf

    text, image, audio = ("text", (TOKENS,)), ("hf_image", (3, 32, 32)), ("audio", (16, 16))
    wave = ("wave", (400,))
    # wav2vec2-style: a strided conv feature extractor (GroupNorm), a grouped positional conv
    # under weight norm, a transformer
    w2v = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=2)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        "hf_bert": (lambda: tf.BertModel(tf.BertConfig(vocab_size=VOCAB, **small)), text),
        "hf_albert": (lambda: tf.AlbertModel(tf.AlbertConfig(vocab_size=VOCAB, embedding_size=16, **small)), text),
        "hf_roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(vocab_size=VOCAB, **small)), text),
        "hf_electra": (lambda: tf.ElectraModel(tf.ElectraConfig(vocab_size=VOCAB, embedding_size=16, **small)), text),
        "hf_deberta_v2": (lambda: tf.DebertaV2Model(tf.DebertaV2Config(
            vocab_size=VOCAB, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
            **small)), text),
        "hf_t5_encoder": (lambda: tf.T5EncoderModel(tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)), text),
        "hf_gpt2": (lambda: tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                                      n_positions=64)), text),
        "hf_llama": (lambda: tf.LlamaModel(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)), text),
        "hf_vit": (lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)), image),
        "hf_deit": (lambda: tf.DeiTModel(tf.DeiTConfig(image_size=32, patch_size=8, **small)), image),
        "hf_swin": (lambda: tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                       num_heads=[1, 2], window_size=2)), image),
        "hf_convnext": (lambda: tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                   num_channels=3)), image),
        "hf_whisper_encoder": (lambda: tf.WhisperModel(tf.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=8, vocab_size=VOCAB,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).encoder, audio),
        # CLIP's towers, pooled as CLIP pools them (text: each sequence's end-of-text token)
        "hf_clip_text": (lambda: tf.CLIPTextModel(tf.CLIPTextConfig(
            vocab_size=VOCAB, max_position_embeddings=16, **small)), ("text_pooled", (TOKENS,))),
        "hf_clip_vision": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(
            image_size=32, patch_size=8, **small)), ("hf_image_pooled", (3, 32, 32))),
        "hf_wav2vec2": (lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(feat_extract_norm="group", **w2v)), wave),
        "hf_hubert": (lambda: tf.HubertModel(tf.HubertConfig(feat_extract_norm="layer", conv_bias=True,
                                                             do_stable_layer_norm=True, **w2v)), wave),
    }


class Tower(torch.nn.Module):
    """An encoder and a 32-wide projection of its pooled output (first token, or the spatial mean;
    torchvision's models end in their own 32-class head)."""

    def __init__(self, make, kind):
        super().__init__()
        self.m, self.kind = make(), kind
        cfg = getattr(self.m, "config", None)
        if cfg is None:
            self.proj = None
            return
        h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.hidden_sizes[-1]
        self.proj = torch.nn.Linear(h, 32)
        if hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"

    def forward(self, x):
        if self.proj is None:
            return self.m(x)
        kind = self.kind.removesuffix("_pooled")
        key = {"text": "input_ids", "hf_image": "pixel_values", "audio": "input_features", "wave": "input_values"}[kind]
        out = self.m(**{key: x})
        hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.kind.endswith("_pooled"):
            hs = out.pooler_output
        elif hs.dim() == 4:
            hs = hs.mean((2, 3))
        elif kind == "wave":
            hs = hs.mean(1)
        else:
            hs = hs[:, 0]
        return self.proj(hs)


class Pair(torch.nn.Module):
    def __init__(self, make, kind):
        super().__init__()
        self.visual_encoder = Tower(make, kind)
        self.depth_encoder = Tower(make, kind)
        self.head = torch.nn.Linear(64, 10)

    def encode(self, a, b):
        return [self.visual_encoder(a), self.depth_encoder(b)]

    def forward(self, a, b):
        return self.head(torch.cat(self.encode(a, b), dim=1))


def build(make, kind, shape):
    torch.manual_seed(0)
    model = distinct_weights(Pair(make, kind)).eval()
    g = torch.Generator().manual_seed(5)
    if kind.startswith("text"):
        inputs = [torch.randint(0, VOCAB, (B, *shape), generator=g) for _ in range(2)]
    else:
        inputs = [torch.randn(B, *shape, generator=g) for _ in range(2)]
    y = torch.randint(0, 10, (B,), generator=g)
    return model, inputs, y


def export(model, inputs, path, exporter, static=False, opset=17):
    names = ["image", "depth"]
    if exporter == "legacy":
        axes = None if static else {k: {0: "batch"} for k in names + ["logits"]}
        torch.onnx.export(model, tuple(inputs), path, dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=False)
    else:
        batch = torch.export.Dim("batch", min=2)
        ep = torch.onnx.export(model, tuple(inputs), dynamo=True, input_names=names, output_names=["logits"],
                               dynamic_shapes=None if static else ({0: batch}, {0: batch}), optimize=False)
        ep.save(path)


def check(name, make, kind, shape, args, tmp):
    exporter, static = args.exporter, args.static
    model, inputs, y = build(make, kind, shape)
    src = os.path.join(tmp, f"{name}.{exporter}.onnx")
    export(model, inputs, src, exporter, static, args.opset)
    train = os.path.join(tmp, f"{name}.{exporter}.train.onnx")
    try:
        R.build_training_graph(src, train, ["visual_encoder", "depth_encoder"], "logits")
    except R.Refused as e:
        return str(e)
    feed = {"image": inputs[0].numpy(), "depth": inputs[1].numpy(), "y": y.numpy()}
    ours, nodes = R.ort_gradients(train, feed)

    m64 = copy.deepcopy(model).double()
    zs = m64.encode(*[x.double() if x.is_floating_point() else x for x in inputs])
    loss = F.cross_entropy(m64.head(torch.cat(zs, 1)), y) + dagr(zs, DEFAULT_CFG)[0]
    loss.backward()
    ref = {f"{n}_grad": p.grad.numpy() for n, p in m64.named_parameters() if p.grad is not None}
    worst, worst_name, compared = R.against_reference(ours, ref)
    tract = R.tract_against_ort(train, feed, ours, tmp, name)
    flow = R.verify_and_train(src, train, feed, B, tmp)
    return (f"{nodes} nodes, {len(ours)} gradients, {compared} against float64 autograd: worst "
            f"{worst:.1e} ({worst_name}{R.graph_in_float64(train, feed, ours, ref, worst, worst_name)}); {tract}; "
            f"{flow}")


if __name__ == "__main__":
    R.sweep({**torchvision_models(), **torch_recurrent_models(), **hf_models()}, check, exporters=["legacy", "dynamo"])
