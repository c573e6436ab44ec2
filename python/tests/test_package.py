"""The Python package as a user installs it (`pip install .` in a fresh virtual environment, see
scripts/test.sh): the API and the `dagr-inject` command on one real export (Keras through
tf2onnx), checked against TensorFlow's own values (models/frameworks/keras.ref.npz), ONNX
Runtime, onnx.checker and a NumPy DAGR."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dagr_inject

ROOT = Path(__file__).resolve().parents[2]
FW = ROOT / "models" / "frameworks"
MODEL = FW / "keras.tf2onnx.onnx"
ENTRY = json.load(open(FW / "index.json"))["keras.tf2onnx"]
REF = np.load(FW / "keras.ref.npz")
ENCODERS = ["audio_encoder", "visual_encoder"]


def feed(prefix="in"):
    return {i: REF[f"{prefix}/{m}"] for i, m in zip(ENTRY["inputs"], ENTRY["modalities"])}


def run(model, inputs, outputs):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return dict(zip(outputs, s.run(outputs, {k: v for k, v in inputs.items() if k in names})))


def numpy_dagr(zs, tau=0.5, delta=0.5, lambda_disp=0.1, lambda_anc=0.1):
    """dagr-spec.md, default configuration, in float64."""
    us = [z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12) for z in zs]
    i, j = np.triu_indices(us[0].shape[0], k=1)
    disp = []
    for u in us:
        d2 = ((u[i] - u[j]) ** 2).sum(1)
        m = (-d2 / tau).max()
        disp.append(m + np.log(np.exp(-d2 / tau - m).sum()) - np.log(len(i)))
    anc = []
    for a in range(len(us)):
        for b in range(a + 1, len(us)):
            d = np.sqrt(((us[a] - us[b]) ** 2).sum(1) + 1e-12)
            anc.append(np.maximum(d - delta, 0).mean())
    return lambda_disp * np.mean(disp) + lambda_anc * np.mean(anc)


def test_inspect_ranks_the_encoders_first():
    r = dagr_inject.inspect(str(MODEL))
    top = [c["tensor"] for c in r["encoder_candidates"][:2]]
    assert top[0] in ENTRY["encoder_tensors"]["audio"] + ENTRY["encoder_tensors"]["visual"]
    assert set(top) <= set(ENTRY["encoder_tensors"]["audio"] + ENTRY["encoder_tensors"]["visual"])
    assert r["parameters"] > 0


def test_inject_equals_tensorflow():
    m, record = dagr_inject.inject(str(MODEL), encoders=ENCODERS, return_record=True)
    onnx.checker.check_model(m, full_check=True)
    loss = record["outputs"]["loss"]
    out = run(m, feed(), [loss])
    assert abs(float(out[loss]) - float(REF["dagr/loss"])) < 1e-5
    # The model's own outputs are untouched.
    heads = ENTRY["heads"]
    before = run(onnx.load(MODEL), feed(), heads)
    after = run(m, feed(), heads)
    for h in heads:
        assert np.array_equal(before[h], after[h])


def test_inject_takes_a_model_proto_and_says_what_was_wrong():
    m = dagr_inject.inject(onnx.load(MODEL), encoders=ENCODERS)
    assert any(o.name.startswith("dagr/") for o in m.graph.output)
    with pytest.raises(ValueError, match="no tensor or module scope named 'nope'"):
        dagr_inject.inject(str(MODEL), encoders=["nope", "visual_encoder"])
    with pytest.raises(TypeError):
        dagr_inject.inject(42, encoders=ENCODERS)


def test_block_equals_numpy():
    m = dagr_inject.block(3, 8, tau=0.2)
    g = np.random.default_rng(0)
    zs = [g.standard_normal((5, 8)) for _ in range(3)]
    names = [i.name for i in m.graph.input]
    out = run(m, {n: z.astype(np.float32) for n, z in zip(names, zs)}, ["dagr/loss"])
    assert abs(float(out["dagr/loss"]) - numpy_dagr(zs, tau=0.2)) < 1e-5


def test_train_and_export(tmp_path):
    t = dagr_inject.inject(str(MODEL), encoders=ENCODERS, logits=ENTRY["heads"], labels="y", train=True)
    graph = tmp_path / "keras.train.onnx"
    onnx.save(t, graph)
    data = tmp_path / "train.npz"
    np.savez(data, y=REF["y"], **feed())
    logs = dagr_inject.train(str(graph), str(data), str(tmp_path / "run"), original=str(MODEL), epochs=2,
                             batch_size=4, lr=0.05)
    assert len(logs) == 2 and all(np.isfinite(log["loss"]) for log in logs)
    exported = onnx.load(tmp_path / "run" / "model.onnx")
    out = run(exported, feed(), ENTRY["heads"])
    before = run(onnx.load(MODEL), feed(), ENTRY["heads"])
    assert not np.array_equal(out[ENTRY["heads"][0]], before[ENTRY["heads"][0]])
    # Two micro-batches per step: the gradient graph beside the update graph.
    logs = dagr_inject.train(str(graph), str(data), str(tmp_path / "accum"), original=str(MODEL), epochs=1,
                             batch_size=4, lr=0.05, grad_accum=2)
    assert len(logs) == 1 and np.isfinite(logs[0]["loss"])
    assert (tmp_path / "accum" / "step.grad.onnx").exists()


def test_the_command_is_on_path(tmp_path):
    exe = shutil.which("dagr-inject", path=os.path.dirname(sys.executable))
    assert exe, "pip install puts dagr-inject beside the interpreter"
    o = subprocess.run([exe, "inspect", str(MODEL)], capture_output=True, text=True)
    assert o.returncode == 0, o.stderr
    assert "suggested: dagr-inject MODEL --encoders audio_encoder,visual_encoder" in o.stdout
    out = tmp_path / "m.dagr.onnx"
    o = subprocess.run([exe, str(MODEL), "--encoders", "audio_encoder,visual_encoder", "-o", str(out)],
                       capture_output=True, text=True)
    assert o.returncode == 0, o.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
    # ONNX Runtime comes with the package: `verify` runs on it with no set-up.
    o = subprocess.run([exe, "verify", str(out), "--backend", "ort"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "ORT_DYLIB_PATH"})
    assert o.returncode == 0, o.stdout + o.stderr
    bad = subprocess.run([exe, str(MODEL), "--encoders", "nope,visual_encoder", "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "nope" in bad.stderr and not (tmp_path / "x.onnx").exists()
