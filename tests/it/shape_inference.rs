//! Shape inference against what ONNX Runtime actually computes (every intermediate tensor of
//! every exported model, value_info removed so that our inference does all the work), and
//! property tests of broadcasting.

use crate::common::*;
use dagr_inject::onnx::{self, Dim};
use dagr_inject::ops::{self, infer::broadcast};
use dagr_inject::runtime::Backend;
use proptest::prelude::*;

#[test]
fn inferred_shapes_match_onnx_runtime_on_every_model() {
    let dir = tempfile::tempdir().unwrap();
    for path in models() {
        let mut m = onnx::load(&path).unwrap();
        m.source = None;
        m.graph_mut().value_info.clear();
        let idx = ops::index(&m).unwrap();
        // Expose every node output whose shape we inferred.
        let mut exposed = m.clone();
        let mut names = Vec::new();
        let known: Vec<_> = m.graph().node.iter().flat_map(|n| n.output.clone()).collect();
        for t in known {
            if t.is_empty() || m.graph().output.iter().any(|o| o.name == t) {
                continue;
            }
            let Some(f) = idx.fact(&t) else { continue };
            if f.shape.is_none() || f.dtype != 1 {
                continue;
            }
            exposed.graph_mut().output.push(f.to_value_info(&t));
            names.push(t);
        }
        let p = dir.path().join("exposed.onnx");
        onnx::save(&exposed, &p).unwrap();
        let feed = model_inputs(&path);
        let env = bindings(&idx, &feed);
        let out = run(Backend::Ort, &p, &feed, &names);
        let mut checked = 0;
        for t in &names {
            let got = out[t].shape();
            let want = idx.fact(t).unwrap().shape.clone().unwrap();
            assert_eq!(got.len(), want.len(), "{}: rank of {t}", path.display());
            for (g, w) in got.iter().zip(&want) {
                if let Some(v) = w.eval(&env) {
                    assert_eq!(*g as i64, v, "{}: {t} is {got:?}, inferred {want:?}", path.display());
                }
            }
            checked += 1;
        }
        assert!(checked >= 5, "{}: only {checked} shapes inferred", path.display());
    }
}

fn dims() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..4, 0..4)
}

proptest! {
    /// Our broadcast agrees with ndarray's (numpy semantics) whenever the shapes broadcast.
    #[test]
    fn broadcast_agrees_with_ndarray(a in dims(), b in dims(), ones in prop::collection::vec(any::<bool>(), 4)) {
        // Make some dims 1 so that broadcasting is exercised, not only equal shapes.
        let a: Vec<usize> = a.iter().enumerate().map(|(i, &d)| if ones[i % 4] { 1 } else { d }).collect();
        let x = ndarray::ArrayD::<f32>::zeros(a.clone());
        let y = ndarray::ArrayD::<f32>::zeros(b.clone());
        let ours = broadcast(&[
            a.iter().map(|&d| Dim::Known(d as i64)).collect(),
            b.iter().map(|&d| Dim::Known(d as i64)).collect(),
        ]);
        if let Ok(sum) = std::panic::catch_unwind(|| &x + &y) {
            let want: Vec<Dim> = sum.shape().iter().map(|&d| Dim::Known(d as i64)).collect();
            prop_assert_eq!(ours, want);
        }
    }

    /// A symbolic dim broadcast against 1 stays symbolic; against itself, too.
    #[test]
    fn symbolic_dims_survive_broadcast(rank in 1usize..4) {
        let a: Vec<Dim> = (0..rank).map(|_| Dim::Sym("batch".into())).collect();
        let b: Vec<Dim> = (0..rank).map(|_| Dim::Known(1)).collect();
        prop_assert_eq!(broadcast(&[a.clone(), b]), a.clone());
        prop_assert_eq!(broadcast(&[a.clone(), a.clone()]), a);
    }
}

