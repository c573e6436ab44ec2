"""What the real-model checks share (numpy, onnx and onnxruntime only; no framework): build the
training graph with `dagr-inject MODEL --train`, fetch every `<param>_grad` on ONNX Runtime, run
the same graph on tract, and compare.

Each comparison is the largest difference of a gradient relative to that gradient's largest
entry, floored at 1e-3 of the model's largest gradient (so a gradient that is zero in exact
arithmetic, rounding noise against nothing, does not dominate).

Used by `check_real_models.py` (PyTorch: torchvision, Hugging Face) and
`check_real_models_keras.py` (Keras applications and layers through tf2onnx).
"""

import os
import subprocess

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DAGR_INJECT_BIN", os.path.join(ROOT, "target", "release", "dagr-inject"))


class Refused(Exception):
    """`dagr-inject --train` (or a backend) refused the model: the message is the finding."""


def perturb(v, g, variance=False):
    """A framework's initial value moved a little, so that no two weights are equal (they are
    found in the export by value): a variance scaled up to 20% (it stays positive), anything
    else moved by 0.02 N(0, 1); integers as they are. `g`: a numpy Generator."""
    if not np.issubdtype(v.dtype, np.floating):
        return v
    if variance:
        return (v * (1 + 0.2 * g.random(v.shape))).astype(v.dtype)
    return (v + 0.02 * g.standard_normal(v.shape)).astype(v.dtype)


def rel(a, b, floor):
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), floor)


def build_training_graph(src, dst, encoders, logits, labels="y", extra=()):
    """`dagr-inject SRC --encoders ... --train --logits L --labels y -o DST`; raises `Refused`
    with the tool's message when it fails."""
    args = [BIN, src, "--train", "--logits", logits, "--labels", labels, "-o", dst, *extra]
    if encoders:
        args[2:2] = ["--encoders", ",".join(encoders)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise Refused(f"--train FAILED: {r.stderr.strip()[-600:]}")
    return r.stderr


def ort_gradients(train, feed):
    """Every `<param>_grad` of the training graph on ONNX Runtime CPU, the parameters fed from the
    graph's own initializers. Returns (gradients by output name, number of nodes)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(train, so, providers=["CPUExecutionProvider"])
    m = onnx.load(train)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    feed = dict(feed)
    for i in sess.get_inputs():
        feed.setdefault(i.name, inits.get(i.name))
    grads = [o.name for o in sess.get_outputs() if o.name.endswith("_grad")]
    return dict(zip(grads, sess.run(grads, feed))), len(m.graph.node)


def against_reference(ours, ref):
    """(worst relative difference, its gradient name, number compared) of our gradients against a
    reference keyed the same way (`<param>_grad`, in the ONNX tensor's layout)."""
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ref.values())
    pairs = [(rel(ours[k], ref[k], floor), k) for k in ours if k in ref and ref[k].shape == ours[k].shape]
    worst = max(pairs) if pairs else (float("nan"), "")
    return worst[0], worst[1], len(pairs)


def tract_against_ort(train, feed, ours, tmp, name):
    """`dagr-inject run TRAIN --backend tract` on the same feed; a line saying how far its
    gradients are from ONNX Runtime's (or why it failed)."""
    data = os.path.join(tmp, f"{name}.inputs.npz")
    np.savez(data, **feed)
    out = os.path.join(tmp, f"{name}.tract.npz")
    r = subprocess.run([BIN, "run", train, "--inputs", data, "--backend", "tract", "-o", out],
                       capture_output=True, text=True)
    if r.returncode:
        return f"tract FAILED: {r.stderr.strip()[-300:]}"
    t = np.load(out)
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ours.values())
    worst = max((rel(t[k], ours[k], floor), k) for k in ours)
    return f"tract vs ONNX Runtime {worst[0]:.1e} ({worst[1]})"


# False with `--gradients-only` (the sweep's option): verify_and_train is skipped.
FLOW = True


