//! Shape inference against what ONNX Runtime actually computes (every intermediate tensor of
//! every exported model, value_info removed so that our inference does all the work), and
//! property tests of broadcasting.

use crate::common::*;
use dagr_inject::onnx::{self, infer::broadcast, Dim, GraphIndex};
use dagr_inject::runtime::Backend;
use proptest::prelude::*;

#[test]
fn inferred_shapes_match_onnx_runtime_on_every_model() {
    let dir = tempfile::tempdir().unwrap();
    for path in models() {
        let mut m = onnx::load(&path).unwrap();
        m.source = None;
        m.graph_mut().value_info.clear();
        let idx = GraphIndex::new(&m).unwrap();
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
    onnx::infer::check(&base).unwrap();
    let x = base.graph().input[0].name.clone();
    // A Reshape to [-1, -1].
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    let s = b.const_i64(&[-1, -1]);
    let y = b.op("Reshape", &[&x, &s], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = onnx::infer::check(&m).unwrap_err().to_string();
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
    let e = onnx::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("ScatterND") && e.contains("rank"), "{e}");
    // A node reading a tensor nothing defines.
    let mut m = base.clone();
    let mut b = Builder::new(&m, "t/");
    let y = b.op("Relu", &["nowhere"], vec![], "bad");
    b.finish(&mut m);
    m.graph_mut().output.push(onnx::ValueFact::default().to_value_info(&y));
    let e = onnx::infer::check(&m).unwrap_err().to_string();
    assert!(e.contains("'nowhere'"), "{e}");
}