/// The check run on every graph before it is written catches what no runtime would load.
#[test]
fn emitted_graph_check_names_the_broken_node() {
    use dagr_inject::onnx::builder::Builder;
    let base = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    ops::infer::check(&base).unwrap();
    let x = base.graph().input[0].name.clone();
    // A Reshape to [-1, -1].
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    let s = b.const_i64(&[-1, -1]);
    let y = b.op("Reshape", &[&x, &s], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = ops::infer::check(&m).unwrap_err().to_string();
    assert!(
        e.contains("internal error") && e.contains("Reshape") && e.contains("more than one -1"),
        "{e}"
    );
    // A ScatterND whose updates have the wrong rank (the scalar-index Gather bug).
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    // indices [1] pick one row: the updates must be that row, rank 1, not rank 2.
    let idx = b.const_i64(&[0]);
    let y = b.op("ScatterND", &[&x, &idx, &x], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = ops::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("ScatterND") && e.contains("rank"), "{e}");
    // A Gather along an axis its input does not have (the first Det rule's minors).
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    let idx = b.const_i64(&[0]);
    let y = b.op(
        "Gather",
        &[&x, &idx],
        vec![dagr_inject::onnx::builder::attr_int("axis", 2)],
        "bad",
    );
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = ops::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("Gather") && e.contains("axis 2 is outside [-2, 1]"), "{e}");
    // An operator newer than the model's opset (Gelu is opset 20's; av_mlp's opset is 17).
    let mut m = base.clone();
    assert_eq!(m.opset(), 17);
    let mut b = Builder::new(&m, "t/");
    let y = b.op("Gelu", &[&x], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = ops::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("Gelu exists from opset 20 on, and the model's is 17"), "{e}");
    // A node reading a tensor nothing defines.
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    let y = b.op("Relu", &["nowhere"], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = ops::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("'nowhere'"), "{e}");
}

/// Control flow, quantization and data-dependent sizes (ops symbolic_shape_infer.py covers):
/// a model written by onnx.helper with If (condition from an input), Loop (a carried value and
/// a scan output), Scan, QuantizeLinear and DequantizeLinear, Compress and NonMaxSuppression.
/// Every dim we infer as known equals what ONNX Runtime computes, and every output has a rank.
#[test]
fn control_flow_and_quantization_shapes_match_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.onnx");
    let script = r#"
import sys, onnx
from onnx import helper as h, TensorProto as T
f = T.FLOAT
def vi(n, t, s): return h.make_tensor_value_info(n, t, s)
then_g = h.make_graph([h.make_node("Relu", ["x"], ["t_out"])], "then", [], [vi("t_out", f, ["b", 6])])
else_g = h.make_graph([h.make_node("Neg", ["x"], ["e_out"])], "else", [], [vi("e_out", f, ["b", 6])])
loop_body = h.make_graph(
    [h.make_node("Identity", ["cond_in"], ["cond_out"]),
     h.make_node("Add", ["acc_in", "x"], ["acc_out"]),
     h.make_node("Mul", ["acc_out", "x"], ["scan_out"])],
    "loop", [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("acc_in", f, ["b", 6])],
    [vi("cond_out", T.BOOL, []), vi("acc_out", f, ["b", 6]), vi("scan_out", f, ["b", 6])])
scan_body = h.make_graph(
    [h.make_node("Add", ["s_in", "row"], ["s_out"]), h.make_node("Relu", ["s_out"], ["r_out"])],
    "scan", [vi("s_in", f, [6]), vi("row", f, [6])], [vi("s_out", f, [6]), vi("r_out", f, [6])])
