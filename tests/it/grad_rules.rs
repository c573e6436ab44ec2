//! The gradient rules' finite-difference cases (each family module of `dagr-ops` lists its ops'
//! cases beside their registry entries: `ops::cases()`), built into one-op models with the loss
//! sum(y^2 (0.5 + 0.2 y)): central differences of the loss against the rule's gradient for every
//! float input, on the backends each case names; the same gradients with symbolic dims; the
//! output shapes against ONNX Runtime. `every_rule_has_a_case` and
//! `every_rule_has_an_inference_rule` fail when the registry gains an op without either.

use crate::common::*;
use dagr_inject::autodiff as grad;
use dagr_inject::onnx::builder::{attr_int, Builder};
use dagr_inject::onnx::proto::{GraphProto, NodeProto};
use dagr_inject::onnx::{self, dtype, tensor, Dim, Model, ValueFact};
use dagr_inject::ops::cases::{case, ints, x, Case, Gen, In, Runs};
use dagr_inject::ops::{self, Kind};
use dagr_inject::runtime::{Backend, Runner, Tensors, Value};
use ndarray::ArrayD;
use std::collections::HashSet;

/// The backends a case runs on.
fn backends(c: &Case) -> &'static [Backend] {
    match c.runs {
        Runs::Both => &[Backend::Tract, Backend::Ort],
        Runs::OrtOnly => &[Backend::Ort],
        Runs::TractOnly => &[Backend::Tract],
    }
}

fn cases() -> Vec<Case> {
    ops::cases()
}

