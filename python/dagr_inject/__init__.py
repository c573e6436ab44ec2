"""dagr-inject from Python: add DAGR (dispersive and anchoring geometric regularization) to an
ONNX multimodal model, build its training graph, and train it, with the same library the
`dagr-inject` command runs (`pip install dagr-inject` puts that command on PATH too).

    import dagr_inject
    m = dagr_inject.inject("model.onnx", encoders=["audio_encoder", "visual_encoder"])
    t = dagr_inject.inject("model.onnx", encoders=["audio", "visual"], logits=["logits"],
                           labels="y", train=True)
    onnx.save(t, "model.train.onnx")
    logs = dagr_inject.train("model.train.onnx", data="train.npz", out="trained/", epochs=3)

Models come back as `onnx.ModelProto`; errors in what was passed raise `ValueError` with the
library's message (what was wrong and what to do).
"""

import json
import os
import warnings
from pathlib import Path

__all__ = ["inject", "block", "inspect", "train", "run"]


def _find_onnxruntime():
    """Point the native backend at the `onnxruntime` wheel's library (unless ORT_DYLIB_PATH
    already names one)."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    try:
        import onnxruntime
    except ImportError:
        return
    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*")) + sorted(capi.glob("libonnxruntime*.dylib")) + sorted(
        capi.glob("onnxruntime.dll"))
    if libs:
        os.environ["ORT_DYLIB_PATH"] = str(libs[0])


_find_onnxruntime()

from . import _native  # noqa: E402

__version__ = _native.__version__


def _model_bytes(model):
    """(bytes, directory of its external data) of a path or an onnx.ModelProto."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return p.read_bytes(), str(p.resolve().parent)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString(), None
    raise TypeError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")


def _proto(data):
    import onnx

    return onnx.load_from_string(data)


def _config(encoders, logits, labels, loss, reduce, tau, delta, lambda_disp, lambda_anc, dispersion,
            margin, variant):
    if loss is not None:
        task = {"kind": "loss", "output": loss}
    elif labels is not None:
        task = {"kind": "cross-entropy", "logits": list(logits or []), "labels": labels}
    else:
        task = {"kind": "none"}
    disp = {"kind": "rbf"} if dispersion == "rbf" else {"kind": "hinge", "margin": float(margin)}
    return json.dumps({
        "encoders": list(encoders), "reduce": reduce, "tau": float(tau), "delta": float(delta),
        "lambda_disp": float(lambda_disp), "lambda_anc": float(lambda_anc), "dispersion": disp,
        "variant": variant, "task": task,
    })


def inject(model, encoders, *, logits=None, labels=None, loss=None, train=False, freeze=(),
           trainable=(), stop_gradient=(), pareto=None, beta=0.1, no_dagr=False, reduce="flatten", tau=0.5, delta=0.5,
           lambda_disp=0.1, lambda_anc=0.1, dispersion="rbf", margin=1.0, variant="dagr",
           return_record=False):
    """DAGR added to `model` (a path or an onnx.ModelProto) on the encoders named as the
    command's `--encoders` takes them (module scopes, tensor names, `name=tensor`, or graph
    inputs where the exporter recorded no module). With `logits` and `labels`, the
    cross-entropy of each head is added; with `train=True`, the training graph
    (`<param>_grad` outputs) is built instead. Returns an onnx.ModelProto (and the record the
    rewrite stores in the model's metadata, as a dict, with `return_record=True`)."""
    data, base = _model_bytes(model)
    cfg = _config(encoders, logits, labels, loss, reduce, tau, delta, lambda_disp, lambda_anc, dispersion,
                  margin, variant)
    opts = json.dumps({"freeze": list(freeze), "trainable": list(trainable), "stop_gradient": list(stop_gradient),
                       "pareto": pareto,
                       "beta": float(beta), "no_dagr": bool(no_dagr)})
    out, record = _native.inject(data, base, cfg, train, opts)
    m = _proto(out)
    record = json.loads(record)
    for w in record.get("warnings", []):
        # What the command prints as `warning:` (DAGR's gradient reaching no parameter, tied
        # weights), as Python warnings.
        warnings.warn(w, stacklevel=2)
    return (m, record) if return_record else m


def block(modalities=2, dim=512, *, names=None, opset=18, reduce="flatten", tau=0.5, delta=0.5,
          lambda_disp=0.1, lambda_anc=0.1, dispersion="rbf", margin=1.0, variant="dagr"):
    """The standalone DAGR block: one `[batch, dim]` input per modality (named `m0`, `m1`, ...
    or `names`), DAGR's loss, terms and the gradient with respect to each input."""
    names = list(names) if names is not None else [f"m{i}" for i in range(modalities)]
    cfg = _config(names, None, None, None, reduce, tau, delta, lambda_disp, lambda_anc, dispersion, margin,
                  variant)
    return _proto(_native.block(names, int(dim), cfg, int(opset)))


def inspect(model):
    """What `dagr-inject inspect --json` reports: inputs, outputs, parameters, encoder-output
    candidates (best first), what a rewrite prepares, as a dict."""
    data, base = _model_bytes(model)
    return json.loads(_native.inspect(data, base))


def run(*args):
    """The `dagr-inject` command with these arguments, in this process; returns its exit status
    (it prints what the command prints)."""
    return _native.run_cli(["dagr-inject", *map(str, args)])


def train(model, data, out, *, val=None, original=None, epochs=1, batch_size=None, lr=None,
          optimizer=None, backend="ort", seed=None, grad_accum=None, extra=()):
    """Train a training graph (a path written from `inject(..., train=True)`) on `data` (.npz),
    as `dagr-inject train`, in this process; returns the epoch logs (`out/log.jsonl`) as dicts.
    `grad_accum`: micro-batches per step (`--grad-accum`); other flags go in `extra`.
    Raises RuntimeError when the run fails (its message is printed)."""
    args = ["train", model, "--data", data, "--out", out, "--epochs", epochs, "--backend", backend]
    for flag, v in (("--val", val), ("--original", original), ("--batch-size", batch_size), ("--lr", lr),
                    ("--optimizer", optimizer), ("--seed", seed), ("--grad-accum", grad_accum)):
        if v is not None:
            args += [flag, v]
    code = run(*args, *extra)
    if code != 0:
        raise RuntimeError(f"dagr-inject train failed (exit status {code}); its message is above")
    log = Path(out) / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