def verify_and_train(src, train, feed, batch, tmp):
    """The rest of a user's path: `dagr-inject verify TRAIN --original SRC` on ONNX Runtime (the
    original recomputed, the built-in DAGR reference, finite differences; tract's gradients are
    compared with ONNX Runtime's by `tract_against_ort`), then on each backend 3 steps of
    `dagr-inject train` (the feed repeated to 3 batches) with the model exported. Returns a
    line: the verdict and each backend's final loss, or the first error."""
    if not FLOW:
        return "verify and train not run (--gradients-only)"
    data = os.path.join(tmp, "train_data.npz")
    np.savez(data, **{k: np.concatenate([v] * 3) for k, v in feed.items()})
    parts = []
    r = subprocess.run([BIN, "verify", train, "--original", src, "--backend", "ort"], capture_output=True, text=True)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["?"])[0]
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith("error") or ln.rstrip().endswith("FAIL")]
        return f"verify FAILED ({(failed or [why])[0][:200]})"
    for backend in ("ort", "tract"):
        out = os.path.join(tmp, f"trained_{backend}")
        r = subprocess.run([BIN, "train", train, "--data", data, "--epochs", "1", "--batch-size", str(batch),
                            "--backend", backend, "--out", out, "--original", src, "--force"],
                           capture_output=True, text=True)
        loss = [ln for ln in (r.stdout + r.stderr).splitlines() if "final loss" in ln]
        parts.append(f"{backend}: 3 train steps " +
                     (f"to loss {loss[-1].split('final loss')[-1].strip()}" if not r.returncode and loss
                      else f"FAILED ({r.stderr.strip()[-160:]})"))
    return "verify passed; " + "; ".join(parts)


def float64_loss(train, feed, loss="dagr/total_loss"):
    """The training graph's `loss` in float64 (`float64_eval`): f(overrides) -> float."""
    f = float64_eval(train, feed, loss)
    return lambda overrides=None: float(f(overrides))


def outer_names(node):
    """Every name the subgraphs of `node` (If, Loop, Scan bodies) read, nested ones included: a
    body reads outer tensors without listing them as the node's inputs."""
    out = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                out.extend(i for i in n.input if i)
                out.extend(outer_names(n))
    return out


def _gather_elements():
    """GatherElements for ONNX's reference evaluator: onnx 1.2x's picks with `np.choose`, which
    takes at most 32 choices, and its fallback reads the first index of each row only (a
    GatherElements over a vocabulary of 100 failed with "cannot reshape array")."""
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        op_domain = ""

        def _run(self, data, indices, axis=None):
            axis = (axis or 0) % data.ndim
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices.astype(np.int64), axis),)

    return GatherElements


def _conv_transpose():
    """ConvTranspose for ONNX's reference evaluator with groups: onnx 1.2x's writes each group's
    result into one output channel ("could not broadcast input array from shape (8,2,2) into
    shape (1,2,2)" in RegNet's grouped convolutions); each group is its own ConvTranspose here."""
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as Reference

    class ConvTranspose(Reference):
        op_domain = ""

        def _run(self, X, W, B=None, group=None, **kw):
            if not group or group == 1:
                return super()._run(X, W, B, group=1, **kw)
            c = X.shape[1] // group
            ys = [super(ConvTranspose, self)._run(X[:, i * c:(i + 1) * c], W[i * c:(i + 1) * c], None, group=1,
                                                  **kw)[0] for i in range(group)]
            y = np.concatenate(ys, 1)
            if B is not None:
                y = y + B.reshape((1, -1) + (1,) * (y.ndim - 2))
            return (y.astype(X.dtype),)

    return ConvTranspose


