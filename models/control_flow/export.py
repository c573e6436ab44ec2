"""A small encoder with data-dependent control flow, exported as PyTorch exports it, and its
gradients by PyTorch autograd: the reference of `tests/it/train_graphs.rs`
(`control_flow_exports_match_pytorch_autograd`).

    python models/control_flow/export.py   # torch, onnx (scripts/requirements-bench.txt)

The encoder runs a recurrent cell over the time axis of `x` ([batch, time, 4]) with a Python
`for` loop, then a gate that takes one of two branches by the sign of the state's sum.
- `legacy.onnx`: `torch.jit.script` and the TorchScript exporter (opset 17, dynamic batch and
  time): the loop is a `Loop` (its trip count the time length, read at run time), the gate an
  `If` on a condition computed at run time.
- `dynamo.onnx`: the torch.export exporter (opset 18): the loop is unrolled, the gate is
  `torch.cond`, an `If`.
`ref.npz`: inputs `in/pos` and `in/neg` (the gate's then and else branches), and for each the
loss 0.5 sum(y^2) and `grad/<input>/<initializer>`: d loss / d each float initializer that holds
a parameter (transposed where the exporter stored it transposed), in float64.
"""

import os
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(6, 6)
        self.inp = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.zeros(x.size(0), 6, dtype=x.dtype)
        for t in range(x.size(1)):
            h = torch.tanh(self.cell(h) + self.inp(x[:, t]))
        return h


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, h):
        if bool(h.sum() > 0):
            return self.a(h)
        return torch.relu(self.b(h))


class CondGate(Gate):
    def forward(self, h):
        return torch.cond(h.sum() > 0, lambda h: self.a(h), lambda h: torch.relu(self.b(h)), (h,))


class Encoder(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.rec = Recurrent()
        self.gate = gate

    def forward(self, x):
        return self.gate(self.rec(x))


def model(gate_cls):
    torch.manual_seed(0)
    m = Encoder(gate_cls())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m.eval()


def main():
    warnings.simplefilter("ignore")
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    legacy = os.path.join(HERE, "legacy.onnx")
    torch.onnx.export(torch.jit.script(model(Gate)), (x,), legacy, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch"}},
                      opset_version=17, do_constant_folding=False)
    dynamo = os.path.join(HERE, "dynamo.onnx")
    prog = torch.onnx.export(model(CondGate), (x,), dynamo=True, input_names=["x"], output_names=["y"],
                             opset_version=18, optimize=False, external_data=False)
    prog.save(dynamo, external_data=False)
    m64 = model(Gate).double()
    # Two inputs, one per branch of the gate.
    ref = {}
    inputs = {}
    for seed in range(100):
        cand = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(10 + seed))
        s = float(m64.rec(cand.double()).sum())
        key = "pos" if s > 0.05 else "neg" if s < -0.05 else None
        if key and key not in inputs:
            inputs[key] = cand
        if len(inputs) == 2:
            break
    params = dict(m64.named_parameters())
    for path in (legacy, dynamo):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
        tag = os.path.basename(path)[:-5]
        for key, xin in inputs.items():
            ref[f"in/{key}"] = xin.numpy()
            m64.zero_grad()
            y = m64(xin.double())
            loss = 0.5 * (y ** 2).sum()
            loss.backward()
            ref[f"loss/{key}"] = loss.detach().numpy()
            for pname, p in params.items():
                v = p.detach().float().numpy()
                grad = p.grad.numpy() if p.grad is not None else np.zeros(p.shape)
                for iname, a in inits.items():
                    if a.dtype != np.float32:
                        continue
                    if a.shape == v.shape and np.allclose(a, v, atol=1e-7):
                        ref[f"grad/{tag}/{key}/{iname}"] = grad
                    elif v.ndim == 2 and a.shape == v.T.shape and np.allclose(a, v.T, atol=1e-7):
                        ref[f"grad/{tag}/{key}/{iname}"] = grad.T
    np.savez_compressed(os.path.join(HERE, "ref.npz"), **ref)
    for path in (legacy, dynamo):
        print(path, [n.op_type for n in onnx.load(path).graph.node if n.op_type in ("Loop", "If", "Scan")])
    print(sorted(k for k in ref if k.startswith("grad/")))


if __name__ == "__main__":
    main()
