//! ONNX's own backend test models (the `light` set of the onnx wheel: AlexNet, DenseNet-121,
//! Inception v1 and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512), made trainable by
//! `fixtures/backend_models.py` (seeded random weights, upgraded from opset 9 to 17 with
//! onnx.version_converter, a scalar loss appended; three also kept at opset 9, which the engine
//! reads as opset 16 through `dagr_ops::upgrade`): the gradient engine differentiates each one
//! with respect to every weight, the graph passes the emitted-graph check and onnx.checker, and
//! the gradients agree with a finite difference of the loss that ONNX Runtime computes along a
//! random direction over all weights (running the model as given, the weights fed).

use crate::common::*;
use dagr_inject::autodiff as grad;
use dagr_inject::onnx::builder::Builder;
use dagr_inject::onnx::{self, dtype};
use dagr_inject::runtime::Backend;
use std::collections::HashSet;

const MODELS: &[&str] = &[
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
    // Kept at their own opset 9 (`fixtures/backend_models.py`'s OWN_OPSET): read as opset 16 by
    // `dagr_ops::upgrade`, the finite differences run on the opset-9 model as ONNX Runtime reads it.
    "inception_v2.opset9",
    "shufflenet.opset9",
    "squeezenet.opset9",
];

#[test]
fn onnx_backend_models_gradients_match_finite_differences() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(venv_python())
        .arg(root().join("fixtures/backend_models.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut checks = OnnxChecks::default();
    for name in MODELS {
        let path = dir.path().join(format!("{name}.onnx"));
        let m = onnx::load(&path).unwrap();
        let feed = dagr_inject::npz::read(&dir.path().join(format!("{name}.inputs.npz"))).unwrap();
        // The gradient graph is built on the model read as opset 16 where it is older.
        let mut up = m.clone();
        let from = dagr_inject::ops::upgrade::upgrade(&mut up).unwrap();
        assert_eq!(from.is_some(), name.ends_with(".opset9"), "{name}");
        let idx = dagr_inject::ops::index(&up).unwrap();
        // The parameters as --train takes them (BatchNorm's running statistics are not).
        let not = dagr_inject::dagr::training::not_parameters(&m);
        let weights: Vec<String> = m
            .graph()
            .initializer
            .iter()
            .filter(|t| dtype::is_float(t.data_type) && t.name != "loss_weights" && !not.contains_key(&t.name))
            .map(|t| t.name.clone())
            .collect();
        // The gradient graph: every weight's gradient as an output.
        let mut gm = up.clone();
        let mut b = Builder::new(&gm, "grad/");
        let one = b.scalar(1.0);
        let grads = grad::backward(&gm, &idx, &mut b, &[("loss".into(), one)], &weights, &HashSet::new())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut outs = Vec::new();
        for w in &weights {
            let Some(gw) = grads.get(w) else { continue };
            let o = format!("{w}_grad");
            b.op_named("Identity", &[gw], vec![], &o);
            outs.push((w.clone(), o));
        }
        b.finish(&mut gm);
        // The finite differences run the model as given (at opset 9 where it is kept there:
        // ONNX Runtime's reading of the old forms, not ours), its weights made inputs (their
        // initializers the defaults).
        let mut fm = m.clone();
        for (w, o) in &outs {
            let f = idx.fact(w).unwrap().clone();
            gm.graph_mut().output.push(f.to_value_info(o));
            fm.graph_mut().input.push(f.to_value_info(w));
        }
        let fp = dir.path().join(format!("{name}.fd.onnx"));
        onnx::save(&fm, &fp).unwrap();
        dagr_inject::ops::infer::check(&gm).unwrap_or_else(|e| panic!("{name}: {e}"));
        let gp = dir.path().join(format!("{name}.grad.onnx"));
        onnx::save(&gm, &gp).unwrap();
        checks.add(&gp);
        let names: Vec<String> = outs.iter().map(|(_, o)| o.clone()).collect();
        let got = run(Backend::Ort, &gp, &feed, &names);
        assert_eq!(outs.len(), weights.len(), "{name}: weights without a gradient");
        let params: Vec<(String, ndarray::ArrayD<f32>)> =
            outs.iter().map(|(w, o)| (w.clone(), f32_of(&got, o))).collect();
        // Random weights whose BatchNorm statistics are not the batch's make large activations
        // (AlexNet's and DenseNet's losses leave the linear range at a step of 1e-3), while a
        // small derivative against the loss (VGG-19) meets float32's rounding at small steps.
        directional_check(name, &m, &fp, &feed, "loss", &params, &[1e-3, 3e-4, 3e-3]);
    }
}