def float64_eval(train, feed, output):
    """One output of the training graph (the loss, or a `<param>_grad`), computed in float64 by
    ONNX's reference evaluator (numpy, an implementation of every op independent of both
    runtimes): the nodes it needs, every float32 tensor, cast and constant made float64.
    Returns f(overrides) -> array, `overrides` replacing parameter values (float64 arrays)."""
    loss = output
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    m = onnx.load(train)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    need, stack = set(), [loss]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.input if i)
        stack.extend(outer_names(n))
    nodes = [n for n in g.node if id(n) in need]
    F, D = TensorProto.FLOAT, TensorProto.DOUBLE

    def widen(t):
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name) if t.data_type == F else t

    def to_double(n):
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == F:
                a.i = D
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F:
                a.t.CopyFrom(widen(a.t))
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for v in list(sub.input) + list(sub.output):
                    if v.type.tensor_type.elem_type == F:
                        v.type.tensor_type.elem_type = D
                del sub.value_info[:]
                for i, t in enumerate(sub.initializer):
                    sub.initializer[i].CopyFrom(widen(t))
                for inner in sub.node:
                    to_double(inner)

    for n in nodes:
        to_double(n)
    used = {i for n in nodes for i in n.input} | {i for n in nodes for i in outer_names(n)}
    inputs = []
    for v in g.input:
        if v.name in used:
            if v.type.tensor_type.elem_type == F:
                v.type.tensor_type.elem_type = D
            inputs.append(v)
    fed = {v.name for v in inputs}
    # Parameters are inputs with their initializer as default: fed here, so overrides apply.
    defaults = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.name in fed}
    inits = [widen(t) for t in g.initializer if t.name in used and t.name not in fed]
    out = helper.make_tensor_value_info(loss, D, None)
    m64 = helper.make_model(helper.make_graph(nodes, "f64", inputs, [out], inits), opset_imports=m.opset_import,
                            ir_version=m.ir_version)
    m64.functions.extend(m.functions)
    ev = ReferenceEvaluator(m64, new_ops=[_gather_elements(), _conv_transpose()])
    base = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in {**defaults, **feed}.items()
            if k in fed}

    def f(overrides=None):
        return ev.run(None, {**base, **(overrides or {})})[0]
    return f


def directional(f, ours, params, names, seed=0, h=1e-8):
    """Our gradients along a random direction against a central difference of the float64 loss
    `f` (`float64_loss`): jointly over `names` (parameter names) and each of up to 12 of them
    alone. The direction scales each tensor by its RMS, so the step moves every tensor by about
    `h` of its size, and again 100 h and 10000 h, the best counting: a step across a ReLU or
    max-pooling kink (a joint step over hundreds of tensors of a ResNet crosses some at 1e-6)
    measures the kink, not the gradient, while ONNX's reference LSTM does not resolve steps of
    1e-8, nor a graph with float32 operators left (DINOv3's rotary tables, whose gradients are
    1e-4 of the others) steps below 1e-4; a wrong gradient is wrong at all three.
    Returns (worst relative difference, its tensor or "joint", tensors checked)."""
    rng = np.random.default_rng(seed)
    rms = {n: float(np.sqrt((params[n].astype(np.float64) ** 2).mean())) for n in names}
    # A tensor of zeros (an initial state) is stepped like the largest of the others: a step
    # of 1e-8 of a tiny scale moves the loss less than float64 resolves.
    typical = max(rms.values(), default=1.0) or 1.0
    dirs = {n: rng.standard_normal(params[n].shape) * max(rms[n], 1e-2 * typical) for n in names}

    # The size g.d has for a random d (|g| |d|), largest over the tensors: a tensor whose
    # gradient is zero in exact arithmetic is compared against 1e-3 of it, not against noise.
    floor = 1e-3 * max((float(np.linalg.norm(ours[f"{n}_grad"]) * np.linalg.norm(dirs[n])) for n in names),
                       default=0.0)

    def one(group):
        an = sum(float((ours[f"{n}_grad"].astype(np.float64) * dirs[n]).sum()) for n in group)
        best = float("inf")
        for step in (h, 100 * h, 10000 * h):
            plus = {n: params[n].astype(np.float64) + step * dirs[n] for n in group}
            minus = {n: params[n].astype(np.float64) - step * dirs[n] for n in group}
            fd = (f(plus) - f(minus)) / (2 * step)
            best = min(best, abs(fd - an) / max(abs(fd), abs(an), floor, 1e-12))
        return best

    alone = [names[i] for i in np.linspace(0, len(names) - 1, min(12, len(names))).astype(int)] if names else []
    results = [(one(names), "joint")] if names else []
    results += [(one([n]), n) for n in dict.fromkeys(alone)]
    worst = max(results) if results else (float("nan"), "")
    return worst[0], worst[1], len(dict.fromkeys(alone))


def gate_rows(v, perm):
    """`v` with its first axis cut into len(perm) gate blocks, reordered by perm."""
    return np.concatenate([np.split(v, len(perm), axis=0)[k] for k in perm], axis=0)