fn values(n: usize, gen: Gen, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(12345);
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    match gen {
        Gen::ZerosAt(at) => {
            let mut v = values(n, Gen::AwayFromZero, seed);
            for &i in at.iter().filter(|&&i| i < n) {
                v[i] = 0.0;
            }
            v
        }
        Gen::AwayFromZero => (0..n)
            .map(|_| {
                let m = 0.2 + 1.8 * next();
                if next() < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect(),
        Gen::Positive => (0..n).map(|_| 0.5 + 1.5 * next()).collect(),
        Gen::Unit => (0..n)
            .map(|_| {
                let m = 0.1 + 0.7 * next();
                if next() < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect(),
        Gen::AboveOne => (0..n).map(|_| 1.2 + 1.8 * next()).collect(),
        Gen::Distinct => {
            let mut idx: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = (next() * (i + 1) as f32) as usize % (i + 1);
                idx.swap(i, j);
            }
            idx.iter().map(|&k| k as f32 * 0.05 - n as f32 * 0.025 + 0.01).collect()
        }
    }
}

/// The values of case `ci`'s differentiated inputs.
fn feed_for(c: &Case, ci: usize) -> Tensors {
    let mut feed = Tensors::new();
    for (i, inp) in c.inputs.iter().enumerate() {
        if let In::X(s) | In::Captured(s) = inp {
            let n: usize = s.iter().product();
            let mut v = values(n, c.gen, (ci * 31 + i) as u64);
            if c.gen == Gen::Distinct {
                // Each input's grid shifted by its own fraction of the spacing, so that values of
                // different inputs never meet either (a tie across inputs, as Max or a scatter
                // with reduction max compares them, within the differences' step).
                v.iter_mut().for_each(|x| *x += i as f32 * 0.00625);
            }
            feed.insert(
                format!("in{i}"),
                Value::F32(ArrayD::from_shape_vec(s.clone(), v).unwrap()),
            );
        }
        if let In::FedInts(d, v) = inp {
            let shape: Vec<usize> = d.iter().map(|&k| k as usize).collect();
            feed.insert(
                format!("in{i}"),
                Value::I64(ArrayD::from_shape_vec(shape, v.clone()).unwrap()),
            );
        }
    }
    feed
}

/// The one-op model, its loss, and the gradient outputs `<input>_grad`.
fn build(c: &Case) -> (Model, Vec<String>) {
    try_build(c).unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

fn try_build(c: &Case) -> Result<(Model, Vec<String>), dagr_inject::Error> {
    try_build_with(c, false)
}

/// The case's single-op model with its loss and the rule's gradient outputs, or the error the
/// gradient engine gave; with `symbolic`, every dim of the first input except those of size 1
/// and the channels of an image or signal is declared symbolic (`in0_d2`), as the activations
/// of a model exported with dynamic axes (weights, channels and broadcast dims stay static, as
/// exporters write them).
fn try_build_with(c: &Case, symbolic: bool) -> Result<(Model, Vec<String>), dagr_inject::Error> {
    let mut g = GraphProto::new();
    g.name = c.name.into();
    let mut node = NodeProto::new();
    node.op_type = c.op.into();
    node.name = format!("op/{}", c.op);
    node.attribute = c.attrs.clone();
    let mut wrt = Vec::new();
    for (i, inp) in c.inputs.iter().enumerate() {
        let name = format!("in{i}");
        match inp {
            In::X(s) => {
                let dims = s
                    .iter()
                    .enumerate()
                    .map(|(k, &d)| {
                        let sym = match &c.symbolic {
                            Some(ks) => ks.contains(&k),
                            None => d != 1 && !(k == 1 && s.len() >= 3),
                        };
                        match symbolic && i == 0 && sym {
                            true => Dim::sym(&format!("{name}_d{k}")),
                            false => Dim::Known(d as i64),
                        }
                    })
                    .collect();
                let f = ValueFact::new(dtype::FLOAT, dims);
                g.input.push(f.to_value_info(&name));
                wrt.push(name.clone());
            }
            In::Captured(s) => {
                let dims = s.iter().map(|&d| Dim::Known(d as i64)).collect();
                g.input.push(ValueFact::new(dtype::FLOAT, dims).to_value_info(&name));
                wrt.push(name);
                continue;
            }
            In::Ints(d, v) => g.initializer.push(tensor::i64_tensor(&name, d, v)),
            In::FedInts(d, _) => {
                let dims = d.iter().map(|&k| Dim::Known(k)).collect();
                g.input.push(ValueFact::new(dtype::INT64, dims).to_value_info(&name));
            }
            In::F(d, v) => g.initializer.push(tensor::f32_tensor(&name, d, v)),
            In::B(d, v) => {
                let mut t = tensor::i64_tensor(&name, d, &[]);
                t.data_type = dtype::BOOL;
                t.raw_data = v.iter().map(|&b| b as u8).collect();
                g.initializer.push(t);
            }
            In::I32(d, v) => {
                let mut t = tensor::i64_tensor(&name, d, &[]);
                t.data_type = dtype::INT32;
                t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                g.initializer.push(t);
            }
            In::Absent => {
                node.input.push(String::new());
                continue;
            }
        }
        node.input.push(name);
    }
    if c.op == "Dropout" {
        let mut t = tensor::i64_tensor("in_training", &[], &[]);
        t.data_type = dtype::BOOL;
        t.raw_data = vec![0];
        g.initializer.push(t);
        node.input.push("in_training".into());
    }
    node.output = (0..c.outputs).map(|i| format!("y{i}")).collect();
    g.node.push(node);
    let mut model = model_of(g, c.opset);

    // loss = sum(y (0.3 + y (0.5 + 0.2 y))), in float32: not symmetric in y, so that ops whose
    // output has invariant moments (training-mode normalization) still get a non-zero gradient,
    // and with a non-zero derivative at y = 0 (where ReduceProd over a zero lands).
    let mut b = Builder::new(&model, "t/");
    let mut terms = Vec::new();
    for k in 0..c.loss_outputs {
        let y = if c.op == "Cast" {
            b.cast(&format!("y{k}"), dtype::FLOAT, "loss")
        } else {
            format!("y{k}")
        };
        let sq = b.binary("Mul", &y, &y, "loss");
        let kk = b.scalar(0.2);
        let half = b.scalar(0.5);
        let ky = b.binary("Mul", &y, &kk, "loss");
        let w = b.binary("Add", &ky, &half, "loss");
        let cubic = b.binary("Mul", &sq, &w, "loss");
        let lin = b.scalar(0.3);
        let ly = b.binary("Mul", &y, &lin, "loss");
        let t = b.binary("Add", &cubic, &ly, "loss");
        terms.push(b.reduce("ReduceSum", &t, None, false, "loss"));
    }
    let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
    b.op_named("Sum", &refs, vec![], "loss");
    b.finish(&mut model);
    let idx = dagr_inject::ops::index(&model).unwrap();
    let mut b = Builder::new(&model, "g/");
    let one = b.scalar(1.0);
    let grads = grad::backward(&model, &idx, &mut b, &[("loss".into(), one)], &wrt, &HashSet::new())?;
    let mut outs = vec!["loss".to_string()];
    let mut facts = vec![ValueFact::new(dtype::FLOAT, vec![])];
    for w in &wrt {
        let gname = format!("{w}_grad");
        b.op_named("Identity", &[&grads[w]], vec![], &gname);
        outs.push(gname);
        facts.push(idx.fact(w).cloned().unwrap());
    }
    b.finish(&mut model);
    for (n, f) in outs.iter().zip(&facts) {
        model.graph_mut().output.push(f.to_value_info(n));
    }
    Ok((model, wrt))
}

/// Gather's and GatherElements' gradients scatter with reduction="add" (opset 16): below that,
/// the engine says so instead of emitting an invalid graph.
#[test]
fn gather_gradients_below_opset_16_say_why() {
    for op in ["Gather", "GatherElements"] {
        let idx = if op == "Gather" {
            ints(&[1, 0])
        } else {
            In::Ints(vec![2, 2], vec![1, 0, 2, 2])
        };
        let c = case("gather_opset15", op, vec![x(&[2, 3]), idx]).opset(15);
        let e = try_build(&c).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("opset 16"), "{op}: {e}");
    }
}

/// An op without a rule on the path to the loss is a typed error naming op and node (the first
/// element-wise op, of a few that shape inference knows, that the registry has no rule for).
#[test]
fn an_op_without_a_rule_is_named() {
    // Scatter (opsets 9 and 10, ScatterElements since) scatters float updates.
    let candidates = [(
        "Scatter",
        vec![x(&[2, 3]), In::Ints(vec![1, 3], vec![1, 0, 1]), x(&[1, 3])],
        10,
    )];
    let Some((op, inputs, opset)) = candidates
        .into_iter()
        .find(|(op, _, _)| ops::gradient_rule("", op).is_none())
    else {
        panic!("every candidate has a rule now: list an op the registry has no rule for");
    };
    let c = case("norule", op, inputs).opset(opset);
    match try_build(&c).map(|_| ()) {
        Err(dagr_inject::Error::NoGradientRule { op: o, node }) => {
            assert_eq!((o.as_str(), node.as_str()), (op, format!("op/{op}").as_str()));
        }
        other => panic!("expected NoGradientRule for {op}, got {other:?}"),
    }
}

/// Each entry declares the first schema version it covers: one of the versions in ONNX's own
/// history of the op (`ops::schemas`, generated from the onnx package), so that a node's
/// version can be compared with it.
#[test]
fn every_entry_covers_versions_onnx_defines() {
    let mut bad = Vec::new();
    for e in ops::registry() {
        match ops::schemas::VERSIONS.iter().find(|(o, _)| *o == e.op) {
            Some((_, vs)) if vs.contains(&e.since) => {}
            Some((_, vs)) => bad.push(format!(
                "{}: since {} is not one of its schema versions {vs:?}",
                e.op, e.since
            )),
            None => bad.push(format!("{}: not an operator of ONNX's default domain", e.op)),
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
    // Sorted by name: `schema_version` searches it by bisection.
    assert!(ops::schemas::VERSIONS.windows(2).all(|w| w[0].0 < w[1].0));
    // A node's version is the newest change not after the model's opset.
    assert_eq!(ops::schema_version("Softmax", 12), Some(11));
    assert_eq!(ops::schema_version("Softmax", 13), Some(13));
    assert_eq!(ops::schema_version("Gelu", 19), None);
}

/// A node of an older schema version than its entry covers is refused by name, with the
/// versions covered: Add before opset 7 broadcast by an `axis` attribute (the legacy rule), which
/// the entry does not implement.
#[test]
fn an_op_older_than_its_entry_covers_is_refused() {
    let add = ops::lookup("", "Add").unwrap();
    assert!(add.covers(7) && add.covers(21) && !add.covers(6));
    let c = case("add_opset6", "Add", vec![x(&[2, 3]), x(&[2, 3])]).opset(6);
    match try_build(&c).map(|_| ()) {
        Err(e @ dagr_inject::Error::OpVersionUnsupported { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("Add") && msg.contains("versions 7 and later") && msg.contains("version 6"),
                "{msg}"
            );
        }
        other => panic!("expected OpVersionUnsupported, got {other:?}"),
    }
}

#[test]
fn every_rule_has_a_case() {
    let covered: HashSet<&str> = cases().iter().map(|c| c.op).collect();
    let missing: Vec<&str> = ops::registry()
        .iter()
        .filter(|r| matches!(r.kind, Kind::Vjp(_) | Kind::Broadcast(_) | Kind::Body(_)) && !covered.contains(r.op))
        .map(|r| r.op)
        .collect();
    assert!(
        missing.is_empty(),
        "gradient rules without a finite-difference case: {missing:?}"
    );
}

/// An op the registry differentiates also has a shape inference rule (the gradient rules read
/// the shapes of what they meet): adding one without the other fails here.
#[test]
fn every_rule_has_an_inference_rule() {
    let inferred: HashSet<&str> = ops::infer::supported_ops().into_iter().collect();
    let missing: Vec<&str> = ops::registry()
        .iter()
        .filter(|r| r.has_gradient())
        .map(|r| r.op)
        .filter(|op| !inferred.contains(op))
        .collect();
    assert!(missing.is_empty(), "registry ops without shape inference: {missing:?}");
}

#[test]
fn every_rule_matches_central_differences() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        let (model, wrt) = build(c);
        let path = dir.path().join(format!("{}.onnx", c.name));
        onnx::save(&model, &path).unwrap();
        if c.checker_refuses.is_none() {
            checks.add(&path);
        }
        let feed = feed_for(c, ci);
        let outs: Vec<String> = std::iter::once("loss".to_string())
            .chain(wrt.iter().map(|w| format!("{w}_grad")))
            .collect();
        for &backend in backends(c) {
            let mut r = Runner::new(backend, &path, &feed, &outs)
                .unwrap_or_else(|e| panic!("{} on {}: {e}", c.name, backend.name()));
            let base = r.run(&feed).unwrap();
            let loss = |r: &mut Runner, f: &Tensors| -> f64 {
                f32_of(&r.run(f).unwrap(), "loss").iter().next().copied().unwrap() as f64
            };
            for w in &wrt {
                let g = f32_of(&base, &format!("{w}_grad"));
                let x0 = feed[w].as_f32().unwrap().clone();
                assert_eq!(g.shape(), x0.shape(), "{}: gradient of {w} has the wrong shape", c.name);
                let scale = g.iter().fold(1e-3f64, |a, v| a.max(v.abs() as f64));
                let h = 2e-3f32;
                for i in 0..x0.len() {
                    let mut p = x0.clone();
                    p.as_slice_mut().unwrap()[i] += h;
                    let mut m = x0.clone();
                    m.as_slice_mut().unwrap()[i] -= h;
                    let mut f = feed.clone();
                    f.insert(w.clone(), Value::F32(p));
                    let lp = loss(&mut r, &f);
                    f.insert(w.clone(), Value::F32(m));
                    let lm = loss(&mut r, &f);
                    let fd = (lp - lm) / (2.0 * h as f64);
                    let an = g.as_slice().unwrap()[i] as f64;
                    // (A NaN on either side fails: it would pass a plain `>`.)
                    if !(fd.is_finite() && an.is_finite()) || (fd - an).abs() > 1e-2 * scale + 2e-3 * fd.abs().max(1.0)
                    {
                        failures.push(format!(
                            "{} on {}: d loss / d {w}[{i}] = {fd} by differences, {an} by the rule",
                            c.name,
                            backend.name()
                        ));
                        break;
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// Every rule builds when the first input's dims are symbolic (a model exported with dynamic axes),
/// using the runtime form where a dim is not known, and gives the same gradients on ONNX
/// Runtime as with the dims known, up to float32 rounding (1e-6 of the gradient's largest
/// entry: ONNX Runtime may fuse a transpose into a product where shapes are known and sum in
/// another order).
#[test]
fn every_rule_handles_symbolic_dims() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        if !backends(c).contains(&Backend::Ort) {
            continue;
        }
        let (fixed, wrt) = build(c);
        let dynamic = match try_build_with(c, true) {
            Ok((m, _)) => m,
            Err(e) => {
                failures.push(format!("{}: {e}", c.name));
                continue;
            }
        };
        let feed = feed_for(c, ci);
        let outs: Vec<String> = wrt.iter().map(|w| format!("{w}_grad")).collect();
        let run_one = |m: &Model, tag: &str| -> Result<Tensors, String> {
            let p = dir.path().join(format!("{}.{tag}.onnx", c.name));
            onnx::save(m, &p).unwrap();
            dagr_inject::runtime::run(Backend::Ort, &p, &feed, &outs).map_err(|e| e.to_string())
        };
        match (run_one(&fixed, "fixed"), run_one(&dynamic, "symbolic")) {
            (Ok(a), Ok(b)) => {
                for o in &outs {
                    let (x, y) = (f32_of(&a, o), f32_of(&b, o));
                    let most = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
                    let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let nan = x.iter().zip(&y).any(|(p, q)| p.is_nan() != q.is_nan());
                    if x.len() != y.len() || nan || most > 1e-6 * scale {
                        failures.push(format!(
                            "{}: {o} differs with symbolic dims (by up to {most:e}, its largest entry {scale:e})",
                            c.name
                        ));
                    }
                }
            }
            (_, Err(e)) => failures.push(format!("{}: the symbolic-dims graph fails: {e}", c.name)),
            (Err(e), _) => panic!("{}: {e}", c.name),
        }
    }
    assert_no_failures(&failures);
}

/// The shape inference of every op with a case agrees with ONNX Runtime on the case's outputs
/// (the forward op's, all of them).
#[test]
fn every_case_output_shape_matches_onnx_runtime() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        if !backends(c).contains(&Backend::Ort) {
            continue;
        }
        let (mut m, _) = build(c);
        let idx = dagr_inject::ops::index(&m).unwrap();
        let names: Vec<String> = (0..c.outputs).map(|k| format!("y{k}")).collect();
        for n in &names {
            match idx.fact(n).filter(|f| f.shape.is_some()) {
                Some(f) => m.graph_mut().output.push(f.to_value_info(n)),
                None => failures.push(format!("{}: no shape inferred for {n}", c.name)),
            }
        }
        let p = dir.path().join(format!("{}.shapes.onnx", c.name));
        onnx::save(&m, &p).unwrap();
        let out = dagr_inject::runtime::run(Backend::Ort, &p, &feed_for(c, ci), &names).unwrap();
        for (k, n) in names.iter().enumerate() {
            let want: Vec<Option<i64>> = idx
                .fact(n)
                .and_then(|f| f.shape.clone())
                .unwrap_or_default()
                .iter()
                .map(Dim::known)
                .collect();
            let mut got: Vec<Option<i64>> = out[n].shape().iter().map(|&d| Some(d as i64)).collect();
            // A dim decided at run time: inference must not claim it.
            for &(o, d) in &c.run_time_dims {
                if o == k && d < got.len() {
                    got[d] = None;
                }
            }
            if want != got {
                failures.push(format!("{}: {n} inferred {want:?}, ONNX Runtime {got:?}", c.name));
            }
        }
    }
    assert_no_failures(&failures);
}

/// Where the model at `q` computes other `outs` than the one at `p` on `backend` (or fails to
/// run): one line per difference (1e-5 of each output's largest magnitude).
fn same_outputs(
    label: &str,
    backend: Backend,
    p: &std::path::Path,
    q: &std::path::Path,
    feed: &Tensors,
    outs: &[String],
) -> Vec<String> {
    let want = dagr_inject::runtime::run(backend, p, feed, outs).unwrap();
    let got = match dagr_inject::runtime::run(backend, q, feed, outs) {
        Ok(v) => v,
        Err(e) => return vec![format!("{label}: {e}")],
    };
    let mut failures = Vec::new();
    for o in outs {
        let (w, g) = (f32_of(&want, o), f32_of(&got, o));
        let scale = w.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        if w.shape() != g.shape() || w.iter().zip(g.iter()).any(|(a, b)| (a - b).abs() > 1e-5 * scale) {
            failures.push(format!("{label}: {o} differs"));
        }
    }
    failures
}

/// Every lowering (`Op::lower`: a faster equivalent form for training graphs) computes what its
/// op computes: each case of an op with one, its model lowered (the forward node), gives the
/// same loss and gradients on every backend the case runs on; some case must be lowered.
#[test]
fn every_lowering_computes_its_op() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let (mut lowered, mut failures) = (0, Vec::new());
    for (ci, c) in cases().iter().enumerate() {
        if ops::lookup("", c.op).and_then(|o| o.lower).is_none() {
            continue;
        }
        let (model, wrt) = build(c);
        let mut low = model.clone();
        let idx = dagr_inject::ops::index(&low).unwrap();
        if ops::lower(&mut low, &idx, 0..1).unwrap() == 0 {
            continue;
        }
        lowered += 1;
        assert!(
            low.graph()
                .node
                .iter()
                .all(|n| n.op_type != c.op || !n.name.starts_with("op/")),
            "{}",
            c.name
        );
        let outs: Vec<String> = std::iter::once("loss".to_string())
            .chain(wrt.iter().map(|w| format!("{w}_grad")))
            .collect();
        let (p, lp) = (
            dir.path().join(format!("{}.onnx", c.name)),
            dir.path().join(format!("{}.low.onnx", c.name)),
        );
        onnx::save(&model, &p).unwrap();
        onnx::save(&low, &lp).unwrap();
        let feed = feed_for(c, ci);
        for &backend in backends(c) {
            let label = format!("{} lowered, on {}", c.name, backend.name());
            failures.extend(same_outputs(&label, backend, &p, &lp, &feed, &outs));
        }
    }
    assert!(lowered > 0, "no case exercises a lowering");
    assert_no_failures(&failures);
}

/// Every portable form (`Op::portable_form`: the op in other standard ops, which tract's backend
/// runs in place of the ops it lacks; a `Body` entry's body) computes what its op computes: each
/// case of such an op, its nodes rewritten (`expand_bodies`), gives the same loss and gradients
/// as the op itself on ONNX Runtime (which runs both); the loss ops must be among them.
#[test]
fn every_portable_form_computes_its_op() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let (mut rewritten, mut failures) = (HashSet::new(), Vec::new());
    for (ci, c) in cases().iter().enumerate() {
        if ops::lookup("", c.op).and_then(|o| o.portable_form()).is_none() {
            continue;
        }
        let (model, wrt) = build(c);
        let mut form = model.clone();
        let idx = dagr_inject::ops::index(&form).unwrap();
        if ops::expand_bodies(&mut form, &idx, |op| op == c.op).unwrap() == 0 {
            failures.push(format!("{}: not rewritten", c.name));
            continue;
        }
        rewritten.insert(c.op);
        if form.graph().node.iter().any(|n| n.op_type == c.op) {
            failures.push(format!("{}: a {} is left", c.name, c.op));
        }
        let outs: Vec<String> = std::iter::once("loss".to_string())
            .chain(wrt.iter().map(|w| format!("{w}_grad")))
            .collect();
        let (p, fp) = (
            dir.path().join(format!("{}.onnx", c.name)),
            dir.path().join(format!("{}.form.onnx", c.name)),
        );
        onnx::save(&model, &p).unwrap();
        onnx::save(&form, &fp).unwrap();
        let feed = feed_for(c, ci);
        let label = format!("{} as its portable form", c.name);
        failures.extend(same_outputs(&label, Backend::Ort, &p, &fp, &feed, &outs));
    }
    for op in [
        "SoftmaxCrossEntropyLoss",
        "NegativeLogLikelihoodLoss",
        "LpPool",
        "Attention",
    ] {
        assert!(rewritten.contains(op), "no case of {op} exercises its portable form");
    }
    assert_no_failures(&failures);
}

/// A float16 segment (cast in, cast out, as mixed-precision exports write it): the gradient
/// graph is well typed (every constant a rule makes takes the op's float type; onnx.checker and
/// ONNX Runtime check the gradients' declared float16 outputs against their own inference) and
/// runs, and its parameter gradients equal those of the same model in float32 to float16's
/// precision.
#[test]
fn a_float16_segment_gets_float16_gradients() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let vals = |n: usize, seed: u64| {
        values(n, Gen::AwayFromZero, seed)
            .iter()
            .map(|&v| v as f64 * 0.3)
            .collect::<Vec<f64>>()
    };
    let (w, bias, scale, shift) = (vals(30, 1), vals(5, 2), vals(5, 3), vals(5, 4));
    let build_one = |half: bool| -> (Model, Vec<String>) {
        let elem = if half { dtype::FLOAT16 } else { dtype::FLOAT };
        // float32 values rounded as float16 rounds them, so that both models hold the same.
        let r = |v: &[f64]| v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect::<Vec<f64>>();
        let mut g = GraphProto::new();
        g.name = "half".into();
        g.input
            .push(ValueFact::new(dtype::FLOAT, vec![Dim::Known(4), Dim::Known(6)]).to_value_info("x"));
        for (name, dims, v) in [
            ("w", vec![6, 5], &w),
            ("b", vec![5], &bias),
            ("scale", vec![5], &scale),
            ("shift", vec![5], &shift),
        ] {
            g.initializer.push(tensor::float_tensor(name, &dims, &r(v), elem));
        }
        let mut model = model_of(g, 18);
        let mut b = Builder::new(&model, "m/");
        let x = if half {
            b.cast("x", dtype::FLOAT16, "in")
        } else {
            "x".to_string()
        };
        let h = b.binary("MatMul", &x, "w", "f");
        let h = b.binary("Add", &h, "b", "f");
        let h = b.op(
            "LayerNormalization",
            &[&h, "scale", "shift"],
            vec![attr_int("axis", -1)],
            "f",
        );
        let s = b.unary("Sigmoid", &h, "f");
        let h = b.binary("Mul", &h, &s, "f");
        let p = b.op("Softmax", &[&h], vec![attr_int("axis", -1)], "f");
        let m = b.reduce("ReduceMean", &h, Some(&[1]), true, "f");
        let h = b.binary("Sub", &h, &m, "f");
        let h = b.binary("Add", &h, &p, "f");
        let h = b.unary("Tanh", &h, "f");
        let y = if half { b.cast(&h, dtype::FLOAT, "out") } else { h };
        let sq = b.binary("Mul", &y, &y, "loss");
        b.op_named("ReduceSum", &[&sq], vec![attr_int("keepdims", 0)], "loss");
        b.finish(&mut model);
        let idx = dagr_inject::ops::index(&model).unwrap();
        let params: Vec<String> = ["w", "b", "scale", "shift"].iter().map(|s| s.to_string()).collect();
        let mut b = Builder::new(&model, "g/");
        let one = b.scalar(1.0);
        let grads = grad::backward(&model, &idx, &mut b, &[("loss".into(), one)], &params, &HashSet::new())
            .unwrap_or_else(|e| panic!("half={half}: {e}"));
        let mut outs = Vec::new();
        for w in &params {
            let o = format!("{w}_grad");
            b.op_named("Identity", &[&grads[w]], vec![], &o);
            outs.push(o);
        }
        b.finish(&mut model);
        for (w, o) in params.iter().zip(&outs) {
            let f = idx.fact(w).unwrap().clone();
            model.graph_mut().output.push(f.to_value_info(o));
        }
        ops::infer::check(&model).unwrap_or_else(|e| panic!("half={half}: {e}"));
        (model, outs)
    };
    let mut feed = Tensors::new();
    feed.insert(
        "x".into(),
        Value::F32(ArrayD::from_shape_vec(vec![4, 6], values(24, Gen::AwayFromZero, 9)).unwrap()),
    );
    let mut got = Vec::new();
    for half in [false, true] {
        let (m, outs) = build_one(half);
        let p = dir.path().join(format!("half_{half}.onnx"));
        onnx::save(&m, &p).unwrap();
        onnx_check(&p);
        got.push(
            dagr_inject::runtime::run(Backend::Ort, &p, &feed, &outs).unwrap_or_else(|e| panic!("half={half}: {e}")),
        );
    }
    for name in ["w_grad", "b_grad", "scale_grad", "shift_grad"] {
        let a = f32_of(&got[0], name);
        let h = f32_of(&got[1], name);
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&a, &h);
        assert!(
            err <= 2e-2 * scale as f64,
            "{name}: float16 {h:?} against float32 {a:?}"
        );
    }
}