nodes = [
    h.make_node("If", ["flag"], ["if_out"], then_branch=then_g, else_branch=else_g),
    h.make_node("Loop", ["trips", "", "x"], ["loop_acc", "loop_scan"], body=loop_body),
    h.make_node("Scan", ["zero6", "x"], ["scan_state", "scan_rows"], body=scan_body, num_scan_inputs=1),
    h.make_node("QuantizeLinear", ["x", "qs", "qz"], ["q"]),
    h.make_node("DequantizeLinear", ["q", "qs", "qz"], ["dq"]),
    h.make_node("Compress", ["x", "keep"], ["kept"], axis=1),
    h.make_node("NonMaxSuppression", ["boxes", "scores"], ["picked"]),
]
inits = [
    h.make_tensor("trips", T.INT64, [], [3]),
    h.make_tensor("zero6", f, [6], [0.0] * 6),
    h.make_tensor("qs", f, [], [0.05]),
    h.make_tensor("qz", T.UINT8, [], [128]),
    h.make_tensor("keep", T.BOOL, [6], [1, 0, 1, 1, 0, 0]),
]
g = h.make_graph(nodes, "control",
    [vi("x", f, ["b", 6]), vi("flag", T.BOOL, []), vi("boxes", f, [1, 4, 4]), vi("scores", f, [1, 1, 4])],
    [vi(n, f, None) for n in ["if_out", "loop_acc", "loop_scan", "scan_state", "scan_rows", "dq", "kept"]]
    + [vi("q", T.UINT8, None), vi("picked", T.INT64, None)], inits)
m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
m.ir_version = 8
onnx.save(m, sys.argv[1])
"#;
    let out = std::process::Command::new(venv_python())
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = onnx::load(&path).unwrap();
    let idx = ops::index(&m).unwrap();
    let mut feed = dagr_inject::runtime::Tensors::new();
    let f = |s: &[usize], v: Vec<f32>| {
        dagr_inject::runtime::Value::F32(ndarray::ArrayD::from_shape_vec(s.to_vec(), v).unwrap())
    };
    feed.insert("x".into(), f(&[2, 6], (0..12).map(|i| i as f32 * 0.1 - 0.5).collect()));
    feed.insert(
        "flag".into(),
        dagr_inject::runtime::Value::Bool(ndarray::ArrayD::from_shape_vec(vec![], vec![true]).unwrap()),
    );
    feed.insert(
        "boxes".into(),
        f(
            &[1, 4, 4],
            vec![0., 0., 1., 1., 0., 0.1, 1., 1.1, 0., 5., 1., 6., 0., 5.1, 1., 6.1],
        ),
    );
    feed.insert("scores".into(), f(&[1, 1, 4], vec![0.9, 0.8, 0.7, 0.6]));
    // uint8 (the quantized tensor) is not a type the runtime layer reads back: its fact is
    // checked here, its value through DequantizeLinear.
    let q = idx.fact("q").unwrap();
    assert_eq!((q.dtype, q.shape_string()), (onnx::dtype::UINT8, "[b, 6]".to_string()));
    let names: Vec<String> = m
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .filter(|n| n != "q")
        .collect();
    let got = run(Backend::Ort, &path, &feed, &names);
    let env = bindings(&idx, &feed);
    for n in &names {
        let want = idx
            .fact(n)
            .and_then(|f| f.shape.clone())
            .unwrap_or_else(|| panic!("{n}: no shape inferred"));
        let g = got[n].shape();
        assert_eq!(want.len(), g.len(), "{n}: rank");
        for (w, &d) in want.iter().zip(g) {
            if let Some(v) = w.eval(&env) {
                assert_eq!(v, d as i64, "{n}: inferred {want:?}, ONNX Runtime {g:?}");
            }
        }
    }
}