def match_recurrent(value, tensors):
    """Where an exporter put a framework's LSTM or GRU weight in an ONNX LSTM/GRU input, its gates
    reordered (Keras and Paddle write LSTM gates i f c o, ONNX i o f c): a kernel [G*H, in]
    (Paddle, PyTorch) or [in, G*H] (Keras) as one direction of W or R [dirs, G*H, in]; a bias
    [G*H] as either half of B [dirs, 2*G*H] (Keras's one bias, or Paddle's input and recurrent
    biases); Keras's GRU bias [2, G*H] as all of it. Returns (tensor, index into it, a function
    laying the framework's gradient out as that part of the tensor), or None."""
    import itertools

    for gates in (4, 3):
        if value.ndim == 1 and value.size % gates == 0:
            layouts = [("bias", lambda g: g)]
        elif value.ndim == 2 and value.shape[0] == 2 and value.shape[1] % gates == 0:
            layouts = [("bias2", lambda g: g)]
        elif value.ndim == 2:
            layouts = [("kernel", f) for ok, f in ((value.shape[0] % gates == 0, lambda g: g),
                                                   (value.shape[1] % gates == 0, lambda g: g.T)) if ok]
        else:
            continue
        for kind, lay in layouts:
            for perm in itertools.permutations(range(gates)):
                def put(g, lay=lay, perm=perm, kind=kind):
                    g = lay(g)
                    return np.concatenate([gate_rows(g[0], perm), gate_rows(g[1], perm)]) if kind == "bias2" \
                        else gate_rows(g, perm)
                w = put(value)
                for name, a in tensors.items():
                    if kind == "kernel" and a.ndim == 3 and a.shape[1:] == w.shape:
                        for d in range(a.shape[0]):
                            if np.array_equal(a[d], w):
                                return name, (d,), put
                    if kind != "kernel" and a.ndim == 2 and a.shape[1] >= w.size:
                        for d in range(a.shape[0]):
                            for start in dict.fromkeys((0, a.shape[1] - w.size)):
                                if np.array_equal(a[d, start:start + w.size], w):
                                    return name, (d, slice(start, start + w.size)), put
    return None


def graph_in_float64(train, feed, ours, ref, worst, name):
    """Where our float32 gradient is far from the reference (above 1e-4), the same gradient of our
    training graph computed in float64 (`float64_eval`) against the reference: near 1e-7, the
    graph is exact and float32 rounding in the model moves the gradient that much (a ReLU or
    max-pooling input within rounding of its kink, an ill-conditioned layer); large, a rule is
    wrong or the graph is not the framework's function there. Returns text for the report."""
    if not worst > 1e-4 or name not in ours or name not in ref:
        return ""
    try:
        g64 = float64_eval(train, feed, name)()
    except Exception as e:  # ONNX's reference evaluator does not run every graph (a Loop body)
        return f"; our graph in float64 not computed ({type(e).__name__})"
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ref.values())
    return f"; that gradient of our graph in float64: {rel(g64, ref[name], floor):.1e}"


