"""What every framework's export script shares (numpy and onnx only): the batch, DAGR's
configuration, matching the framework's parameters to the exported ONNX tensors, and writing
`<name>.ref.npz` and the `index.json` entry the tests read.

Each export script computes, with its framework's own autodiff in float64, the gradients of
the training loss dagr-inject builds: the cross-entropy of every head (summed) plus DAGR
(`../../../shared/dagr-spec.md`, default configuration) on the encoder outputs.
"""

import itertools
import json
import os

import numpy as np
import onnx
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 4
CLASSES = 5
D = 16
AUDIO = (16, 8)  # time, channels
VISUAL = (12, 12, 3)  # height, width, channels (NHWC; NCHW where the framework wants it)
HEADS = ["logits", "logits_audio", "logits_visual"]
TAU, DELTA, LAMBDA_DISP, LAMBDA_ANC = 0.5, 0.5, 0.1, 0.1


def data(nchw=False):
    """The seeded batch: audio [B, T, C], visual [B, H, W, C] (or NCHW), labels; and a batch of 3."""
    g = np.random.default_rng(7)
    out = {}
    for prefix, b in (("in", BATCH), ("in3", 3)):
        a = g.standard_normal((b, *AUDIO)).astype(np.float32)
        v = g.standard_normal((b, *VISUAL)).astype(np.float32)
        if nchw:
            a = a.transpose(0, 2, 1).copy()
            v = v.transpose(0, 3, 1, 2).copy()
        out[f"{prefix}/audio"] = a
        out[f"{prefix}/visual"] = v
    out["y"] = g.integers(0, CLASSES, size=(BATCH,)).astype(np.int64)
    return out


def random_weights(shapes, seed=3):
    """Seeded weights of every parameter: distinct values, so each maps to one ONNX tensor."""
    g = np.random.default_rng(seed)
    return {k: (0.3 * g.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def pairs(b):
    return np.triu_indices(b, k=1)


def onnx_float_tensors(path):
    """Every float tensor of an exported graph that a node reads and that could hold a weight:
    initializers and the values of Constant nodes, those in local functions included. A tensor
    inside a function called by node N is named `N/<tensor>`, as dagr-inject names it when it
    inlines the function."""
    m = onnx.load(path)
    used = {i for n in m.graph.node for i in n.input}
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in used}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] in used:
            out[n.output[0]] = constant_value(n)
    functions = {(f.domain, f.name): f for f in m.functions}
    for call in m.graph.node:
        f = functions.get((call.domain, call.op_type))
        if f is None:
            continue
        inner_used = {i for n in f.node for i in n.input}
        for n in f.node:
            if n.op_type == "Constant" and n.output[0] in inner_used:
                out[f"{call.name}/{n.output[0]}"] = constant_value(n)
    return {k: v for k, v in out.items() if v is not None and v.dtype == np.float32 and v.size > 1}


def constant_value(n):
    for a in n.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def match(value, tensors):
    """The ONNX tensor holding `value` and the axis permutation (of `value` with its unit axes
    squeezed) that lays it out as stored (reshaped to the stored shape): exporters transpose
    kernels (HWIO -> OIHW), turn Conv1D into a Conv2D over a unit axis, merge axes."""
    v = np.squeeze(value)
    for name, a in tensors.items():
        if a.size != value.size:
            continue
        s = np.squeeze(a)
        if s.ndim != v.ndim:
            continue
        for perm in itertools.permutations(range(v.ndim)):
            if v.transpose(perm).shape == s.shape and np.array_equal(v.transpose(perm), s):
                return name, list(perm)
    # Else the same values in the same order, reshaped (jax2onnx stores an attention kernel
    # [in, heads, head_dim] as [in, heads * head_dim]).
    for name, a in tensors.items():
        if a.size == value.size and np.array_equal(a.reshape(-1), value.reshape(-1)):
            return name, list(range(v.ndim))
    return None


def param_map(path, values):
    """framework parameter -> [ONNX tensor, permutation]; fails loudly when one is not found."""
    tensors = onnx_float_tensors(path)
    out = {}
    for k, v in values.items():
        found = match(v, tensors)
        if found is None:
            raise SystemExit(f"{path}: parameter {k} {v.shape} is not in the exported graph")
        out[k] = list(found)
    return out


def encoder_tensors(path, ref, modalities):
    """For each modality, every tensor of the exported graph that holds the framework's encoder
    output (ONNX Runtime, every node output exposed; an exporter's Identity chains give several)."""
    import onnxruntime as ort

    m = onnx.load(path)
    names = [o for n in m.graph.node for o in n.output if o]
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: ref[f"in/{k}"] for i, k in zip(sess.get_inputs(), modalities)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    found = {}
    for k in modalities:
        want = ref[f"enc/{k}"]
        found[k] = [t for t, v in outs.items()
                    if getattr(v, "shape", None) == want.shape and np.allclose(v, want, rtol=1e-4, atol=1e-5)]
        if not found[k]:
            raise SystemExit(f"{path}: no tensor holds the {k} encoder's output")
    return found


def write(name, ref, exports, modalities):
    """`<name>.ref.npz` (float64 losses, float32 arrays) and the `index.json` entry of each export.

    `exports`: export suffix -> (path, parameter map). `ref` holds `in/<modality>`,
    `in3/<modality>`, `y`, `enc/<modality>`, `dagr/loss`, `dagr/grad/<modality>`, `total_loss`,
    `grad/<framework parameter>` (in the framework's layout). The index records per export the
    graph's inputs (in modality order) and outputs (the heads, in `HEADS` order)."""
    ref = {k: (v.astype(np.float32) if v.dtype == np.float64 and v.ndim > 0 else v) for k, v in ref.items()}
    np.savez_compressed(os.path.join(HERE, f"{name}.ref.npz"), **ref)
    index_path = os.path.join(HERE, "index.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else {}
    for suffix, (path, pmap) in exports.items():
        g = onnx.load(path).graph
        index[f"{name}.{suffix}"] = {
            "file": os.path.basename(path),
            "ref": f"{name}.ref.npz",
            "modalities": modalities,
            "inputs": [i.name for i in g.input if i.name not in {t.name for t in g.initializer}],
            "heads": [o.name for o in g.output],
            "encoder_tensors": encoder_tensors(path, ref, modalities),
            "params": pmap,
        }
    with open(index_path, "w") as f:
        json.dump(index, f, sort_keys=True, indent=1)