/// tract 0.23 reads ONNX's Cast to int64 as a cast to its symbolic dim type, which holds an
/// int64 through 32 bits while tract analyses the graph and which CumSum cannot sum. A Slice
/// ending at `Cast(Constant(INT64_MAX))` (what the dynamo exporter writes for `x[:, 0]`) kept
/// 3 rows of 4, so a dynamo-exported ViT ran with a sample fewer than fed; RoBERTa's position
/// ids, a CumSum of a Cast to int64, did not run. The tract backend gives each Cast to int64 as
/// a CastLike of an int64: both backends compute both graphs alike, whatever end past the rows
/// the Cast carries.
#[test]
fn casts_to_int64_compute_on_tract_as_on_onnx_runtime() {
    use dagr_inject::onnx::builder::{attr_int, attr_ints, attr_tensor};
    use dagr_inject::onnx::proto::NodeProto;
    use dagr_inject::onnx::tensor::i64_tensor;
    use dagr_inject::runtime::{Tensors, Value};
    let dir = tempfile::tempdir().unwrap();
    let node = |op: &str, inputs: &[&str], output: &str, attrs| {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = output.into();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.into()];
        n.attribute = attrs;
        n
    };
    let graph = |nodes: Vec<NodeProto>, dtype: i32, initializer| {
        let mut m = onnx::load(&root().join("models").join("av_mlp.legacy.onnx")).unwrap();
        m.source = None;
        let g = m.graph_mut();
        g.node = nodes;
        g.initializer = initializer;
        g.input = vec![onnx::ValueFact::new(dtype, vec![Dim::sym("b"), Dim::Known(5)]).to_value_info("x")];
        g.output = vec![onnx::ValueFact::new(dtype, vec![Dim::sym("b"), Dim::Known(5)]).to_value_info("y")];
        g.value_info.clear();
        let path = dir.path().join("cast.onnx");
        onnx::save(&m, &path).unwrap();
        path
    };
    let x = ndarray::Array2::from_shape_fn((4, 5), |(i, j)| (i * 5 + j) as f32).into_dyn();
    let feed: Tensors = [("x".to_string(), Value::F32(x.clone()))].into();
    for end in [i64::MAX, 1 << 31, (1 << 32) + 2] {
        let path = graph(
            vec![
                node(
                    "Constant",
                    &[],
                    "end0",
                    vec![attr_tensor("value", i64_tensor("", &[], &[end]))],
                ),
                node("Cast", &["end0"], "end1", vec![attr_int("to", 7)]),
                node("Constant", &[], "flat", vec![attr_ints("value_ints", &[-1])]),
                node("Reshape", &["end1", "flat"], "end", vec![]),
                node("Slice", &["x", "zero", "end", "zero"], "y", vec![]),
            ],
            1,
            vec![i64_tensor("zero", &[1], &[0])],
        );
        for backend in [Backend::Tract, Backend::Ort] {
            let y = f32_of(&run(backend, &path, &feed, &["y".into()]), "y");
            assert_eq!(y, x, "{backend:?}, end {end}");
        }
    }
    // RoBERTa's position ids: the running count of the tokens that are not padding.
    let path = graph(
        vec![
            node("Equal", &["x", "pad"], "is_pad", vec![]),
            node("Not", &["is_pad"], "kept", vec![]),
            node("Cast", &["kept"], "kept32", vec![attr_int("to", 6)]),
            node("Cast", &["kept32"], "kept64", vec![attr_int("to", 7)]),
            node("CumSum", &["kept64", "one"], "y", vec![]),
        ],
        7,
        vec![i64_tensor("pad", &[], &[1]), i64_tensor("one", &[], &[1])],
    );
    let ids = ndarray::Array2::from_shape_fn((4, 5), |(i, j)| ((i + 2 * j) % 3) as i64).into_dyn();
    let feed: Tensors = [("x".to_string(), Value::I64(ids.clone()))].into();
    let mut want = ids.mapv(|v| i64::from(v != 1));
    for mut row in want.rows_mut() {
        let mut sum = 0;
        for v in row.iter_mut() {
            sum += *v;
            *v = sum;
        }
    }
    for backend in [Backend::Tract, Backend::Ort] {
        let out = run(backend, &path, &feed, &["y".into()]);
        let Some(Value::I64(y)) = out.get("y") else {
            panic!("{backend:?}: no int64 output");
        };
        assert_eq!(y, &want, "{backend:?}");
    }
}