def compare_with_framework(src, train, feed, ours, weights, grads, tmp, name, framework):
    """Our gradients against a framework's own (float64) for every framework weight found in the
    exported graph: by value up to an axis permutation (`common.match`), or inside an ONNX
    LSTM/GRU input (`match_recurrent`). `weights`: key -> the value exported; `grads`: key -> its
    gradient (None where the loss does not reach it). Tensors the training graph trains that hold
    no framework weight (what the exporter folded: BatchNorm into the convolution before it)
    are checked by directional differences of the graph's loss in float64 instead. Returns the
    report's text."""
    import common as C  # models/frameworks/common.py, on the caller's path

    tensors = C.onnx_float_tensors(src)
    # What the training graph trains, by its own names: a constant of a function nested in a
    # function (jax2onnx's GPT) is named there as dagr-inject inlined it.
    for t in onnx.load(train).graph.initializer:
        if f"{t.name}_grad" in ours and t.name not in tensors:
            tensors[t.name] = onnx.numpy_helper.to_array(t)
    # Only W, R and B of a recurrent node are searched for gate blocks (a folded constant that
    # happens to hold a weight's rows, as a static batch's position table does, is not one).
    recurrent = {n.input[i] for n in onnx.load(src).graph.node if n.op_type in ("LSTM", "GRU", "RNN")
                 for i in (1, 2, 3) if i < len(n.input)}
    recurrent = {k: v for k, v in tensors.items() if k in recurrent}
    ref, missing, held, view = {}, [], set(), dict(ours)
    for k, value in weights.items():
        gr = grads.get(k)
        found = C.match(value, tensors)
        if found is not None:
            t, perm = found
            held.add(f"{t}_grad")
            if gr is not None:
                ref[f"{t}_grad"] = np.squeeze(gr).transpose(perm).reshape(tensors[t].shape)
            continue
        found = match_recurrent(value, recurrent)
        if found is None:
            missing.append(k)
            continue
        t, at, put = found
        held.add(f"{t}_grad")
        key = f"{t}_grad{list(at)}"
        if gr is not None and f"{t}_grad" in ours:
            ref[key] = put(gr).reshape(ours[f"{t}_grad"][at].shape)
            view[key] = ours[f"{t}_grad"][at]
    worst, worst_name, compared = against_reference(view, ref)
    extra = sorted(k[:-len("_grad")] for k in ours if k not in held)
    tract = tract_against_ort(train, feed, ours, tmp, name)
    line = (f"{len(ours)} gradients, {compared} against float64 {framework}: worst {worst:.1e} ({worst_name}"
            f"{graph_in_float64(train, feed, ours, ref, worst, worst_name)}); {tract}")
    if missing:
        line += f"; {len(missing)} {framework} weights folded by the exporter (not in the graph by value)"
    if extra:
        params = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(train).graph.initializer}
        line += f"; {len(extra)} trained tensors hold folded values ({extra[0]}, ...)"
        try:
            d, d_name, alone = directional(float64_loss(train, feed), ours, params, extra)
            line += (f", their gradients along a direction vs float64 differences of the graph's loss (jointly "
                     f"and {alone} alone): worst {d:.1e} ({d_name})")
        except Exception as e:  # ONNX's reference evaluator does not run every graph (a Loop body)
            line += f", not checked: ONNX's reference evaluator failed ({type(e).__name__}: {str(e)[:120]})"
    return line


def forward_difference(src, inputs, want):
    """The exported graph's first output on ONNX Runtime against the framework's (float64), the
    largest difference relative to the largest entry, and a note where the export had to be
    run without its declared shapes."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        note = ""
    except Exception as e:  # jax2onnx can declare shapes its operators contradict
        m = onnx.load(src)
        del m.graph.value_info[:]
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        note = f" (the export as written does not load in ONNX Runtime: {str(e).split('failed:')[-1][:90]}; run without its value_info)"
    got = sess.run([sess.get_outputs()[0].name], {i.name: x for i, x in zip(sess.get_inputs(), inputs)})[0]
    return float(np.abs(got - want).max() / np.abs(want).max()), note


def sweep(models, check, label=None, exporters=None):
    """The command line every real-model check shares: `[--static] [--exporter E] [--opset N] [--keep DIR]
    [NAME ...]`;
    runs `check(name, make, kind, shape, args, tmp)` for each model (each in its own temporary
    directory, removed when it is done) and prints one line per model."""
    import argparse
    import sys
    import tempfile
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--static", action="store_true", help="export with a static batch (default: dynamic)")
    if exporters:
        ap.add_argument("--exporter", choices=exporters, default=exporters[0])
    ap.add_argument("--opset", type=int, default=17,
                    help="the opset to export at where the exporter takes one (default 17; older ones are read as 16)")
    ap.add_argument("--keep", metavar="DIR", help="write each model's files to DIR/NAME and keep them")
    ap.add_argument("--gradients-only", action="store_true",
                    help="compare the gradients only, without `verify --original` and 3 `train` steps per backend")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    global FLOW
    FLOW = not args.gradients_only
    unknown = [n for n in args.names if n not in models]
    if unknown:
        sys.exit(f"unknown models {unknown}; known: {sorted(models)}")
    for name in args.names or models:
        make, (kind, shape) = models[name]
        t0 = time.time()
        try:
            if args.keep:
                tmp = os.path.join(args.keep, name)
                os.makedirs(tmp, exist_ok=True)
                line = check(name, make, kind, shape, args, tmp)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    line = check(name, make, kind, shape, args, tmp)
        except (Exception, SystemExit) as e:  # an exporter's refusal (paddle2onnx exits) is reported
            line = f"ERROR {type(e).__name__}: {str(e)[-300:]}"
        batch = "static" if args.static else "dynamic"
        opset = "" if args.opset == 17 else f", opset {args.opset}"
        print(f"{name} ({label or args.exporter}, {batch} batch{opset}): {line}; {time.time() - t0:.0f} s", flush=True)
